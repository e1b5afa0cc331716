"""One option vocabulary across every command, checked on the commands
themselves (what `--help` renders), plus the old spellings kept for a release."""

from __future__ import annotations

import enum
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from csr.cli.app import app

# Commands that load a model: each takes --device with the one default rule.
RUNS_A_MODEL = {"generate", "train", "iterate", "demo", "eval chair", "eval pope"}
# Concept -> the one option name; the other spellings must not be visible anywhere.
RETIRED = {"--from", "--to", "--name", "--iterations", "--versions-json"}
CHOICES = {"--preset", "--select-by", "--format", "--dtype", "--report-to"}


def _commands() -> list[tuple[str, object]]:
    found = []

    def walk(prefix: str, command) -> None:
        if hasattr(command, "commands"):  # a group
            for name, sub in command.commands.items():
                walk(f"{prefix} {name}".strip(), sub)
        else:
            found.append((prefix, command))

    walk("", typer.main.get_command(app))
    return found


COMMANDS = _commands()


def _options(command) -> list:
    return [p for p in command.params if getattr(p, "opts", None) and p.opts[0].startswith("--") and not p.hidden]


def _kind(option):
    return option.type_descriptor.annotation


@pytest.mark.parametrize(("name", "command"), COMMANDS, ids=[name for name, _ in COMMANDS])
def test_every_command_follows_the_vocabulary(name, command):
    assert command.help, f"{name} has no help"
    rendered = CliRunner().invoke(app, [*name.split(), "--help"])
    assert rendered.exit_code == 0 and "<bool>" not in rendered.output, f"{name} shows a flag as <bool>"
    for option in _options(command):
        flag = option.opts[0]
        assert option.help, f"{name} {flag} has no help text"
        assert flag not in RETIRED, f"{name} shows the retired spelling {flag}"
        if flag == "--json":
            assert option.is_flag, f"{name} --json must be a flag (machine-readable stdout)"
        if flag == "--out":
            assert _kind(option) is Path, f"{name} --out must be a path"
            assert any(kind in option.help.lower() for kind in ("path", "file", "directory")), (name, option.help)
        if flag in CHOICES:
            assert isinstance(_kind(option), type) and issubclass(_kind(option), enum.Enum), (
                f"{name} {flag} must show its choices"
            )
        if _kind(option) is bool:
            assert option.is_flag, f"{name} {flag} must be a flag"
        if "iter" in flag and name != "demo":
            assert flag == "--iter", f"{name}: the iteration is --iter, not {flag}"
    flags = {o.opts[0] for o in _options(command)}
    if name in RUNS_A_MODEL:
        assert "--device" in flags, f"{name} runs a model but has no --device"
        device = next(o for o in _options(command) if o.opts[0] == "--device")
        assert device.default is None and "cuda when a GPU is present" in device.help
    if name in {"curate", "train", "export"}:
        assert "--pair-set" in flags
    if name in {"lineage", "eval chair", "eval pope", "eval record"}:
        assert "--model-version" in flags


def test_iteration_ranges_and_old_spellings(tmp_path):
    runner = CliRunner()
    db = ["--db", str(tmp_path / "none.db")]
    bad = runner.invoke(app, [*db, "iterate", "--iter", "3-1"])
    assert bad.exit_code != 0 and "must count up" in str(bad.exception)
    # the old spellings still parse, with a deprecation line, before anything is opened
    old = runner.invoke(app, [*db, "iterate", "--from", "1"])
    assert "--from/--to is deprecated" in old.output and "go together" in str(old.exception)
    lineage = runner.invoke(app, [*db, "lineage", "7"])
    assert "deprecated" in lineage.output
