"""Schema migrations: released schemas stay frozen, stores made by them upgrade
to head with every row intact, and the models agree with the migrations."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, create_engine, insert, select, text
from sqlalchemy.engine import make_url

from csr.storage import migrate
from csr.storage.db import make_engine
from csr.storage.errors import StoreError
from csr.storage.models import Base
from tests.assets.freeze_schema import asset_path, frozen_revisions, postgresql_ddl, sqlite_ddl
from tests.cli_runner import invoke_csr
from tests.db_backends import fingerprint

HEAD = migrate.head_revision()
T0 = datetime.fromisoformat("2026-03-01T09:30:15.123456")  # naive UTC, as the store keeps it


def _driver(url: str) -> str:
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False) if parsed.drivername == "postgresql" else url


def _schema_differences(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def _rows_by_key(url: str) -> dict[str, dict[tuple, dict]]:
    """table -> primary key -> row (column -> value) for every table but alembic_version."""
    engine = create_engine(_driver(url))
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        snapshot = {}
        with engine.connect() as conn:
            for name, table in metadata.tables.items():
                if name == "alembic_version":
                    continue
                keys = [c.name for c in table.primary_key.columns]
                snapshot[name] = {
                    tuple(row[k] for k in keys): dict(row) for row in conn.execute(select(table)).mappings()
                }
        return snapshot
    finally:
        engine.dispose()


# -- data for a store at revision 0001: every table, rows that reference each other -------


def _fill_0001(url: str) -> None:
    engine = make_engine(url)  # foreign keys on: the data must be consistent
    metadata = MetaData()
    metadata.reflect(engine)
    t = metadata.tables
    later = [T0 + timedelta(minutes=m) for m in range(60)]
    with engine.begin() as conn:
        conn.execute(insert(t["images"]), [
            {"id": 1, "sha256": "3f" * 32, "root": "/data/coco/train2014", "rel_path": "COCO_train2014_000000000009.jpg",
             "size_bytes": 161_811, "width": 640, "height": 480},
            {"id": 2, "sha256": "a0" * 32, "root": "/data/coco/train2014", "rel_path": "sub dir/ünïcode.png",
             "size_bytes": 5_000_000_000, "width": 1, "height": 1},
            {"id": 3, "sha256": "07" * 32, "root": "/data/vg", "rel_path": "2345.jpg", "size_bytes": 88, "width": 336, "height": 336},
        ])
        conn.execute(insert(t["prompts"]), [
            {"id": 1, "external_id": "000000000009", "image_id": 1, "text": "What is on the plate?",
             "source": "llava_instruct_150k.json", "created_at": T0},
            {"id": 2, "external_id": "000000000009-2", "image_id": 1, "text": "Describe the image in detail.",
             "source": "llava_instruct_150k.json", "created_at": T0},
            {"id": 3, "external_id": "vg-2345", "image_id": 3, "text": 'Is there a "dog"?\nAnswer briefly.',
             "source": "extra.jsonl", "created_at": later[1]},
            {"id": 4, "external_id": "ü-4", "image_id": 2, "text": "¿Qué hay en la imagen?", "source": "extra.jsonl",
             "created_at": later[1]},
        ])
        conn.execute(insert(t["model_versions"]), [
            {"version": 0, "parent_version": None, "iteration": None, "path": "llava-hf/llava-1.5-7b-hf",
             "base_model": "llava-hf/llava-1.5-7b-hf", "clip_model": "ViT-L-14-336", "clip_pretrained": "openai",
             "weights_hash": None, "lora_config": None, "metrics": None, "created_at": T0},
            {"version": 1, "parent_version": 0, "iteration": 1, "path": "/study/models/v1",
             "base_model": "llava-hf/llava-1.5-7b-hf", "clip_model": "ViT-L-14-336", "clip_pretrained": "openai",
             "weights_hash": "be" * 32, "lora_config": {"r": 128, "alpha": 256, "target_modules": ["q_proj", "v_proj"]},
             "metrics": {"train_loss": 0.4213, "reward_margin": [0.1, 0.25]}, "created_at": later[50]},
        ])
        conn.execute(insert(t["iterations"]), [
            {"number": 1, "policy_version": 0, "preset": "paper", "config": {"beam": 5, "lambda": 0.9, "seed": 7},
             "config_hash": "c1" * 32, "state": "trained", "created_at": later[2]},
            {"number": 2, "policy_version": 1, "preset": "paper", "config": {"beam": 5, "lambda": 0.9, "seed": 8},
             "config_hash": "c2" * 32, "state": "generating", "created_at": later[51]},
        ])
        conn.execute(insert(t["workers"]), [
            {"id": 1, "iteration": 1, "host": "gpu-a", "pid": 4242, "device": "cuda:0", "started_at": later[3],
             "heartbeat_at": later[20], "stopped_at": later[21]},
            {"id": 2, "iteration": 2, "host": "gpu-b", "pid": 77, "device": "cuda:1", "started_at": later[52],
             "heartbeat_at": later[55], "stopped_at": None},
        ])
        conn.execute(insert(t["work_items"]), [
            *({"id": pid, "iteration": 1, "prompt_id": pid, "state": "done", "worker_id": 1, "lease_expires_at": None,
               "attempts": 1, "last_error": None, "updated_at": later[10 + pid]} for pid in (1, 2, 3, 4)),
            {"id": 5, "iteration": 2, "prompt_id": 1, "state": "claimed", "worker_id": 2, "lease_expires_at": later[59],
             "attempts": 2, "last_error": None, "updated_at": later[53]},
            {"id": 6, "iteration": 2, "prompt_id": 2, "state": "failed", "worker_id": None, "lease_expires_at": None,
             "attempts": 3, "last_error": "CUDA out of memory\nTraceback ...", "updated_at": later[54]},
            {"id": 7, "iteration": 2, "prompt_id": 3, "state": "pending", "worker_id": None, "lease_expires_at": None,
             "attempts": 0, "last_error": None, "updated_at": later[51]},
        ])
        candidates = []
        for prompt_id in (1, 2):
            for node, (parent, depth, sibling) in enumerate([(None, 0, 0), (None, 0, 1), (0, 1, 0), (0, 1, 1), (1, 1, 0)]):
                candidates.append({
                    "id": (prompt_id - 1) * 5 + node + 1, "iteration": 1, "prompt_id": prompt_id, "node": node,
                    "parent_node": parent, "depth": depth, "sibling_index": sibling,
                    "text": f"The plate holds {node} slices of pizza." if node != 4 else "There is a dog, and a 🍕.",
                    "token_count": 9 + node, "logprob_sum": -3.25 - node / 7, "r_t": -0.361 - node / 100,
                    "r_i": 0.2875 + node / 1000, "reward": 0.9 * -0.361 + 0.1 * 0.2875,
                    "cumulative_reward": -1.5e-3 * (node + 1), "is_final": depth == 1, "is_kept": node in (0, 2),
                    "exclusion_reason": None if node in (0, 2) else "below_beam",
                })
        conn.execute(insert(t["candidates"]), candidates)
        conn.execute(insert(t["pair_sets"]), [
            {"id": 1, "iteration": 1, "name": "default", "preset": "paper",
             "params": {"policy": "best_vs_worst", "min_margin": 0.0}, "selection_sql": "SELECT ... FROM candidates",
             "result_hash": "5e" * 32, "is_default": True, "created_at": later[30]},
            {"id": 2, "iteration": 1, "name": "margin>0.01", "preset": "paper", "params": {"min_margin": 0.01},
             "selection_sql": "SELECT 1", "result_hash": "5f" * 32, "is_default": False, "created_at": later[31]},
        ])
        conn.execute(insert(t["pairs"]), [
            {"id": 1, "pair_set_id": 1, "prompt_id": 1, "chosen_candidate_id": 3, "rejected_candidate_id": 5,
             "chosen_text": "The plate holds 2 slices of pizza.", "rejected_text": "There is a dog, and a 🍕.",
             "chosen_reward": -0.0045, "rejected_reward": -0.0075, "margin": 0.003},
            {"id": 2, "pair_set_id": 1, "prompt_id": 2, "chosen_candidate_id": 8, "rejected_candidate_id": 10,
             "chosen_text": "a", "rejected_text": "b", "chosen_reward": 1.0, "rejected_reward": -1.0, "margin": 2.0},
            {"id": 3, "pair_set_id": 2, "prompt_id": 1, "chosen_candidate_id": 3, "rejected_candidate_id": 4,
             "chosen_text": "c", "rejected_text": "d", "chosen_reward": 0.5, "rejected_reward": 0.25, "margin": 0.25},
        ])
        conn.execute(insert(t["training_runs"]), [
            {"id": 1, "iteration": 1, "pair_set_id": 1, "selection_sql": "SELECT ... FROM pairs WHERE pair_set_id = 1",
             "pairs_hash": "9a" * 32, "hyperparams": {"lr": 1e-6, "beta": 0.1, "epochs": 1},
             "metrics": [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.52}], "state": "done",
             "checkpoint_dir": "/study/runs/1", "output_version": 1, "started_at": later[32],
             "finished_at": later[49]},
        ])
    engine.dispose()


def _fill_0002(url: str, fingerprinted: bool = False) -> None:
    """0001's rows, the finish reasons 0002 added, and CHAIR evaluations in the
    0002 layout (one row per version and benchmark, details optional); with
    `fingerprinted`, as 0004 keys them (a fingerprint and metrics each)."""
    _fill_0001(url)
    engine = make_engine(url)
    metadata = MetaData()
    metadata.reflect(engine)
    t = metadata.tables
    with engine.begin() as conn:
        conn.execute(text("UPDATE candidates SET finish_reason = 'eos' WHERE is_final"))
        conn.execute(text("UPDATE candidates SET finish_reason = 'sentence_end' WHERE NOT is_final"))
        conn.execute(insert(t["evaluations"]), [
            {"id": 1, "model_version": 0, "benchmark": "demo-world-heldout", "n_responses": 100,
             "chair_s": 0.41, "chair_i": 0.2125, "mean_words": 17.5,
             "details": {"recall": 0.8, "examples": ["There is a red circle."]}, "created_at": T0},
            {"id": 2, "model_version": 1, "benchmark": "demo-world-heldout", "n_responses": 100,
             "chair_s": 0.3, "chair_i": 0.15, "mean_words": 16.0, "details": None, "created_at": T0},
            {"id": 3, "model_version": 1, "benchmark": "chair:instances.json", "n_responses": 2,
             "chair_s": 0.5, "chair_i": 0.25, "mean_words": 40.0, "details": {}, "created_at": T0},
        ] if not fingerprinted else [
            {"id": 1, "model_version": 0, "benchmark": "demo-world-heldout", "n_responses": 100,
             "chair_s": 0.41, "chair_i": 0.2125, "mean_words": 17.5, "details": None, "created_at": T0,
             "fingerprint": "a" * 64, "dataset_hash": "c" * 64, "settings": {"benchmark": "chair"},
             "metrics": {"chair_s": 0.41}, "items": None},
            {"id": 2, "model_version": 1, "benchmark": "pope:adversarial", "n_responses": 3,
             "chair_s": None, "chair_i": None, "mean_words": None, "details": None, "created_at": T0,
             "fingerprint": "b" * 64, "dataset_hash": None, "settings": None, "metrics": {"accuracy": 0.5},
             "items": [{"answer": "yes"}]},
        ])
    engine.dispose()


def _filled_at_0004(store_url: str):
    """An engine on a store filled at revision 0004, not yet upgraded further."""
    engine = make_engine(store_url)
    migrate.upgrade(engine, "0004")
    engine.dispose()
    _fill_0004(store_url)
    return make_engine(store_url)


def test_0006_records_the_csr_method_for_existing_iterations_and_pair_sets(store_url):
    engine = _filled_at_0004(store_url)
    try:
        migrate.upgrade(engine)
        with engine.connect() as conn:
            methods = conn.execute(text("SELECT DISTINCT method FROM iterations")).scalars().all()
            sources = conn.execute(text("SELECT DISTINCT source FROM pair_sets")).scalars().all()
            origins = conn.execute(text("SELECT origin FROM pair_sets")).scalars().all()
        assert methods == ["csr"] and sources == ["csr"] and set(origins) == {None}
    finally:
        engine.dispose()


def test_0004_gives_old_evaluations_a_fingerprint_and_their_metrics(store_url):
    engine = make_engine(store_url)
    migrate.upgrade(engine, "0002")
    engine.dispose()
    _fill_0002(store_url)
    engine = make_engine(store_url)
    try:
        migrate.upgrade(engine)
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT model_version, benchmark, fingerprint, metrics FROM evaluations ORDER BY id"
            )).all()
    finally:
        engine.dispose()
    fingerprints = [row.fingerprint for row in rows]
    assert all(len(f) == 64 for f in fingerprints)
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]  # one per benchmark name
    metrics = [row.metrics if isinstance(row.metrics, dict) else json.loads(row.metrics) for row in rows]
    assert metrics[0] == {"chair_s": 0.41, "chair_i": 0.2125, "mean_words": 17.5, "n_responses": 100,
                          "recall": 0.8}
    assert metrics[1] == {"chair_s": 0.3, "chair_i": 0.15, "mean_words": 16.0, "n_responses": 100}


def _fill_0003(url: str, fingerprinted: bool = False) -> None:
    """0002's rows, what 0003 added to candidates, and responses as the search writes them."""
    _fill_0002(url, fingerprinted)
    engine = make_engine(url)
    metadata = MetaData()
    metadata.reflect(engine)
    t = metadata.tables
    with engine.begin() as conn:
        for cid in range(1, 11):
            conn.execute(t["candidates"].update().where(t["candidates"].c.id == cid).values(
                token_ids=[cid, 13, 2], beam_score=-0.5 * cid, text_rank=0.0, image_rank=0.0))
        conn.execute(insert(t["responses"]), [
            {"id": n, "iteration": 1, "prompt_id": prompt_id, "leaf_node": 2, "leaf_candidate_id": leaf,
             "text": "The plate holds 0 slices of pizza.The plate holds 2 slices of pizza.",
             "token_ids": [1, 13, 2, 3, 13, 2], "has_token_ids": True, "token_count": 6, "sentence_count": 2,
             "logprob_sum": -6.5, "r_t_sum": 0.002, "r_i_sum": 0.58, "text_rank_sum": 0.0, "image_rank_sum": 0.0,
             "is_truncated": False}
            for n, (prompt_id, leaf) in enumerate(((1, 3), (2, 8)), start=1)
        ])
    engine.dispose()


