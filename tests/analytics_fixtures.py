"""Synthetic stores for the analytics and report tests.

A study here is small enough to recompute every figure in plain Python:
`fill_study` writes it through the store API and returns what it wrote, so a
test derives its expectations from these objects, never from the store.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import Connection, Engine, insert, select

from csr.storage.models import Candidate, Evaluation, Image, Iteration, ModelVersion, Pair, PairSet
from csr.storage.prompts import insert_images, insert_prompts
from csr.storage.store import create_store
from csr.storage.trees import insert_candidates
from tests.db_backends import fingerprint, sqlite_head_store

NOW = datetime(2025, 1, 1, 12, tzinfo=UTC).replace(tzinfo=None)  # the store keeps naive UTC
WORDS = ("cat", "red", "mat", "sits", "on", "a", "the", "blue", "ball", "near", "window", "small")
EXCLUSION_REASONS = ("repeated_word", "too_short", "non_latin")
LAMBDA = 0.9


@dataclass
class Tree:
    iteration: int
    prompt_id: int
    rows: list[dict]
    ids: dict[int, int] = field(default_factory=dict)  # node -> candidates.id

    def path(self, node: int) -> list[dict]:
        """Sentences from depth 0 down to `node`."""
        by_node = {row["node"]: row for row in self.rows}
        out = []
        current: int | None = node
        while current is not None:
            out.append(by_node[current])
            current = by_node[current]["parent_node"]
        return out[::-1]

    def text(self, node: int) -> str:
        return "".join(row["text"] for row in self.path(node))

    def finals(self) -> list[dict]:
        return [row for row in self.rows if row["is_final"]]


@dataclass
class StudyPair:
    iteration: int
    prompt_id: int
    pair_set: str
    is_default: bool
    chosen: dict
    rejected: dict
    chosen_text: str
    rejected_text: str
    chosen_node_path: list[dict]
    rejected_node_path: list[dict]

    @property
    def margin(self) -> float:
        return self.chosen["cumulative_reward"] - self.rejected["cumulative_reward"]


@dataclass
class Study:
    prompt_ids: list[int]
    image_dir: Path
    trees: list[Tree] = field(default_factory=list)
    pairs: list[StudyPair] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)


def random_tree(rng: random.Random, width: int = 3, max_depth: int = 4) -> list[dict]:
    """A search tree in generation order: finals, excluded candidates, a last level all final."""
    rows: list[dict] = []
    frontier: list[dict | None] = [None]
    for depth in range(max_depth):
        next_frontier: list[dict] = []
        for parent in frontier:
            for sibling in range(width):
                words = rng.randint(2, 7)
                # as generated: a sentence after the first carries its leading space
                text = (" " if depth else "") + " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."
                token_count = words + 1
                logprob_sum = -rng.uniform(0.5, 6.0)
                r_t = 2.718281828 ** logprob_sum
                r_i = rng.uniform(5.0, 35.0)
                reward = LAMBDA * r_i + (1 - LAMBDA) * r_t
                excluded = rng.random() < 0.12
                last = depth == max_depth - 1
                is_final = not excluded and (last or rng.random() < 0.2)
                row = {
                    "node": len(rows),
                    "parent_node": parent["node"] if parent else None,
                    "depth": depth,
                    "sibling_index": sibling,
                    "text": text,
                    "token_count": token_count,
                    "logprob_sum": logprob_sum,
                    "r_t": r_t,
                    "r_i": r_i,
                    "reward": reward,
                    "cumulative_reward": reward + (parent["cumulative_reward"] if parent else 0.0),
                    "is_final": is_final,
                    "is_kept": False,
                    "exclusion_reason": rng.choice(EXCLUSION_REASONS) if excluded else None,
                    "finish_reason": "eos" if is_final else "sentence_end",
                }
                rows.append(row)
                if not excluded and not is_final:
                    next_frontier.append(row)
        # Keep the best and the worst, as the sentence-level beam search does.
        next_frontier.sort(key=lambda r: r["cumulative_reward"])
        frontier = next_frontier[:2] + next_frontier[-2:] if len(next_frontier) > 4 else next_frontier
        for row in frontier:
            row["is_kept"] = True
        if not frontier:
            break
    return rows


def write_images(directory: Path, count: int) -> list[dict]:
    directory.mkdir(parents=True, exist_ok=True)
    images = []
    for index in range(count):
        name = f"img_{index:03d}.png"
        colour = ((index * 70) % 256, (index * 130) % 256, (index * 200) % 256)
        PILImage.new("RGB", (48, 32), colour).save(directory / name)
        images.append({
            "sha256": f"{index:064x}",
            "root": str(directory),
            "rel_path": name,
            "size_bytes": (directory / name).stat().st_size,
            "width": 48,
            "height": 32,
        })
    return images


def fill_study(
    engine: Engine,
    image_dir: Path,
    *,
    prompts: int = 4,
    iterations: int = 2,
    seed: int = 7,
    evaluations: bool = True,
) -> Study:
    """Prompts, iterations with search trees, a default and an extra pair set, CHAIR rows."""
    rng = random.Random(seed)
    with engine.begin() as conn:
        insert_images(conn, write_images(image_dir, prompts))
        image_ids = list(conn.execute(select(Image.id).order_by(Image.id)).scalars())
        insert_prompts(conn, [
            {"external_id": f"p{i}", "image_id": image_ids[i], "text": f"Describe image {i} in detail.", "source": "synthetic"}
            for i in range(prompts)
        ])
        prompt_ids = [row[0] for row in conn.exec_driver_sql("SELECT id FROM prompts ORDER BY id")]
        for version in range(iterations + 1):
            conn.execute(insert(ModelVersion).values(
                version=version, parent_version=version - 1 if version else None,
                iteration=version or None, path=f"models/v{version}", base_model="tiny",
                clip_model="tiny-clip", clip_pretrained=None, created_at=NOW,
            ))
        for number in range(1, iterations + 1):
            conn.execute(insert(Iteration).values(
                number=number, policy_version=number - 1, preset="paper", config={"lambda": LAMBDA},
                config_hash="0" * 64, state="generated", created_at=NOW,
            ))
    study = Study(prompt_ids=prompt_ids, image_dir=image_dir)
    for number in range(1, iterations + 1):
        for prompt_id in prompt_ids:
            tree = Tree(number, prompt_id, random_tree(rng))
            # One transaction per tree, as the generation workers write.
            with engine.begin() as conn:
                insert_candidates(conn, number, prompt_id, tree.rows)
                tree.ids = dict(conn.execute(
                    select(Candidate.node, Candidate.id)
                    .where(Candidate.iteration == number, Candidate.prompt_id == prompt_id)
                ).all())
            study.trees.append(tree)
    with engine.begin() as conn:
        for number in range(1, iterations + 1):
            trees = [t for t in study.trees if t.iteration == number]
            _add_pair_set(conn, study, number, "default", True, trees, rule="sum")
            # A second set that `csr stats` must ignore: only the first two prompts.
            _add_pair_set(conn, study, number, "first-two", False, trees[:2], rule="first-last")
        if evaluations:
            for version, (chair_s, chair_i) in enumerate([(0.5, 0.125), (0.25, 0.0625)][: iterations]):
                row = {"model_version": version, "benchmark": "synthetic-chair", "n_responses": 20,
                       "chair_s": chair_s, "chair_i": chair_i, "mean_words": 30.0 + version}
                conn.execute(insert(Evaluation).values(**row, details=None, created_at=NOW,
                                                       fingerprint=f"{version:064d}"))
                study.evaluations.append(row)
    return study


def _add_pair_set(conn: Connection, study: Study, iteration: int, name: str, is_default: bool,
                  trees: list[Tree], *, rule: str) -> None:
    pair_set_id = conn.execute(insert(PairSet).values(
        iteration=iteration, name=name, preset="paper", params={"rule": rule}, selection_sql="-- synthetic",
        result_hash="0" * 64, is_default=is_default, created_at=NOW,
    )).inserted_primary_key[0]
    for tree in trees:
        finals = sorted(tree.finals(), key=lambda r: (r["cumulative_reward"], r["node"]))
        if len(finals) < 2:
            continue
        chosen, rejected = (finals[-1], finals[0]) if rule == "sum" else (finals[0], finals[-1])
        pair = StudyPair(
            iteration, tree.prompt_id, name, is_default, chosen, rejected,
            tree.text(chosen["node"]), tree.text(rejected["node"]),
            tree.path(chosen["node"]), tree.path(rejected["node"]),
        )
        conn.execute(insert(Pair).values(
            pair_set_id=pair_set_id, prompt_id=tree.prompt_id,
            chosen_candidate_id=tree.ids[chosen["node"]], rejected_candidate_id=tree.ids[rejected["node"]],
            chosen_text=pair.chosen_text, rejected_text=pair.rejected_text,
            chosen_reward=chosen["cumulative_reward"], rejected_reward=rejected["cumulative_reward"],
            margin=pair.margin,
        ))
        study.pairs.append(pair)


# ------------------------------------------------------------ backends


def sqlite_store(directory: Path) -> tuple[str, Engine]:
    """A store at head in directory/store.db (a copy of the session's template) and its engine."""
    url = sqlite_head_store(directory / "store.db")
    engine, _ = create_store(url)
    return url, engine


class FilledStore:
    """A filled store: its URL, the study written into it, and its backend."""

    def __init__(self, backend: str, url: str, study: Study):
        self.backend, self.url, self.study = backend, url, study

    def fingerprint(self):
        return fingerprint(self.url)


@pytest.fixture
def store(backend: str, head_store_url: str, tmp_path: Path) -> FilledStore:
    """The synthetic study on each backend (PostgreSQL: a fresh database, dropped afterwards)."""
    engine, _ = create_store(head_store_url)
    try:
        study = fill_study(engine, tmp_path / "images")
    finally:
        engine.dispose()
    return FilledStore(backend, head_store_url, study)


@pytest.fixture
def sqlite_study(tmp_path: Path) -> FilledStore:
    url, engine = sqlite_store(tmp_path)
    study = fill_study(engine, tmp_path / "images")
    engine.dispose()
    return FilledStore("sqlite", url, study)


def assert_close(actual, expected, where: str = "") -> None:
    if isinstance(expected, dict):
        assert set(actual) >= set(expected), where
        for key, value in expected.items():
            assert_close(actual[key], value, f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
            assert_close(got, want, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-9), where
    else:
        assert actual == expected, where


def one_line_error(result) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("csr: error: "), result.stderr
    return lines[0]
