"""The store API on both backends: creation, revision checks, base model,
status counts, prompt writes, and the SQLite connection settings."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, insert, inspect, select, text, update
from sqlalchemy.exc import IntegrityError

from csr.cli.advice import advice
from csr.storage import migrate
from csr.storage import prompts as prompt_store
from csr.storage.clock import utcnow
from csr.storage.db import SQLITE_BUSY_TIMEOUT_MS, make_engine, normalise_url, sqlite_path
from csr.storage.errors import NoStore, SchemaMismatch, StoreError
from csr.storage.models import Base, Image, Iteration, Prompt, Worker, WorkItem
from csr.storage.store import create_store, open_store, store_revision, upgrade_store
from csr.storage.summary import status
from csr.storage.versions import register_base_model
from tests.db_backends import fingerprint

MODEL, CLIP = "llava-hf/llava-1.5-7b-hf", "ViT-L-14-336"


@pytest.fixture
def engine(store_url):
    """A store at head on the backend under test."""
    engine, what = create_store(store_url)
    assert what == "created"
    yield engine
    engine.dispose()


def _set_revision(engine, revision: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})


def _add_images_and_prompts(conn, n_prompts: int) -> list[int]:
    conn.execute(
        insert(Image),
        [{"sha256": "a" * 64, "root": "/data", "rel_path": "a.png", "size_bytes": 10, "width": 4, "height": 4}],
    )
    image_id = conn.execute(select(Image.id)).scalar_one()
    prompt_store.insert_prompts(
        conn,
        [{"external_id": f"p{i}", "image_id": image_id, "text": f"question {i}", "source": "t.json"} for i in range(n_prompts)],
    )
    return list(conn.execute(select(Prompt.id).order_by(Prompt.id)).scalars())


# -- creation and revision checks ----------------------------------------------------------


def test_create_store_makes_every_table_at_head(store_url):
    engine, what = create_store(store_url)
    try:
        assert what == "created"
        assert migrate.current_revision(engine) == migrate.head_revision()
        tables = set(inspect(engine).get_table_names())
        assert tables == set(Base.metadata.tables) | {"alembic_version"}
    finally:
        engine.dispose()
    again, what = create_store(store_url)
    again.dispose()
    assert what == "exists"
    open_store(store_url).dispose()


def test_single_head_revision():
    # Two revisions written against the same parent would leave the store unmigratable.
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(migrate._config()).get_heads()
    assert heads == [migrate.head_revision()]


def test_open_refuses_an_older_store_naming_db_upgrade(store_url):
    engine = make_engine(store_url)
    migrate.upgrade(engine, "0001")
    engine.dispose()
    with pytest.raises(SchemaMismatch, match=r"revision 0001, this csr needs") as info:
        open_store(store_url)
    # storage states the revisions; the command line names the fix
    assert (info.value.revision, info.value.newer) == ("0001", False)
    assert "run `csr db upgrade`" in advice(info.value)
    # create_store (csr init) does not silently migrate either
    with pytest.raises(SchemaMismatch, match="revision 0001") as info:
        create_store(store_url)
    assert "csr db upgrade" in advice(info.value)


def test_open_refuses_a_newer_store_asking_to_upgrade_csr(engine, store_url):
    _set_revision(engine, "0999_from_the_future")
    with pytest.raises(SchemaMismatch, match=r"0999_from_the_future.*newer csr.*upgrade csr"):
        open_store(store_url)
    # and `db upgrade` cannot "upgrade" it either: it refuses without touching it
    engine.dispose()
    before = fingerprint(store_url)
    again = make_engine(store_url)
    with pytest.raises(SchemaMismatch, match="upgrade csr"):
        migrate.upgrade(again)
    again.dispose()
    assert fingerprint(store_url) == before


def test_open_missing_sqlite_store_names_init_and_creates_nothing(tmp_path):
    path = tmp_path / "nowhere.db"
    with pytest.raises(NoStore, match="no store at") as info:
        open_store(f"sqlite:///{path}")
    assert "run `csr init`" in advice(info.value)
    assert not path.exists()


def test_a_database_that_is_not_a_csr_store_is_refused(store_url):
    engine = make_engine(store_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE somebody_elses (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(SchemaMismatch, match="not a csr store"):
        open_store(store_url)
    # `csr init` must not offer `csr init` as the fix, nor create tables beside someone else's
    with pytest.raises(StoreError, match="not a csr store") as info:
        create_store(store_url)
    assert "csr init" not in str(info.value) + advice(info.value)
    assert "point --db / CSR_DATABASE_URL at an empty database" in advice(info.value)
    with pytest.raises(StoreError, match="not a csr store"):
        upgrade_store(store_url)  # `csr db upgrade` neither
    engine = make_engine(store_url)
    assert inspect(engine).get_table_names() == ["somebody_elses"]
    engine.dispose()


def test_upgrade_store_migrates_an_old_store(store_url):
    engine = make_engine(store_url)
    migrate.upgrade(engine, "0001")
    engine.dispose()
    assert store_revision(store_url) == "0001"
    assert upgrade_store(store_url) == ("0001", migrate.head_revision())
    assert store_revision(store_url) == migrate.head_revision()
    assert upgrade_store(store_url) == (migrate.head_revision(), migrate.head_revision())


def test_unreachable_server_is_a_store_error():
    url = "postgresql://nobody@127.0.0.1:1/none"
    with pytest.raises(StoreError, match="cannot open the store"):
        open_store(url)
    with pytest.raises(StoreError, match="cannot create the store"):
        create_store(url)
    with pytest.raises(StoreError, match="cannot upgrade the store"):
        upgrade_store(url)
    with pytest.raises(StoreError, match="cannot open the store"):
        store_revision(url)


def test_url_normalisation():
    assert normalise_url("study.db") == "sqlite:///study.db"
    assert normalise_url("/abs/study.db") == "sqlite:////abs/study.db"
    assert normalise_url("postgresql://u@h:5432/csr") == "postgresql+psycopg://u@h:5432/csr"
    assert normalise_url("postgresql+psycopg://u:pw@h/csr") == "postgresql+psycopg://u:pw@h/csr"
    assert sqlite_path("sqlite:///x/y.db").as_posix() == "x/y.db"
    assert sqlite_path("sqlite://") is None


# -- connections ---------------------------------------------------------------------------


def test_sqlite_connections_use_wal_busy_timeout_and_foreign_keys(sqlite_url):
    engine, _ = create_store(sqlite_url)
    try:
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert raw.execute("PRAGMA busy_timeout").fetchone()[0] == SQLITE_BUSY_TIMEOUT_MS
            assert raw.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    finally:
        engine.dispose()


def test_foreign_keys_are_enforced(engine):
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(
            insert(Prompt).values(external_id="x", image_id=12345, text="t", source="s", created_at=utcnow())
        )
    with engine.connect() as conn:
        assert count_prompts(conn) == 0


def test_sqlite_readers_are_not_blocked_by_a_writer(sqlite_url):
    """WAL: `csr status` reads while a worker holds the write lock."""
    engine, _ = create_store(sqlite_url)
    try:
        with engine.begin() as writer:
            _add_images_and_prompts(writer, 3)
            with engine.connect().execution_options(sqlite_begin="DEFERRED") as reader:
                assert count_prompts(reader) == 0  # sees the last commit, does not wait
        with engine.connect() as reader:
            assert count_prompts(reader) == 3
    finally:
        engine.dispose()


def test_sqlite_writers_wait_instead_of_failing(sqlite_url):
    """A second writer waits for the first (busy timeout) rather than failing with 'database is locked'."""
    import threading
    import time

    engine, _ = create_store(sqlite_url)
    try:
        holding = threading.Event()
        errors: list[BaseException] = []

        def first_writer():
            try:
                with engine.begin() as conn:
                    _add_images_and_prompts(conn, 1)
                    holding.set()
                    time.sleep(0.5)
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)
                holding.set()

        thread = threading.Thread(target=first_writer)
        thread.start()
        holding.wait()
        start = time.monotonic()
        with engine.begin() as conn:
            image_id = conn.execute(select(Image.id)).scalar_one()
            prompt_store.insert_prompts(conn, [{"external_id": "second", "image_id": image_id, "text": "t", "source": "s"}])
        waited = time.monotonic() - start
        thread.join()
        assert not errors
        assert waited > 0.2
        with engine.connect() as conn:
            assert count_prompts(conn) == 2
    finally:
        engine.dispose()


# -- base model ----------------------------------------------------------------------------


def test_register_base_model_once_and_never_replace_it(engine):
    with engine.begin() as conn:
        assert register_base_model(conn, MODEL, CLIP, "openai") == "registered"
    with engine.begin() as conn:
        assert register_base_model(conn, MODEL, CLIP, "openai") == "unchanged"
    for other in (("/models/other", CLIP, "openai"), (MODEL, "hf-hub:x/y", None), (MODEL, CLIP, "laion2b")):
        with pytest.raises(StoreError, match="base model is .* never changes"), engine.begin() as conn:
            register_base_model(conn, *other)
    with engine.connect() as conn:
        summary = status(conn)
    [v0] = summary["model_versions"]
    assert (v0["version"], v0["parent"], v0["path"]) == (0, None, MODEL)


def test_base_model_cannot_change_once_an_iteration_exists(engine):
    with engine.begin() as conn:
        register_base_model(conn, MODEL, CLIP, "openai")
        conn.execute(
            insert(Iteration).values(
                number=1, policy_version=0, preset="paper", config={}, config_hash="0" * 64,
                state="generating", created_at=utcnow(),
            )
        )
    with pytest.raises(StoreError, match="never changes"), engine.begin() as conn:
        register_base_model(conn, "/models/other", CLIP, "openai")
    with engine.begin() as conn:
        assert register_base_model(conn, MODEL, CLIP, "openai") == "unchanged"


# -- status --------------------------------------------------------------------------------


def test_status_counts_per_iteration(engine):
    now = utcnow()
    with engine.begin() as conn:
        register_base_model(conn, MODEL, CLIP, "openai")
        prompt_ids = _add_images_and_prompts(conn, 7)
        conn.execute(
            insert(Iteration),
            [
                {"number": 1, "policy_version": 0, "preset": "paper", "config": {"beam": 5},
                 "config_hash": "1" * 64, "state": "generating", "created_at": now},
                {"number": 2, "policy_version": 0, "preset": "fast", "config": {},
                 "config_hash": "2" * 64, "state": "generating", "created_at": now},
            ],
        )
        live = conn.execute(
            insert(Worker).values(iteration=1, host="gpu1", pid=11, device="cuda:0", started_at=now,
                                  heartbeat_at=now).returning(Worker.id)
        ).scalar_one()
        # not live: silent for ten minutes, or stopped
        conn.execute(
            insert(Worker),
            [
                {"iteration": 1, "host": "gpu2", "pid": 12, "device": "cuda:0", "started_at": now,
                 "heartbeat_at": now - timedelta(minutes=10), "stopped_at": None},
                {"iteration": 1, "host": "gpu3", "pid": 13, "device": "cpu", "started_at": now,
                 "heartbeat_at": now, "stopped_at": now},
            ],
        )
        states = ["done", "done", "done", "claimed", "failed", "pending"]  # the 7th prompt has no item yet
        conn.execute(
            insert(WorkItem),
            [
                {"iteration": 1, "prompt_id": pid, "state": state, "attempts": 1, "updated_at": now,
                 "worker_id": live if state == "claimed" else None}
                for pid, state in zip(prompt_ids, states, strict=False)
            ],
        )
    with engine.connect() as conn:
        summary = status(conn)
    assert summary["prompts"] == 7
    first, second = summary["iterations"]
    assert {k: first[k] for k in ("iteration", "prompts", "pending", "claimed", "done", "failed")} == {
        "iteration": 1, "prompts": 7, "pending": 2, "claimed": 1, "done": 3, "failed": 1,
    }
    assert (first["preset"], first["policy_version"], first["state"]) == ("paper", 0, "generating")
    assert {k: second[k] for k in ("pending", "claimed", "done", "failed")} == {
        "pending": 7, "claimed": 0, "done": 0, "failed": 0,
    }
    assert [(w["host"], w["pid"]) for w in summary["live_workers"]] == [("gpu1", 11)]
    assert [v["version"] for v in summary["model_versions"]] == [0]


def test_status_of_an_empty_store(engine):
    with engine.connect() as conn:
        assert status(conn) == {"prompts": 0, "iterations": [], "model_versions": [], "live_workers": [],
                                "workers": [], "failed_prompts": []}


# -- prompt writes -------------------------------------------------------------------------


def test_prompt_writes_and_lookups(engine):
    with engine.begin() as conn:
        prompt_store.insert_images(
            conn,
            [
                {"sha256": c * 64, "root": "/imgs", "rel_path": f"{c}.png", "size_bytes": 100, "width": 8, "height": 6}
                for c in "abc"
            ],
        )
        ids = prompt_store.image_ids(conn, ["a" * 64, "c" * 64, "f" * 64])
        assert set(ids) == {"a" * 64, "c" * 64}
        # more ids than one IN (...) chunk
        prompt_store.insert_prompts(
            conn,
            [
                {"external_id": f"q{i}", "image_id": ids["a" * 64 if i % 2 else "c" * 64], "text": f"text {i}",
                 "source": "file.json"}
                for i in range(1203)
            ],
        )
    with engine.connect() as conn:
        assert count_prompts(conn) == 1203
        found = prompt_store.existing_prompts(conn, [f"q{i}" for i in range(0, 1300, 3)] + ["nope"])
        assert len(found) == len(range(0, 1203, 3))
        assert found["q3"] == ("a" * 64, "text 3")
        assert found["q0"] == ("c" * 64, "text 0")
        assert conn.execute(select(func.min(Prompt.created_at))).scalar_one() is not None


def test_external_ids_and_image_hashes_are_unique(engine):
    with engine.begin() as conn:
        _add_images_and_prompts(conn, 1)
    with pytest.raises(IntegrityError), engine.begin() as conn:
        image_id = conn.execute(select(Image.id)).scalar_one()
        prompt_store.insert_prompts(conn, [{"external_id": "p0", "image_id": image_id, "text": "t", "source": "s"}])
    with pytest.raises(IntegrityError), engine.begin() as conn:
        prompt_store.insert_images(
            conn, [{"sha256": "a" * 64, "root": "/x", "rel_path": "b.png", "size_bytes": 1, "width": 1, "height": 1}]
        )
    with engine.connect() as conn:
        assert count_prompts(conn) == 1
        assert conn.execute(select(func.count()).select_from(Image)).scalar_one() == 1


def test_a_failed_transaction_leaves_nothing(engine):
    with pytest.raises(RuntimeError), engine.begin() as conn:
        _add_images_and_prompts(conn, 5)
        conn.execute(update(Prompt).values(text="changed"))
        raise RuntimeError("worker killed")
    with engine.connect() as conn:
        assert count_prompts(conn) == 0


def count_prompts(conn) -> int:
    return conn.execute(select(func.count()).select_from(Prompt)).scalar_one()


def test_database_errors_leave_the_store_as_csrs_own(store_url):
    """No SQLAlchemy error crosses the door: what the database refuses is StoreRefused."""
    from csr.storage import Store, StoreRefused

    engine, _ = create_store(store_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE workers CASCADE" if engine.dialect.name == "postgresql" else "DROP TABLE workers"))
    engine.dispose()
    store = Store(make_engine(store_url))
    try:
        with pytest.raises(StoreRefused, match="the store refused the operation: .*workers") as info:
            store.register_worker(1, "cpu")
        assert "\n" not in str(info.value)
    finally:
        store.close()


def test_an_outage_is_retried_within_its_bound_and_reported_past_it():
    from csr.storage import OutageRetry, StoreUnavailable

    said, reconnects, failures = [], [], iter([StoreUnavailable("OperationalError: gone")] * 2)

    def flaky():
        for exc in failures:
            raise exc
        return "written"

    retry = OutageRetry(lambda: reconnects.append(1), bound_seconds=30, say=said.append)
    assert retry(flaky) == "written"
    assert (retry.retries, len(reconnects)) == (2, 2)
    assert said[0] == "store unreachable (OperationalError: gone); retrying for up to 30 s"
    assert said[1].startswith("store reachable again after")

    def down():
        raise StoreUnavailable("OperationalError: refused")

    with pytest.raises(StoreUnavailable, match="longer than the retry bound of 0 s: OperationalError: refused") as info:
        OutageRetry(lambda: None, bound_seconds=0, say=said.append)(down)
    assert info.value.bound == 0 and info.value.detail == "OperationalError: refused"
