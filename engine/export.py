"""`csr export`: an iteration's pair set as LLaVA JSON, TRL JSONL or Parquet."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import Engine, text

from csr.engine.errors import CsrError
from csr.storage import curation

FORMATS = ("llava-json", "trl-jsonl", "parquet")
_SUFFIX = {"llava-json": ".json", "trl-jsonl": ".jsonl", "parquet": ".parquet"}

# Per-response sums of the raw scores along each leaf's path, for the Parquet export.
_PATH_SCORES = """
WITH RECURSIVE up(leaf_id, prompt_id, parent_node, r_t, r_i, reward, n) AS (
    SELECT id, prompt_id, parent_node, r_t, r_i, reward, 1 FROM candidates WHERE id IN ({ids})
    UNION ALL
    SELECT up.leaf_id, up.prompt_id, c.parent_node, up.r_t + c.r_t, up.r_i + c.r_i, up.reward + c.reward, up.n + 1
    FROM up JOIN candidates c
      ON c.iteration = :iteration AND c.prompt_id = up.prompt_id AND c.node = up.parent_node
)
SELECT leaf_id, r_t, r_i, reward, n FROM up WHERE parent_node IS NULL
"""


def export_pairs(engine: Engine, iteration: int, fmt: str, out: Path | None, pair_set: str | None = None) -> tuple[Path, int]:
    if fmt not in FORMATS:
        raise CsrError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
        ps = curation.pair_set(conn, iteration, pair_set)
        if ps is None:
            which = f"named {pair_set!r}" if pair_set else "(run `csr curate --iter N` first)"
            raise CsrError(f"iteration {iteration} has no pair set {which}")
        rows = curation.training_rows(conn, ps.id)
        scores = _path_scores(conn, iteration, rows) if fmt == "parquet" else {}
    out = out or Path(f"pairs-iter{iteration}-{ps.name}{_SUFFIX[fmt]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "llava-json":
        out.write_text(json.dumps([_llava(r) for r in rows], indent=1))
    elif fmt == "trl-jsonl":
        with out.open("w") as handle:
            for r in rows:
                handle.write(json.dumps(_trl(r)) + "\n")
    else:
        _parquet(out, rows, scores, iteration, ps)
    return out, len(rows)


def _image(r: dict) -> str:
    return str(Path(r["image_root"]) / r["image_path"])


def _llava(r: dict) -> dict:
    human = {"from": "human", "value": "<image>\n" + r["prompt"]}
    return {
        "id": r["external_id"],
        "image": r["image_path"],
        "conversations": [human, {"from": "gpt", "value": r["chosen_text"]}],
        "rejected_conversations": [human, {"from": "gpt", "value": r["rejected_text"]}],
    }


def _trl(r: dict) -> dict:
    def assistant(text_: str) -> list[dict]:
        return [{"role": "assistant", "content": [{"type": "text", "text": text_}]}]

    return {
        "id": r["external_id"],
        "images": [_image(r)],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["prompt"]}]}],
        "chosen": assistant(r["chosen_text"]),
        "rejected": assistant(r["rejected_text"]),
    }


def _path_scores(conn, iteration: int, rows: list[dict]) -> dict[int, dict]:
    leaf_ids = sorted({r["chosen_candidate_id"] for r in rows} | {r["rejected_candidate_id"] for r in rows})
    found: dict[int, dict] = {}
    for start in range(0, len(leaf_ids), 500):
        chunk = leaf_ids[start : start + 500]
        sql = _PATH_SCORES.format(ids=",".join(str(int(i)) for i in chunk))
        for row in conn.execute(text(sql), {"iteration": iteration}).mappings():
            found[row["leaf_id"]] = dict(row)
    return found


def _parquet(out: Path, rows: list[dict], scores: dict[int, dict], iteration: int, ps) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = []
    for r in rows:
        chosen, rejected = scores[r["chosen_candidate_id"]], scores[r["rejected_candidate_id"]]
        records.append(
            {
                "iteration": iteration,
                "pair_set": ps.name,
                "preset": ps.preset,
                "lambda": ps.params.get("lambda"),
                "prompt_id": r["prompt_id"],
                "external_id": r["external_id"],
                "image": _image(r),
                "prompt": r["prompt"],
                "chosen": r["chosen_text"],
                "rejected": r["rejected_text"],
                "chosen_reward": r["chosen_reward"],
                "rejected_reward": r["rejected_reward"],
                "margin": r["chosen_reward"] - r["rejected_reward"],
                "chosen_sentences": chosen["n"],
                "rejected_sentences": rejected["n"],
                "chosen_r_t_sum": chosen["r_t"],
                "rejected_r_t_sum": rejected["r_t"],
                "chosen_r_i_sum": chosen["r_i"],
                "rejected_r_i_sum": rejected["r_i"],
                "chosen_search_reward_sum": chosen["reward"],
                "rejected_search_reward_sum": rejected["reward"],
                "chosen_candidate_id": r["chosen_candidate_id"],
                "rejected_candidate_id": r["rejected_candidate_id"],
            }
        )
    pq.write_table(pa.Table.from_pylist(records), out)
