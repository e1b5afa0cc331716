"""The store commands: init, where the store is (--db, CSR_DATABASE_URL,
csr.toml, default), status, db upgrade, and the one-line refusals; in process
(tests/cli_runner.py), and init + status through the real `csr` console script."""

from __future__ import annotations

import json
import tomllib

import pytest
from sqlalchemy import text

from csr.storage import migrate
from csr.storage.db import make_engine
from csr.storage.store import create_store
from csr.storage.versions import register_base_model
from tests.cli_runner import invoke_csr
from tests.db_backends import fingerprint, only_on, run_csr, table_rows

HEAD = migrate.head_revision()
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/csr"


def one_line_error(done) -> str:
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("csr: error: "), done.stderr
    return lines[0]


def base_model_of(done) -> str:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["model_versions"][0]["path"]


def make_store(url: str, model: str) -> None:
    engine, _ = create_store(url)
    with engine.begin() as conn:
        register_base_model(conn, model, "ViT-B-32", None)
    engine.dispose()


def test_init_creates_the_default_store_and_settings_in_the_working_directory(tmp_path):
    done = run_csr("init", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "store created" in done.stdout and f"schema {HEAD}" in done.stdout
    assert (tmp_path / "csr.db").is_file()
    settings = tomllib.loads((tmp_path / "csr.toml").read_text())
    assert settings["store"]["url"] == "sqlite:///csr.db"
    assert settings["model"]["base"] == "llava-hf/llava-1.5-7b-hf"

    status = run_csr("status", "--json", cwd=tmp_path)
    assert base_model_of(status) == "llava-hf/llava-1.5-7b-hf"
    summary = json.loads(status.stdout)
    assert summary["prompts"] == 0 and summary["iterations"] == [] and summary["live_workers"] == []

    again = run_csr("init", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "store exists" in again.stdout and "base model unchanged" in again.stdout


def test_status_prints_tables(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    make_store(url, "org/base-model")
    done = invoke_csr("status", db=url)
    assert done.returncode == 0, done.stderr
    assert "prompts: 0" in done.stdout
    assert "no iteration started yet" in done.stdout
    assert "org/base-model" in done.stdout
    assert "live workers: none" in done.stdout


def test_store_location_precedence(tmp_path):
    """--db, then CSR_DATABASE_URL, then csr.toml (relative to the file), then ./csr.db."""
    study, elsewhere = tmp_path / "study", tmp_path / "elsewhere"
    study.mkdir()
    elsewhere.mkdir()
    for name in ("csr", "toml", "env", "flag"):
        make_store(f"sqlite:///{study / name}.db", f"org/{name}")
    env = {"CSR_DATABASE_URL": f"sqlite:///{study / 'env.db'}"}

    assert base_model_of(invoke_csr("status", "--json", cwd=study)) == "org/csr"
    (study / "csr.toml").write_text('[store]\nurl = "sqlite:///toml.db"\n')
    assert base_model_of(invoke_csr("status", "--json", cwd=study)) == "org/toml"
    assert base_model_of(invoke_csr("status", "--json", cwd=study, env=env)) == "org/env"
    assert base_model_of(invoke_csr("--db", study / "flag.db", "status", "--json", cwd=study, env=env)) == "org/flag"
    # a relative SQLite path in csr.toml is relative to the file, wherever csr runs
    assert base_model_of(invoke_csr("--config", study / "csr.toml", "status", "--json", cwd=elsewhere)) == "org/toml"


def test_init_with_db_records_the_store_in_csr_toml(tmp_path):
    done = invoke_csr("--db", "study.db", "init", "--model", "org/my-model", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert tomllib.loads((tmp_path / "csr.toml").read_text())["store"]["url"] == "study.db"
    assert base_model_of(invoke_csr("status", "--json", cwd=tmp_path)) == "org/my-model"
    assert not (tmp_path / "csr.db").exists()


def test_init_refuses_a_missing_local_model_and_creates_nothing(tmp_path):
    done = invoke_csr("init", "--model", "./no-such-model", cwd=tmp_path)
    assert "model directory not found" in one_line_error(done)
    assert not (tmp_path / "csr.db").exists() and not (tmp_path / "csr.toml").exists()


def test_init_never_replaces_the_base_model_of_a_store(store_url, tmp_path):
    """Another --model (or CLIP) on a store that has a base model is another study:
    one line naming the model there and how to start a new store; nothing changes."""
    study = tmp_path / "study"
    study.mkdir()
    first = invoke_csr("--db", store_url, "init", "--model", "org/first-model", cwd=study)
    assert first.returncode == 0, first.stderr
    settings_before = (study / "csr.toml").read_bytes()
    rows_before, before = table_rows(store_url), fingerprint(store_url)
    for args in (["--model", "org/other-model"], ["--clip", "ViT-B-16"], ["--clip-pretrained", "laion2b_s34b_b79k"]):
        message = one_line_error(invoke_csr("--db", store_url, "init", *args, cwd=study))
        assert "already holds a study of org/first-model (CLIP ViT-L-14-336" in message, message
        assert "in another directory" in message and "--db NEW_URL" in message, message
        assert table_rows(store_url) == rows_before
        assert fingerprint(store_url) == before
        assert (study / "csr.toml").read_bytes() == settings_before
    again = invoke_csr("--db", store_url, "init", cwd=study)
    assert again.returncode == 0 and "base model unchanged" in again.stdout, again.stderr
    # The way the refusal names: a new store, here another directory.
    elsewhere = tmp_path / "new-study"
    elsewhere.mkdir()
    fresh = invoke_csr("init", "--model", "org/other-model", cwd=elsewhere)
    assert fresh.returncode == 0, fresh.stderr
    assert base_model_of(invoke_csr("status", "--json", cwd=elsewhere)) == "org/other-model"
    assert base_model_of(invoke_csr("status", "--json", db=store_url)) == "org/first-model"


def test_bad_settings_file_is_one_line(tmp_path):
    (tmp_path / "csr.toml").write_text("[store\nurl = 1\n")
    assert "not valid TOML" in one_line_error(invoke_csr("status", cwd=tmp_path))
    (tmp_path / "csr.toml").write_text('[stor]\nurl = "x.db"\n')
    assert "unknown section" in one_line_error(invoke_csr("status", cwd=tmp_path))
    assert "settings file not found" in one_line_error(invoke_csr("--config", tmp_path / "nope.toml", "status"))


def test_older_store_is_refused_until_db_upgrade(store_url, tmp_path):
    engine = make_engine(store_url)
    migrate.upgrade(engine, "0001")
    engine.dispose()
    before = fingerprint(store_url)
    message = one_line_error(invoke_csr("status", db=store_url))
    assert "revision 0001" in message and "run `csr db upgrade`" in message
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "image": "a.png", "prompt": "?"}\n')
    assert "csr db upgrade" in one_line_error(invoke_csr("prompts", "import", prompts, "--images", tmp_path, db=store_url))
    assert "csr db upgrade" in one_line_error(invoke_csr("init", db=store_url, cwd=tmp_path))
    assert fingerprint(store_url) == before

    upgraded = invoke_csr("db", "upgrade", db=store_url)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"upgraded from schema 0001 to {HEAD}" in upgraded.stdout
    assert invoke_csr("status", db=store_url).returncode == 0


def test_newer_store_is_refused_asking_to_upgrade_csr(store_url, tmp_path):
    engine, _ = create_store(store_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0999'"))
    engine.dispose()
    before = fingerprint(store_url)
    for args in (["status"], ["db", "upgrade"], ["init"]):
        message = one_line_error(invoke_csr(*args, db=store_url, cwd=tmp_path))
        assert "revision 0999" in message and "upgrade csr" in message, args
    assert fingerprint(store_url) == before


@pytest.mark.parametrize("backend", only_on("sqlite"))
def test_a_database_that_is_not_a_csr_store(store_url, tmp_path):
    engine = make_engine(store_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE invoices (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    before = fingerprint(store_url)
    assert "not a csr store" in one_line_error(invoke_csr("init", db=store_url, cwd=tmp_path))
    assert "not a csr store" in one_line_error(invoke_csr("db", "upgrade", db=store_url))
    assert "not a csr store" in one_line_error(invoke_csr("status", db=store_url))
    assert fingerprint(store_url) == before


def test_missing_or_unreachable_store_is_one_line(tmp_path):
    assert "run `csr init`" in one_line_error(invoke_csr("status", cwd=tmp_path))
    assert "run `csr init`" in one_line_error(invoke_csr("db", "upgrade", cwd=tmp_path))
    assert not (tmp_path / "csr.db").exists()
    for args in (["status"], ["db", "upgrade"], ["db", "current"], ["init"]):
        message = one_line_error(invoke_csr(*args, db=UNREACHABLE, cwd=tmp_path))
        assert "127.0.0.1:1" in message and "Connection refused" in message, args
    assert "cannot use database URL" in one_line_error(invoke_csr("status", db="nosuchdialect://x/y"))


def test_usage_errors_are_not_tracebacks(tmp_path):
    done = run_csr("prompts", "import", "file.json", cwd=tmp_path)  # --images missing
    assert done.returncode == 2
    assert "--images" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.postgres
def test_csr_database_url_points_csr_at_postgresql(postgres_url, tmp_path):
    env = {"CSR_DATABASE_URL": postgres_url}
    done = invoke_csr("init", "--model", "org/pg-model", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert "store created at postgresql+psycopg://" in done.stdout
    assert not (tmp_path / "csr.db").exists()
    assert base_model_of(invoke_csr("status", "--json", cwd=tmp_path, env=env)) == "org/pg-model"
    revision = json.loads(invoke_csr("db", "current", "--json", cwd=tmp_path, env=env).stdout)
    assert (revision["current"], revision["head"]) == (HEAD, HEAD)


@pytest.mark.parametrize(("section", "line", "message"), [
    ("generate", "num_beam = 5", "unknown search setting(s): num_beam"),
    ("generate", 'lam = "high"', "lam must be a number, got 'high'"),
    ("train", "lr = 1e-5", "unknown training option(s): lr"),
    ("train", 'epochs = "two"', "epochs must be an integer"),
])
def test_a_typo_in_csr_toml_is_one_line_naming_the_key_and_the_file(tmp_path, section, line, message):
    assert invoke_csr("init", "--model", "org/model", cwd=tmp_path).returncode == 0
    toml = tmp_path / "csr.toml"
    toml.write_text(toml.read_text().replace(f"[{section}]\n", f"[{section}]\n{line}\n"))
    before = fingerprint(f"sqlite:///{tmp_path / 'csr.db'}")
    done = invoke_csr(section, "--iter", "1", cwd=tmp_path)
    error = one_line_error(done)
    assert message in error and f"[{section}] in {toml}" in error
    assert fingerprint(f"sqlite:///{tmp_path / 'csr.db'}") == before


@pytest.mark.parametrize(("section", "written", "edited", "message"), [
    ("store", "url = ", "ulr = ", "unknown setting(s): ulr (known: url)"),
    ("model", 'clip = "ViT-L-14-336"', "clip = 14", "setting clip must be a string, got 14"),
])
def test_a_typo_in_store_or_model_is_one_line_and_init_keeps_the_file(tmp_path, section, written, edited, message):
    assert run_csr("init", "--model", "org/model", cwd=tmp_path).returncode == 0
    toml = tmp_path / "csr.toml"
    assert written in toml.read_text()
    toml.write_text(toml.read_text().replace(written, edited))
    before = toml.read_text()
    error = one_line_error(run_csr("status", cwd=tmp_path))
    assert message in error and f"[{section}] in {toml}" in error
    # init rewrites csr.toml: it must refuse rather than drop the line it cannot read
    assert message in one_line_error(run_csr("init", cwd=tmp_path))
    assert toml.read_text() == before