def _fill_0004(url: str) -> None:
    """0003's rows, with evaluations as 0004 keys them."""
    _fill_0003(url, fingerprinted=True)


FILLERS = {"0001": _fill_0001, "0002": _fill_0002, "0003": _fill_0003, "0004": _fill_0004}
OLDER_FROZEN = [rev for rev in frozen_revisions() if rev != HEAD]


def _sqlite_store_from_asset(path: Path, revision: str) -> str:
    connection = sqlite3.connect(path)
    connection.executescript(asset_path(revision, "sqlite").read_text())
    connection.execute("INSERT INTO alembic_version (version_num) VALUES (?)", (revision,))
    connection.commit()
    connection.close()
    return f"sqlite:///{path}"


def _postgres_store_from_asset(url: str, revision: str) -> str:
    with psycopg.connect(make_url(url).set(drivername="postgresql").render_as_string(hide_password=False),
                         autocommit=True) as connection:
        connection.execute(asset_path(revision, "postgresql").read_text())
    return url


def _check_upgrade_keeps_every_row(url: str, revision: str) -> None:
    assert revision in FILLERS, f"add a function filling every table of the frozen schema {revision}"
    FILLERS[revision](url)
    before = _rows_by_key(url)
    assert all(before.values()), f"every table must hold rows: {[n for n, r in before.items() if not r]}"

    done = invoke_csr("db", "upgrade", db=url)
    assert done.returncode == 0, done.stderr
    assert f"upgraded from schema {revision} to {HEAD}" in done.stdout

    after = _rows_by_key(url)
    for table, rows in before.items():
        assert set(after[table]) == set(rows), f"{table}: rows lost or added"
        for key, row in rows.items():
            kept = {column: after[table][key][column] for column in row}
            assert kept == row, f"{table} {key} changed"
    assert _schema_differences(url) == []
    engine = make_engine(url)
    try:
        assert migrate.current_revision(engine) == HEAD
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
                assert conn.execute(text("PRAGMA integrity_check")).scalar_one() == "ok"
    finally:
        engine.dispose()

    if revision < "0003":
        _check_responses_rebuilt_from_the_trees(url)
    if revision < "0005":
        # whether an old candidate's text is its exact increment is unknown
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT DISTINCT text_exact FROM candidates")).all() == [(None,)]
        finally:
            engine.dispose()
    shown = invoke_csr("status", "--json", db=url)
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["prompts"] == 4
    assert [it["iteration"] for it in summary["iterations"]] == [1, 2]
    assert [v["version"] for v in summary["model_versions"]] == [0, 1]
    second = summary["iterations"][1]
    assert (second["claimed"], second["failed"], second["pending"], second["done"]) == (1, 1, 2, 0)


