"""`csr` in process: the console script's own entry point, `csr.cli.app.main`,
run inside the test process under typer's `CliRunner` isolation.

`invoke_csr` takes the arguments `run_csr` (tests/db_backends.py) takes and
returns what it returns (`returncode`, `stdout`, `stderr`), without starting a
Python process and importing csr, torch and transformers again (one to three
seconds a command on two cores). Everything `main` does is run: option
parsing, settings, the store, the one-line `csr: error: ...` on stderr and the
exit code. What it cannot show is the installed script itself (the entry
point, a real stdin, a terminal, signals, processes side by side): a few
tests keep `run_csr` for that.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner


@dataclass
class Ran:
    """What a finished `csr` command left: as subprocess.CompletedProcess names it."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def invoke_csr(
    *args: str | os.PathLike,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    db: str | os.PathLike | None = None,
    input: str | None = None,
) -> Ran:
    """Run `csr ARGS` in this process; `db` becomes `--db URL`, `cwd` the working
    directory and `env` extra environment for the command only. As with run_csr,
    CSR_DATABASE_URL is unset unless `env` sets it, and COLUMNS is 200."""
    from csr.cli.app import main

    argv = ["csr"]
    if db is not None:
        argv += ["--db", str(db)]
    argv += [str(a) for a in args]
    overrides: dict[str, str | None] = {"CSR_DATABASE_URL": None, "COLUMNS": "200"}
    # main() sets this one for the process; listing it here puts it back afterwards.
    overrides["HF_HUB_DISABLE_PROGRESS_BARS"] = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    overrides.update(env or {})
    code = 0
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    # A console made while COLUMNS was set keeps that width (pytest-xdist's
    # workers set COLUMNS=80): for the command, each is made afresh, which
    # for csr's consoles (cli/output.py) means as wide as the content when
    # they do not write to a terminal, as here.
    widths = {console: console._width for console in _module_consoles()}
    with CliRunner().isolation(input=input, env=overrides) as (stdout, stderr, _):
        sys.argv = argv
        for console in widths:
            console._width = None
        try:
            if cwd is not None:
                os.chdir(cwd)
            main()
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:  # sys.exit("message"): Python prints it and exits 1
                print(exc.code, file=sys.stderr)
                code = 1
        finally:
            for console, width in widths.items():
                console._width = width
            sys.argv = saved_argv
            os.chdir(saved_cwd)
            sys.stdout.flush()
            sys.stderr.flush()
            out, err = stdout.getvalue(), stderr.getvalue()
    return Ran(argv, code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))


def _module_consoles() -> list[Console]:
    """The rich consoles that csr's command modules keep at module level."""
    return [
        value
        for name, module in list(sys.modules.items())
        if name.startswith("csr.") and module is not None
        for value in vars(module).values()
        if isinstance(value, Console)
    ]
