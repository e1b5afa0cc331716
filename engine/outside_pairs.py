"""Training on a pair set imported from elsewhere (`csr pairs import`).

`csr train --iter N --pair-set NAME` takes an imported pair set when
iteration N has no pair set of that name. Iteration N is then recorded with
method `outside` (nothing generated), so the training run, the model
version and `csr lineage` name the pair set and the file it came from. Such
pairs have no tree: their texts are tokenised here as the trainer tokenises
hand-made pairs (`completion_ids`: the text, then EOS), and they carry no
reference log-probs, so the trainer computes the reference itself.
"""

from __future__ import annotations

from csr.storage import TRAINING_SELECTION, OrderError, Store

SOURCE = "import"


def imported_for(store: Store, iteration: int, name: str | None):
    """The imported pair set `name` when iteration N has no pair set of its own
    by that name (None otherwise); iteration N is started as an outside one."""
    if not name:
        return None
    generated = store.iteration(iteration) is not None
    if generated and store.pair_set(iteration, name) is not None:
        return None
    imported = store.imported_pair_set(name)
    if imported is None:
        if not generated:
            raise OrderError(f"iteration {iteration} has not been generated, and no pair set named {name!r} was "
                             f"imported: run `csr generate --iter {iteration}` or `csr pairs import`")
        return None
    store.start_outside_iteration(iteration, {
        "method": "outside",
        "pair_set": imported.name,
        "pair_set_hash": imported.result_hash,
        "origin": imported.origin,
        "policy_version": iteration - 1,
    })
    return imported


def selection_of(pair_set) -> str:
    """The trainer's query, recorded with the run."""
    return pair_set.selection_sql if pair_set.source == SOURCE else TRAINING_SELECTION


def tokenised(rows: list[dict], policy_path: str) -> list[dict]:
    """Imported rows with token ids and counts from the policy's tokenizer."""
    if not rows:
        return rows
    from transformers import AutoTokenizer

    from csr.engine.train.dpo_data import completion_ids

    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    out = []
    for row in rows:
        chosen = completion_ids(tokenizer, row["chosen_text"])
        rejected = completion_ids(tokenizer, row["rejected_text"])
        out.append({**row, "chosen_token_ids": chosen, "rejected_token_ids": rejected,
                    "chosen_token_count": len(chosen), "rejected_token_count": len(rejected)})
    return out
