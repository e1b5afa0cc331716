"""One rerun finishes the work: real SIGKILL / SIGTERM / SIGINT of real `csr generate`
processes, a store outage through a proxy the test cuts, and a tree the store
refuses. Each case ends with every prompt holding exactly the tree a clean
run writes (docs/faults.md lists which test shows which fault)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.db_backends import CSR_SCRIPT, only_on
from tests.study import Study, make_study
from tests.tcp_proxy import TcpProxy, free_port

# End to end through the console script: the full suite (make test), not the fast lane (make check).
pytestmark = pytest.mark.slow

PROMPTS = 6
LONG_LEASE = "600"  # a rerun that waited for this lease would run past the test's timeout
MAX_STDERR_LINE = 300


@pytest.fixture
def study(tmp_path, store_url, trained_llava_dir, tiny_clip_dir) -> Study:
    return make_study(tmp_path, store_url, trained_llava_dir, tiny_clip_dir, prompts=PROMPTS)


@pytest.fixture(scope="session")
def clean_counts(tmp_path_factory, trained_llava_dir, tiny_clip_dir) -> dict[str, int]:
    """Candidates per prompt of a run that nothing interrupted (the search is deterministic)."""
    directory = tmp_path_factory.mktemp("clean-run")
    clean = make_study(directory, f"sqlite:///{directory / 'clean.db'}", trained_llava_dir, tiny_clip_dir,
                       prompts=PROMPTS)
    done = clean.csr("generate", "--iter", "1", "--quiet")
    assert done.returncode == 0, done.stderr
    return _counts(clean)


def _counts(study: Study) -> dict[str, int]:
    return dict(study.query(
        "SELECT p.external_id, COUNT(c.id) FROM prompts p LEFT JOIN candidates c "
        "ON c.prompt_id = p.id AND c.iteration = 1 GROUP BY p.external_id"
    ))


def _states(study: Study) -> dict[str, int]:
    return dict(study.query("SELECT state, COUNT(*) FROM work_items WHERE iteration = 1 GROUP BY state"))


def _assert_finished_like_a_clean_run(study: Study, clean_counts: dict[str, int]) -> None:
    assert _states(study) == {"done": PROMPTS}
    assert study.query("SELECT state FROM iterations WHERE number = 1") == [("generated",)]
    duplicates = study.query(
        "SELECT prompt_id, node, COUNT(*) FROM candidates GROUP BY prompt_id, node HAVING COUNT(*) > 1"
    )
    assert duplicates == [], "no candidate written twice"
    assert _counts(study) == clean_counts


def _assert_short_lines(stderr: str) -> None:
    assert "Traceback" not in stderr and "[SQL:" not in stderr and "[parameters:" not in stderr, stderr
    longest = max((len(line) for line in stderr.splitlines()), default=0)
    assert longest <= MAX_STDERR_LINE, stderr


def _start(study: Study, *args: str, url: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "CSR_DATABASE_URL"}
    env["COLUMNS"] = "200"
    return subprocess.Popen(
        [str(CSR_SCRIPT), "--db", url or study.url, "generate", "--iter", "1", "--quiet", *args],
        cwd=study.directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 240.0,
              process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and process.poll() is not None:
            _out, err = process.communicate()
            pytest.fail(f"the worker ended (exit {process.returncode}) before {what}: {err}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _frozen_when(condition: Callable[[], bool], what: str, pid: int | Callable[[], int | None],
                 process: subprocess.Popen | None = None) -> int:
    """Stops a worker (SIGSTOP) in a state where `condition` holds and returns its pid.

    Polling the store and then signalling races the worker: on a busy machine
    it can finish its claim between the look and the signal. A stopped process
    cannot, so the state is checked again once it is stopped, and the worker
    is let go on (SIGCONT) and caught later if it moved on meanwhile. The
    caller sends its signal to a stopped worker, then SIGCONT where the worker
    must handle it."""
    while True:
        _wait_for(condition, what, process=process)
        target = pid() if callable(pid) else pid
        if target is None:
            continue
        os.kill(target, signal.SIGSTOP)
        _wait_for(lambda stopped=target: _is_stopped(stopped), f"process {target} to stop")
        if condition():
            return target
        os.kill(target, signal.SIGCONT)


def _is_stopped(pid: int) -> bool:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state in ("T", "t")


def _mid_run(study: Study) -> bool:
    """At least one prompt done and at least one claimed: a kill now leaves work behind."""
    states = _states(study)
    return states.get("done", 0) >= 1 and states.get("claimed", 0) >= 1


def _status(study: Study) -> dict:
    shown = study.csr("status", "--json")
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


# -- crashes ---------------------------------------------------------------------------------


def test_sigkill_then_one_rerun_finishes_the_iteration(study, clean_counts):
    worker = _start(study, "--batch-prompts", "2", "--lease-seconds", LONG_LEASE)
    _frozen_when(lambda: _mid_run(study), "a prompt done and others claimed", worker.pid, process=worker)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert _states(study).get("claimed", 0) >= 1, "the dead worker left claims behind"

    status = _status(study)
    [dead] = [w for w in status["workers"] if w["pid"] == worker.pid]
    assert dead["state"] == "gone" and dead["prompts_held"] >= 1
    assert status["live_workers"] == []
    shown = study.csr("status")
    assert "gone" in shown.stdout and "live workers: 0" in shown.stdout

    # The leases run for ten minutes; the rerun sees the dead pid and takes them back at once.
    started = time.monotonic()
    rerun = study.csr("generate", "--iter", "1", "--quiet", "--lease-seconds", LONG_LEASE, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert time.monotonic() - started < 300
    _assert_short_lines(rerun.stderr)
    _assert_finished_like_a_clean_run(study, clean_counts)


def test_sigkill_one_of_two_worker_processes(study, clean_counts):
    parent = _start(study, "--workers", "2", "--batch-prompts", "1", "--lease-seconds", LONG_LEASE)

    def victim() -> int | None:
        rows = study.query(
            "SELECT w.pid FROM workers w JOIN work_items i ON i.worker_id = w.id "
            "WHERE i.state = 'claimed' ORDER BY w.id"
        )
        return rows[0][0] if rows and _states(study).get("done", 0) >= 1 else None

    stopped = _frozen_when(lambda: victim() is not None, "a worker process holding a prompt", victim, process=parent)
    os.kill(stopped, signal.SIGKILL)
    _out, err = parent.communicate(timeout=300)
    # The other worker took the dead one's prompt over; the parent reports the lost process.
    assert parent.returncode == 1 and "1 of 2 worker process(es) failed" in err, err
    _assert_short_lines(err)

    rerun = study.csr("generate", "--iter", "1", "--quiet", "--lease-seconds", LONG_LEASE, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    _assert_finished_like_a_clean_run(study, clean_counts)


@pytest.mark.parametrize(
    ("backend", "signum"),
    [
        pytest.param("sqlite", signal.SIGTERM, id="sqlite-SIGTERM"),
        pytest.param("sqlite", signal.SIGINT, id="sqlite-SIGINT"),
        pytest.param("postgresql", signal.SIGTERM, id="postgresql-SIGTERM", marks=pytest.mark.postgres),
    ],
)
def test_interrupt_releases_the_leases_at_once(study, clean_counts, signum):
    worker = _start(study, "--batch-prompts", "3", "--lease-seconds", LONG_LEASE)
    _frozen_when(lambda: _mid_run(study), "a prompt done and others claimed", worker.pid, process=worker)
    worker.send_signal(signum)
    worker.send_signal(signal.SIGCONT)
    _out, err = worker.communicate(timeout=240)
    assert worker.returncode == 128 + signum, err
    name = signal.Signals(signum).name
    assert f"stopped by {name}" in err and "released for the next run" in err, err
    _assert_short_lines(err)

    # Released, not left to expire: nothing is claimed, the worker is recorded as stopped,
    # and the attempt of a prompt given back unfinished is not counted.
    assert _states(study).get("claimed", 0) == 0
    assert study.query("SELECT stopped_at IS NOT NULL FROM workers") == [(True,)]
    assert study.query("SELECT MAX(attempts) FROM work_items WHERE state = 'pending'")[0][0] in (0, None)
    assert _status(study)["workers"] == []

    rerun = study.csr("generate", "--iter", "1", "--quiet", "--no-wait", timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    _assert_finished_like_a_clean_run(study, clean_counts)


def _execute(study: Study, sql: str, **params):
    from sqlalchemy import create_engine, text

    engine = create_engine(study.url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            return conn.execute(text(sql), params)
    finally:
        engine.dispose()


def test_a_rerun_waits_for_prompts_held_on_another_host(study, clean_counts):
    done = study.csr("generate", "--iter", "1", "--quiet", "--limit", str(PROMPTS - 1))
    assert done.returncode == 0, done.stderr
    # A worker on another machine holds the last prompt: its pid cannot be checked from here.
    now = datetime.now(UTC).replace(tzinfo=None)
    _execute(study, "INSERT INTO workers (iteration, host, pid, device, started_at, heartbeat_at) "
                    "VALUES (1, 'elsewhere', 4242, 'cuda:0', :now, :now)", now=now)
    [(other,)] = study.query("SELECT id FROM workers WHERE host = 'elsewhere'")
    _execute(study, "UPDATE work_items SET state = 'claimed', worker_id = :w, attempts = 1, "
                    "lease_expires_at = :until WHERE state = 'pending'", w=other, until=now + timedelta(hours=1))

    held = study.csr("generate", "--iter", "1", "--quiet", "--no-wait")
    assert held.returncode == 1
    assert f"worker {other} (host elsewhere, pid 4242) holds 1 prompt(s) until" in held.stderr, held.stderr
    _assert_short_lines(held.stderr)

    # The rerun waits for the lease; the test ends the lease once the rerun says it waits
    # (on a busy machine, loading the models alone can take longer than any fixed lease).
    rerun = _start(study)
    said = _lines_of(rerun.stderr)
    waiting = f"waiting for the rest: 1 prompt(s) held by other workers: worker {other}"
    _wait_for(lambda: any(waiting in line for line in said), "the rerun to say it waits", process=rerun)
    _execute(study, "UPDATE work_items SET lease_expires_at = :until WHERE worker_id = :w",
             w=other, until=datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=1))
    assert rerun.wait(timeout=300) == 0, "".join(said)
    _assert_finished_like_a_clean_run(study, clean_counts)
    assert study.query("SELECT MAX(attempts) FROM work_items") == [(2,)]


def _lines_of(stream) -> list[str]:
    """The lines a running process writes to `stream`, as they come (read by a thread)."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(stream.readline, "")), daemon=True).start()
    return lines


