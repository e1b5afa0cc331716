"""Shared tiny-model fixtures of the toy colour world (tests/worlds.py),
session scoped, saved to temp dirs.

- `tiny_llava_dir`: a random tiny LLaVA (word-level tokenizer, "." its own token).
- `trained_llava_dir`: the same architecture trained for a few seconds on
  templated captions, so that it writes sentences that end with "." and
  responses that end with EOS (a random model mostly says ".").
- `tiny_clip_dir`: a random tiny open_clip model in `local-dir:` layout.
- `policy`, `trained_policy`, `clip_scorer`: those loaded back through
  `csr.engine.loading`, the path a user's model takes.
- `colour_images`: the world's solid-colour PIL images.
"""

from __future__ import annotations

import os

import pytest
import torch

from csr.engine.demo import tiny
from tests import worlds

# The filled synthetic study (csr sql, csr stats): `store` on each backend, `sqlite_study` on SQLite.
from tests.analytics_fixtures import sqlite_study, store  # noqa: F401

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N` runs N worker processes side by side: one torch thread each
    # instead of every worker's default of one per core.
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def colour_images():
    return worlds.colour_images()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return worlds.word_tokenizer()


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, tiny_tokenizer):
    model, processor = tiny.build_tiny_llava(tiny_tokenizer, seed=0)
    return tiny.save_pretrained(model, processor, tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def trained_llava_dir(tmp_path_factory, tiny_tokenizer, colour_images):
    model, processor = tiny.build_tiny_llava(tiny_tokenizer, seed=1)
    processor.tokenizer.padding_side = "right"
    worlds.train_tiny_llava(model, processor, colour_images)
    return tiny.save_pretrained(model, processor, tmp_path_factory.mktemp("trained-llava"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    model, config = tiny.build_tiny_clip(seed=0)
    return tiny.save_open_clip(model, config, tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def policy(tiny_llava_dir):
    from csr.engine.loading import load_policy

    return load_policy(str(tiny_llava_dir))


@pytest.fixture(scope="session")
def trained_policy(trained_llava_dir):
    from csr.engine.loading import load_policy

    return load_policy(str(trained_llava_dir))


@pytest.fixture(scope="session")
def clip_scorer(tiny_clip_dir):
    from csr.engine.loading import load_clip

    return load_clip(f"local-dir:{tiny_clip_dir}", None)
