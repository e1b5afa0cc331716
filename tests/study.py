"""A small study on disk for end-to-end tests: tiny models, a few images of
the toy world (tests/worlds.py), a store initialised and filled by `csr init`
and `csr prompts import`.

`Study.invoke` runs a csr command in this process (tests/cli_runner.py);
`Study.csr` runs the real console script, for the tests that kill it, signal
it or run several at once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text

from tests.cli_runner import invoke_csr
from tests.db_backends import run_csr
from tests.worlds import write_prompts

# Small enough for seconds per iteration on two cores, big enough for real trees.
SEARCH = {
    "num_token_beams": 2,
    "num_beam_groups": 2,
    "diversity_penalty": 3.0,
    "max_new_tokens": 10,
    "max_length": 48,
    "num_beams": 2,
}
TRAIN = {
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "learning_rate": 1e-3,
    "projector_learning_rate": 1e-3,
    "epochs": 1,
    "batch_size": 2,
    "warmup_ratio": 0.0,
    "gradient_checkpointing": False,
}


@dataclass
class Study:
    directory: Path
    url: str
    prompts: int

    def csr(self, *args, **kwargs):
        """The real `csr` console script, in a process of its own."""
        return run_csr(*args, cwd=self.directory, db=self.url, **kwargs)

    def invoke(self, *args, **kwargs):
        """The same command in this process."""
        return invoke_csr(*args, cwd=self.directory, db=self.url, **kwargs)

    def query(self, sql: str, **params) -> list[tuple]:
        engine = create_engine(self.url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(text(sql), params)]
        finally:
            engine.dispose()


def make_study(directory: Path, url: str, llava_dir: Path, clip_dir: Path, prompts: int = 6,
               search: dict | None = None, train: dict | None = None) -> Study:
    """`search` and `train` replace or add to SEARCH and TRAIN."""
    write_prompts(directory, prompts)
    toml = ["[generate]"] + [f"{k} = {json.dumps(v)}" for k, v in {**SEARCH, **(search or {})}.items()]
    toml += ["", "[train]"] + [f"{k} = {json.dumps(v)}" for k, v in {**TRAIN, **(train or {})}.items()]
    (directory / "csr.toml").write_text("\n".join(toml) + "\n")
    study = Study(directory, url, prompts)
    done = study.invoke("init", "--model", str(llava_dir), "--clip", f"local-dir:{clip_dir}")
    assert done.returncode == 0, done.stderr
    done = study.invoke("prompts", "import", "prompts.jsonl", "--images", "images")
    assert done.returncode == 0, done.stderr
    return study
