"""Store backends for tests: an SQLite file and a real PostgreSQL database.

Registered as a pytest plugin by the repository's root conftest.py
(`pytest_plugins = ["tests.db_backends"]`), so every test module can ask for:

- `store_url`: the URL of a fresh, empty database, once per backend
  ("sqlite": a file in the test's tmp_path; "postgresql": a database with a
  random name, created for the test and dropped after it, marked
  `@pytest.mark.postgres`).
- `backend`: "sqlite" or "postgresql", matching `store_url`; a test narrows it
  with `@pytest.mark.parametrize("backend", only_on("sqlite"))`.
- `sqlite_url` / `postgres_url`: one backend only.
- `new_postgres_database`: a factory for more PostgreSQL databases in one test.
- `head_store_url`: like `store_url`, but holding a store at the head revision
  already (as `csr init` leaves it, without a model): a copy of one store
  migrated once per test process, which saves the migrations in every test
  (`sqlite_head_store` and `postgres_head_database` make such copies).

The PostgreSQL server comes from `CSR_TEST_DATABASE_URL` (a server URL; the
database part is replaced) or `postgresql://postgres@127.0.0.1:5432/postgres`.
When it cannot be reached the PostgreSQL cases are skipped with the reason,
unless `CSR_REQUIRE_POSTGRES=1` (set by .ci/run): then they fail.

Also here, because most test modules need it: `run_csr`, which runs the real
`csr` console script of this virtual environment in a subprocess.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

DEFAULT_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BACKENDS = ("sqlite", "postgresql")

# The console script installed next to this interpreter (pip puts both in bin/).
CSR_SCRIPT = Path(sys.executable).parent / "csr"

_server_error: dict[str, str | None] = {}


def server_url() -> URL:
    raw = os.environ.get("CSR_TEST_DATABASE_URL") or DEFAULT_SERVER_URL
    url = make_url(raw)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def postgres_required() -> bool:
    return os.environ.get("CSR_REQUIRE_POSTGRES", "") not in ("", "0")


def _check_server() -> str | None:
    """None when the server accepts connections, else why not (checked once per run)."""
    if "error" not in _server_error:
        url = server_url()
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            _server_error["error"] = None
        except Exception as exc:  # any reason the server is unusable
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            shown = url.render_as_string(hide_password=True)
            _server_error["error"] = f"PostgreSQL server {shown} not reachable: {first}"
        finally:
            engine.dispose()
    return _server_error["error"]


def require_server() -> None:
    """Skip the current test (or fail it under CSR_REQUIRE_POSTGRES=1) without a server."""
    error = _check_server()
    if error is None:
        return
    if postgres_required():
        pytest.fail(f"{error} (CSR_REQUIRE_POSTGRES=1: the PostgreSQL tests must run)", pytrace=False)
    pytest.skip(f"{error}; start it or set CSR_TEST_DATABASE_URL to a server URL")


def _admin_engine():
    return create_engine(server_url(), isolation_level="AUTOCOMMIT")


def create_postgres_database(template: str | None = None) -> str:
    """Create a database with a random name, empty or a copy of the database
    `template`; returns its URL (postgresql://...)."""
    name = f"csr_test_{secrets.token_hex(6)}"
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
    finally:
        engine.dispose()
    url = server_url().set(drivername="postgresql", database=name)
    return url.render_as_string(hide_password=False)


def drop_postgres_database(url: str) -> None:
    name = make_url(url).database
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


# Stores at head that the tests copy: made once per test process (each xdist
# worker has its own), removed when it ends.
_head_templates: dict[str, Path | str] = {}


def sqlite_head_store(path: Path) -> str:
    """An SQLite store at head at `path` (a copy of the template); returns its URL."""
    template = _head_templates.get("sqlite")
    if template is None:
        from csr.storage.store import create_store

        directory = Path(tempfile.mkdtemp(prefix="csr-head-store-"))
        atexit.register(shutil.rmtree, directory, True)
        template = directory / "store.db"
        engine, _ = create_store(f"sqlite:///{template}")
        engine.dispose()  # the last connection gone: no -wal/-shm beside the file
        _head_templates["sqlite"] = template
    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


def postgres_head_database() -> str:
    """A new PostgreSQL database holding a store at head (CREATE DATABASE ... TEMPLATE)."""
    template = _head_templates.get("postgresql")
    if template is None:
        from csr.storage.store import create_store

        url = create_postgres_database()
        engine, _ = create_store(url)
        engine.dispose()  # a template must have no connections
        template = _head_templates["postgresql"] = make_url(url).database
    return create_postgres_database(template=str(template))


@pytest.fixture
def new_postgres_database() -> Iterator[Callable[..., str]]:
    """Factory: each call creates one more fresh PostgreSQL database, dropped after
    the test; `make(head=True)` one that holds a store at head already."""
    require_server()
    made: list[str] = []

    def make(head: bool = False) -> str:
        made.append(postgres_head_database() if head else create_postgres_database())
        return made[-1]

    yield make
    for url in made:
        drop_postgres_database(url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
def postgres_url(new_postgres_database) -> str:
    return new_postgres_database()


def backend_param(name: str, *values, id: str | None = None):
    """One parametrize entry for `backend` (plus further values), marked postgres where it is."""
    marks = [pytest.mark.postgres] if name == "postgresql" else []
    return pytest.param(name, *values, marks=marks, id=id or name)


def only_on(*names: str) -> list:
    """`@pytest.mark.parametrize("backend", only_on("sqlite"))` narrows `store_url` to some backends."""
    return [backend_param(name) for name in names]


@pytest.fixture(params=only_on(*BACKENDS))
def backend(request) -> str:
    return request.param


@pytest.fixture
def store_url(request, backend: str) -> str:
    """A fresh, empty database on the backend under test."""
    if backend == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def head_store_url(request, backend: str, tmp_path: Path) -> str:
    """A fresh database on the backend under test, holding a store at head."""
    if backend == "sqlite":
        return sqlite_head_store(tmp_path / "store.db")
    return request.getfixturevalue("new_postgres_database")(head=True)


def run_csr(
    *args: str | os.PathLike,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    db: str | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run the real `csr` console script; returns the finished process (text output).

    `db` becomes `--db URL`. The child gets this process's environment without
    CSR_DATABASE_URL (so a developer's setting never leaks into a test), plus `env`.
    """
    child_env = {k: v for k, v in os.environ.items() if k != "CSR_DATABASE_URL"}
    child_env["COLUMNS"] = "200"  # rich wraps long lines at the terminal width otherwise
    child_env.update(env or {})
    argv = [str(CSR_SCRIPT)]
    if db is not None:
        argv += ["--db", db]
    argv += [str(a) for a in args]
    return subprocess.run(argv, cwd=cwd, env=child_env, capture_output=True, text=True, timeout=timeout)


def table_rows(url: str) -> dict[str, list[tuple]]:
    """Every row of every table (sorted), for row-for-row comparisons."""
    from sqlalchemy import MetaData, select

    engine = create_engine(_driver_url(url))
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        with engine.connect() as conn:
            return {
                name: sorted((tuple(row) for row in conn.execute(select(table))), key=repr)
                for name, table in sorted(metadata.tables.items())
            }
    finally:
        engine.dispose()


def fingerprint(url: str):
    """What must not change when a command is refused: on SQLite the bytes of
    the store file and which side files (-wal, -shm, -journal) exist; elsewhere
    every row of every table."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        import hashlib

        path = Path(parsed.database)
        sidecars = sorted(p.name for p in path.parent.glob(path.name + "-*"))
        return hashlib.sha256(path.read_bytes()).hexdigest(), sidecars
    return table_rows(url)


def _driver_url(url: str) -> str:
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


# -- under CSR_REQUIRE_POSTGRES=1 (CI) the run fails unless PostgreSQL tests passed -------
# Counted from the test reports (which carry the markers), so that the count is
# right with pytest-xdist too, where the process that reports runs no test.

_postgres_items: set[str] = set()
_postgres_passed: list[str] = []


def _is_xdist_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_runtest_logreport(report) -> None:
    if "postgres" not in report.keywords:
        return
    if report.when == "setup":
        _postgres_items.add(report.nodeid)
    if report.when == "call" and report.passed:
        _postgres_passed.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus) -> None:
    template = _head_templates.pop("postgresql", None)
    if template is not None:
        drop_postgres_database(server_url().set(database=str(template)).render_as_string(hide_password=False))
    if not postgres_required() or session.config.option.collectonly or _is_xdist_worker(session.config):
        return
    if not _postgres_passed:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "CSR_REQUIRE_POSTGRES=1 but no PostgreSQL test passed: the suite did not run on both backends"
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(message, red=True)
        else:
            print(message, file=sys.stderr)


def pytest_terminal_summary(terminalreporter) -> None:
    if _postgres_items:
        terminalreporter.write_line(
            f"PostgreSQL tests: {len(_postgres_passed)} passed of {len(_postgres_items)} run "
            f"(server {server_url().render_as_string(hide_password=True)})"
        )
