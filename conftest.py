# Fixtures for both store backends (SQLite file, real PostgreSQL); see tests/db_backends.py.
pytest_plugins = ["tests.db_backends"]