def _check_responses_rebuilt_from_the_trees(url: str) -> None:
    """Revision 0003 rebuilds one response per kept final candidate from the
    stored texts, flagged as having no token ids, with the sibling ranks."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            kept = conn.execute(text(
                "SELECT id, prompt_id FROM candidates WHERE is_final AND exclusion_reason IS NULL ORDER BY id"
            )).all()
            responses = conn.execute(text(
                "SELECT leaf_candidate_id, prompt_id, text, has_token_ids, token_ids, sentence_count, token_count, "
                "text_rank_sum, image_rank_sum FROM responses ORDER BY leaf_candidate_id"
            )).all()
            assert [(r.leaf_candidate_id, r.prompt_id) for r in responses] == [tuple(k) for k in kept]
            for r in responses:
                assert not r.has_token_ids and r.token_ids is None
                # the fixture's leaf node 2 hangs under node 0: two sentences, both ranked first of their siblings
                assert r.text == "The plate holds 0 slices of pizza.The plate holds 2 slices of pizza."
                assert (r.sentence_count, r.token_count) == (2, 9 + 11)
                # nodes 0 and 2 are each the only scored one among their siblings (the
                # others are excluded): rank 1 of 1, stored as 1 - 1/1
                assert (r.text_rank_sum, r.image_rank_sum) == (0.0, 0.0)
    finally:
        engine.dispose()


# -- tests ---------------------------------------------------------------------------------


QUEUE_INDEXES = {"ix_work_items_next", "ix_work_items_attempts", "ix_work_items_holder"}


def test_0007_adds_the_indexes_the_queue_needs(store_url):
    from sqlalchemy import inspect

    engine = make_engine(store_url)
    try:
        migrate.upgrade(engine, "0004")
        assert not QUEUE_INDEXES & {ix["name"] for ix in inspect(engine).get_indexes("work_items")}
        migrate.upgrade(engine)
        indexes = {ix["name"]: ix["column_names"] for ix in inspect(engine).get_indexes("work_items")}
    finally:
        engine.dispose()
    assert {name: indexes.get(name) for name in QUEUE_INDEXES} == {
        "ix_work_items_next": ["iteration", "state", "id"],
        "ix_work_items_attempts": ["iteration", "state", "attempts"],
        "ix_work_items_holder": ["state", "worker_id"],
    }


def test_0009_counts_the_words_of_stored_pairs_and_covers_their_response_figures(store_url):
    from sqlalchemy import inspect

    from csr.storage.trees import word_count

    engine = _filled_at_0004(store_url)
    try:
        migrate.upgrade(engine)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT chosen_text, rejected_text, chosen_words, rejected_words FROM pairs")).all()
        indexes = {ix["name"]: ix["column_names"] for ix in inspect(engine).get_indexes("responses")}
    finally:
        engine.dispose()
    assert rows and all((w1, w2) == (word_count(t1), word_count(t2)) for t1, t2, w1, w2 in rows)
    assert word_count("The plate holds 2 slices of pizza.") == 7
    assert indexes["ix_responses_pair_figures"] == [
        "leaf_candidate_id", "sentence_count", "r_t_sum", "r_i_sum", "token_count", "word_count"]


def test_released_schemas_are_frozen():
    assert {"0001", "0002"} <= set(frozen_revisions())
    assert migrate.known_revisions() >= set(frozen_revisions())


@pytest.mark.parametrize("revision", frozen_revisions())
def test_migrations_still_produce_the_frozen_sqlite_schema(revision):
    # A released revision must never be edited: stores in the field were made by it.
    assert sqlite_ddl(revision) == asset_path(revision, "sqlite").read_text()


@pytest.mark.parametrize("revision", frozen_revisions())
def test_migrations_still_produce_the_frozen_postgresql_schema(revision):
    assert postgresql_ddl(revision) == asset_path(revision, "postgresql").read_text()


@pytest.mark.parametrize("revision", OLDER_FROZEN)
def test_sqlite_store_upgrades_from_frozen_schema_with_all_rows(tmp_path, revision):
    url = _sqlite_store_from_asset(tmp_path / "old.db", revision)
    refused = invoke_csr("status", db=url)
    assert refused.returncode != 0 and "csr db upgrade" in refused.stderr
    _check_upgrade_keeps_every_row(url, revision)


@pytest.mark.postgres
@pytest.mark.parametrize("revision", OLDER_FROZEN)
def test_postgresql_store_upgrades_from_frozen_schema_with_all_rows(postgres_url, revision):
    url = _postgres_store_from_asset(postgres_url, revision)
    refused = invoke_csr("status", db=url)
    assert refused.returncode != 0 and "csr db upgrade" in refused.stderr
    _check_upgrade_keeps_every_row(url, revision)


def test_models_agree_with_migrations_at_head(store_url):
    engine = make_engine(store_url)
    migrate.upgrade(engine)
    engine.dispose()
    assert _schema_differences(store_url) == []


def test_models_differing_from_migrations_are_detected(store_url):
    """The agreement check above can fail: a store one revision behind differs from the models."""
    engine = make_engine(store_url)
    migrate.upgrade(engine, "0001")
    engine.dispose()
    assert _schema_differences(store_url) != []


def test_upgrade_of_a_store_at_head_changes_nothing(store_url):
    engine = make_engine(store_url)
    migrate.upgrade(engine)
    engine.dispose()
    done = invoke_csr("db", "upgrade", db=store_url)
    assert done.returncode == 0, done.stderr
    assert f"already at schema {HEAD}" in done.stdout
    revision = json.loads(invoke_csr("db", "current", "--json", db=store_url).stdout)
    assert (revision["current"], revision["head"]) == (HEAD, HEAD)


# -- SQLite batch migrations that recreate referenced tables ------------------------------

_TEST_REVISION = '''"""test only: {title}"""
from alembic import op

revision = "{revision}"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
{body}


def downgrade() -> None:
    pass
'''


def _migrations_with(tmp_path: Path, monkeypatch, title: str, body: str) -> str:
    """A copy of the migrations with one more revision after head, used by storage.migrate."""
    import shutil

    copy = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    revision = "9001"
    (copy / "versions" / f"{revision}_test.py").write_text(
        _TEST_REVISION.format(title=title, revision=revision, down=HEAD, body=body)
    )
    monkeypatch.setattr(migrate, "MIGRATIONS_DIR", copy)
    return revision


def _filled_head_store(tmp_path: Path) -> str:
    url = _sqlite_store_from_asset(tmp_path / "store.db", "0001")
    _fill_0001(url)
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    return url


def test_sqlite_batch_migration_may_recreate_referenced_tables(tmp_path, monkeypatch):
    """Copy-and-rename of tables that others reference (pairs -> pair_sets, candidates,
    prompts) must work on a full store and keep every row and reference."""
    url = _filled_head_store(tmp_path)
    before = _rows_by_key(url)
    body = "\n".join(
        f'    with op.batch_alter_table("{table}", recreate="always"):\n        pass'
        for table in ("pair_sets", "candidates", "prompts", "model_versions")
    )
    revision = _migrations_with(tmp_path, monkeypatch, "recreate referenced tables", body)
    engine = make_engine(url)
    try:
        assert migrate.upgrade(engine) == (HEAD, revision)
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA foreign_keys")).scalar_one() == 1  # back on for every later use
            assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
    finally:
        engine.dispose()
    assert _rows_by_key(url) == before


def test_sqlite_migration_that_breaks_references_is_refused(tmp_path, monkeypatch):
    url = _filled_head_store(tmp_path)
    _migrations_with(tmp_path, monkeypatch, "orphan pairs", '    op.execute("DELETE FROM pair_sets WHERE id = 2")')
    engine = make_engine(url)
    engine.dispose()
    before = fingerprint(url)
    engine = make_engine(url)
    try:
        with pytest.raises(StoreError, match="broken reference.*pairs.*nothing was changed"):
            migrate.upgrade(engine)
        assert migrate.current_revision(engine) == HEAD
    finally:
        engine.dispose()
    assert fingerprint(url) == before
