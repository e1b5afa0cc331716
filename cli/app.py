"""The `csr` command line. Thin: parse options, call engine/storage, print."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

import csr
from csr.cli.advice import advice
from csr.cli.context import CliState
from csr.cli.help import CsrGroup
from csr.engine.errors import USER_ERRORS, error_line
from csr.storage import StoreRefused, StoreUnavailable

# -h as well as --help, on every command.
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
GLOBAL_OPTIONS = ("--db", "--config")

app = typer.Typer(
    name="csr",
    help="Calibrated Self-Rewarding for vision-language models, backed by a relational store.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # --install-completion / --show-completion for bash, zsh, fish and PowerShell.
    add_completion=True,
    # Plain help: flags shown as flags and choices as [a|b] (rich mode shows "<bool>").
    rich_markup_mode=None,
    context_settings=HELP_OPTIONS,
    cls=CsrGroup,
)


def _print_version(shown: bool) -> None:
    if shown:
        typer.echo(f"csr {csr.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    db: str = typer.Option(None, "--db", help="The store: a database URL (postgresql://..., sqlite:///PATH) or a SQLite file path. Without it: CSR_DATABASE_URL, then [store] url in csr.toml, then sqlite:///csr.db here."),
    config: Path = typer.Option(None, "--config", help="Settings file (default: ./csr.toml)."),
    version: bool = typer.Option(False, "--version", "-V", is_eager=True, callback=_print_version,
                                 help="Print csr's version and exit."),
) -> None:
    ctx.obj = CliState(db=db, config=config)


def _register() -> None:
    # Every command module is imported: one that fails to import is an error, never a missing command.
    from csr.cli import (
        analytics_cmds,
        demo_cmds,
        env_cmds,
        eval_cmds,
        generate_cmds,
        store_cmds,
        train_cmds,
    )
    from csr.cli.pairs_cmds import register as register_pairs

    for module in (store_cmds, generate_cmds, train_cmds, analytics_cmds, demo_cmds, eval_cmds, env_cmds):
        module.register(app)
    register_pairs(app)


_register()


def _click_kinds(name: str) -> tuple[type[BaseException], ...]:
    """`name` from click and from the copy of click that typer >= 0.20 vendors as typer._click."""
    import click

    kinds = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        vendored = None
    if vendored is not None and hasattr(vendored, name):
        kinds.append(getattr(vendored, name))
    if name == "Abort":
        kinds.append(typer.Abort)
    return tuple(kinds)


def usage_message(exc) -> str:
    message = " ".join(exc.format_message().split()).replace("Value error, ", "")
    command = exc.ctx.command_path if exc.ctx is not None else "csr"
    misplaced = getattr(exc, "option_name", None)
    if misplaced in GLOBAL_OPTIONS and command != "csr":
        sub = command.removeprefix("csr ")
        return (f"{message} ({misplaced} is a global option: it goes before the command, "
                f"csr {misplaced} ... {sub})")
    if isinstance(exc, _click_kinds("BadParameter")):
        return message  # names the option and the values it takes
    return f"{message} (see {command} --help)"


def _debug() -> bool:
    return os.environ.get("CSR_DEBUG", "") not in ("", "0")


def main() -> None:
    # csr shows its own progress; the hub's and transformers' per-file bars
    # (loading and writing weights) would interleave with it.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        code = app(standalone_mode=False)
        # typer.Exit(code) raised by a command comes back as a return value here
        if isinstance(code, int) and not isinstance(code, bool) and code != 0:
            sys.exit(code)
    except USER_ERRORS as exc:
        if isinstance(exc, (StoreUnavailable, StoreRefused)) and _debug():
            raise  # the driver's whole message and the traceback
        print(f"csr: error: {error_line(exc)}{advice(exc)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("csr: interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors come through here in non-standalone mode
        if isinstance(exc, _click_kinds("NoArgsIsHelpError")):
            exc.show()  # `csr` or `csr db` alone: the help, as git and alembic do
            sys.exit(exc.exit_code)
        if isinstance(exc, _click_kinds("UsageError")):
            # A usage error is one line and exit 2, as every argparse and click tool does.
            print(f"csr: error: {usage_message(exc)}", file=sys.stderr)
            sys.exit(2)
        if isinstance(exc, _click_kinds("ClickException")):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, _click_kinds("Abort")):
            print("csr: aborted", file=sys.stderr)
            sys.exit(1)
        if _debug():
            raise
        print(f"csr: error: {error_line(exc)}", file=sys.stderr)
        sys.exit(1)
