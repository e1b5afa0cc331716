"""csr: Calibrated Self-Rewarding as a database-backed iterative data engine.

The top-level folders engine/, cli/, storage/ and migrations/ install as
csr.engine, csr.cli, csr.storage and csr.migrations (see pyproject.toml).
"""

__version__ = "0.1.0"