# -- store outages (PostgreSQL through a proxy the test cuts) ---------------------------------


def _proxied(url: str, proxy: TcpProxy) -> str:
    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


@pytest.fixture
def proxy(study):
    parsed = make_url(study.url)
    running = TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432)
    yield running
    running.close()


@pytest.mark.parametrize("backend", only_on("postgresql"))
def test_postgres_outage_during_a_run_is_ridden_out(study, clean_counts, proxy):
    worker = _start(study, "--batch-prompts", "2", "--lease-seconds", LONG_LEASE,
                    "--store-retry-seconds", "120", url=_proxied(study.url, proxy))
    _frozen_when(lambda: _mid_run(study), "a prompt done and others claimed", worker.pid, process=worker)
    done_before = _states(study).get("done", 0)
    proxy.cut()  # every connection dropped, new ones refused: a server restart as clients see it
    worker.send_signal(signal.SIGCONT)
    time.sleep(3)  # the outage itself
    proxy.restore()
    _out, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err
    assert done_before < PROMPTS, "the outage happened before the run ended"
    assert "store unreachable" in err and "store reachable again" in err, err
    _assert_short_lines(err)
    _assert_finished_like_a_clean_run(study, clean_counts)


@pytest.mark.parametrize("backend", only_on("postgresql"))
def test_postgres_gone_past_the_bound_ends_the_worker_with_one_line(study, clean_counts, proxy):
    worker = _start(study, "--batch-prompts", "2", "--lease-seconds", LONG_LEASE,
                    "--store-retry-seconds", "2", url=_proxied(study.url, proxy))
    _frozen_when(lambda: _mid_run(study), "a prompt done and others claimed", worker.pid, process=worker)
    proxy.cut()
    worker.send_signal(signal.SIGCONT)
    _out, err = worker.communicate(timeout=240)
    assert worker.returncode == 1, err
    assert "the store was unreachable" in err and "--store-retry-seconds 2" in err, err
    _assert_short_lines(err)
    # Its claims are left to expire (or, here, to be taken back from the dead pid) ...
    assert _states(study).get("claimed", 0) >= 1
    rerun = study.csr("generate", "--iter", "1", "--quiet", "--lease-seconds", LONG_LEASE, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    # ... and nothing was written twice.
    _assert_finished_like_a_clean_run(study, clean_counts)


# -- a tree the store refuses ----------------------------------------------------------------


def _refuse_trees_of(study: Study, prompt_id: int) -> None:
    """A constraint that rejects every candidate of one prompt: a store error only that tree meets."""
    from sqlalchemy import create_engine, text

    engine = create_engine(study.url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "sqlite":
                conn.execute(text(
                    f"CREATE TRIGGER refuse_one_tree BEFORE INSERT ON candidates "
                    f"WHEN NEW.prompt_id = {prompt_id} BEGIN SELECT RAISE(ABORT, 'refuse_one_tree'); END"
                ))
            else:
                conn.execute(text(
                    f"ALTER TABLE candidates ADD CONSTRAINT refuse_one_tree CHECK (prompt_id <> {prompt_id})"
                ))
    finally:
        engine.dispose()


def _accept_all_trees(study: Study) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(study.url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "sqlite":
                conn.execute(text("DROP TRIGGER refuse_one_tree"))
            else:
                conn.execute(text("ALTER TABLE candidates DROP CONSTRAINT refuse_one_tree"))
    finally:
        engine.dispose()


def test_a_tree_the_store_refuses_fails_only_that_prompt(study, clean_counts):
    [(refused, external)] = study.query("SELECT id, external_id FROM prompts ORDER BY id LIMIT 1 OFFSET 2")
    _refuse_trees_of(study, refused)
    run = study.csr("generate", "--iter", "1", "--quiet", "--max-attempts", "2", "--workers", "2", timeout=300)
    assert run.returncode == 0, run.stderr
    _assert_short_lines(run.stderr)
    assert _states(study) == {"done": PROMPTS - 1, "failed": 1}
    [(prompt_id, attempts, error)] = study.query(
        "SELECT prompt_id, attempts, last_error FROM work_items WHERE state = 'failed'"
    )
    assert (prompt_id, attempts) == (refused, 2)
    assert "refuse_one_tree" in error and "\n" not in error and "INSERT" not in error
    assert study.query("SELECT COUNT(*) FROM candidates WHERE prompt_id = :p", p=refused) == [(0,)]

    shown = study.csr("status")
    assert shown.returncode == 0 and external in shown.stdout and "refuse_one_tree" in shown.stdout
    assert [f["prompt"] for f in _status(study)["failed_prompts"]] == [external]

    _accept_all_trees(study)
    again = study.csr("generate", "--iter", "1", "--quiet", "--retry-failed", timeout=300)
    assert again.returncode == 0, again.stderr
    assert "1 failed prompt(s) of iteration 1 put back to pending" in again.stderr
    _assert_finished_like_a_clean_run(study, clean_counts)


# -- one-line errors on every CLI path -------------------------------------------------------


@pytest.mark.parametrize("backend", only_on("sqlite"))
def test_store_errors_are_one_line_unless_csr_debug(study):
    from sqlalchemy import create_engine, text

    engine = create_engine(study.url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE workers"))  # a store damaged behind csr's back
    engine.dispose()
    shown = study.csr("status")
    assert shown.returncode == 1
    assert shown.stderr.strip().splitlines() == [
        "csr: error: the store refused the operation: OperationalError: no such table: workers "
        "(CSR_DEBUG=1 for details)"
    ]
    debug = study.csr("status", env={"CSR_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "[SQL:" in debug.stderr


# -- iterate and train ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", only_on("sqlite"))
def test_iterate_and_train_killed_resume_where_they_were(study):
    # A checkpoint at every step, and enough steps to kill between two of them.
    settings = study.directory / "csr.toml"
    lines = [line for line in settings.read_text().splitlines() if not line.startswith("epochs")]
    at = lines.index("[train]") + 1
    lines[at:at] = ["epochs = 4", "save_steps = 1", "save_total_limit = 2"]
    settings.write_text("\n".join([*lines, ""]))
    checkpoints = study.directory / "models" / "v1.checkpoints"

    def run(*args: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != "CSR_DATABASE_URL"}
        return subprocess.Popen([str(CSR_SCRIPT), "--db", study.url, *args], cwd=study.directory, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # Killed during generation: the rerun takes the dead worker's prompts back and goes on.
    first = run("iterate", "--iter", "1", "--quiet")
    _frozen_when(lambda: _mid_run(study), "a prompt done and others claimed", first.pid, process=first)
    first.send_signal(signal.SIGKILL)
    first.wait()

    # Killed during training, once a checkpoint is complete.
    def checkpointed() -> bool:
        return any((c / "trainer_state.json").is_file() for c in checkpoints.glob("checkpoint-*"))

    second = run("iterate", "--iter", "1", "--quiet")
    _wait_for(checkpointed, "a training checkpoint", timeout=400, process=second)
    second.send_signal(signal.SIGKILL)
    second.wait()
    assert _states(study) == {"done": PROMPTS}, "generation was finished before training"
    assert study.query("SELECT COUNT(*) FROM model_versions WHERE version = 1") == [(0,)]

    trained = study.csr("train", "--iter", "1", timeout=400)
    assert trained.returncode == 0, trained.stderr
    assert "resumed from step" in trained.stdout, trained.stdout
    assert study.query("SELECT state FROM training_runs") == [("done",)]

    again = study.csr("iterate", "--iter", "1", "--quiet", timeout=300)
    assert again.returncode == 0, again.stderr
    assert "model version 1 exists, skipping" in again.stdout


# -- which database errors are outages ---------------------------------------------------------


@pytest.mark.postgres
def test_outages_are_told_from_refused_data(tmp_path, new_postgres_database):
    import sqlite3

    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    from csr.storage.outages import first_line, is_outage

    def error_of(engine, sql: str) -> SQLAlchemyError:
        try:
            with engine.begin() as conn:
                conn.execute(text(sql))
        except SQLAlchemyError as exc:
            return exc
        finally:
            engine.dispose()
        raise AssertionError(f"{sql} did not fail")

    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER CHECK (x > 0))")
    holder.execute("BEGIN IMMEDIATE")  # holds the write lock past the other side's busy timeout
    locked = error_of(create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.1}), "INSERT INTO t VALUES (1)")
    holder.execute("ROLLBACK")
    holder.close()
    refused = error_of(create_engine(f"sqlite:///{path}"), "INSERT INTO t VALUES (0)")
    assert is_outage(locked) and not is_outage(refused)
    assert first_line(refused) == "IntegrityError: CHECK constraint failed: x > 0"

    url = make_url(new_postgres_database()).set(drivername="postgresql+psycopg")
    down = error_of(create_engine(url.set(port=free_port())), "SELECT 1")  # nothing listens there
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER CHECK (x > 0))"))
    check = error_of(engine, "INSERT INTO t VALUES (0)")
    assert is_outage(down) and not is_outage(check)
    assert "\n" not in first_line(check) and first_line(check).startswith("CheckViolation: ")
