"""`csr sql` behind the command line: run read statements on the analytics door's DuckDB
connection (storage/analytics.py), write their results, and the interactive shell.

Statements reach here already through the read-only guard (`analytics.read_statements`),
which the shell applies to each statement it reads. Streams are parameters, so the shell
and the writers run the same without a terminal.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import json
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import duckdb
from rich.console import Console
from rich.table import Table

from csr.storage import StoreError, analytics

FORMATS = ("table", "csv", "json", "parquet")
QUIT_COMMANDS = (".quit", ".exit", "\\q")
BANNER = ("csr sql (read-only DuckDB over the store). End a statement with ';'. "
          "Tables: SHOW TABLES; quit: .quit or Ctrl-D")
_BATCH = 10_000


def write_result(con: duckdb.DuckDBPyConnection, statement: str, fmt: str = "table", *,
                 out: Path | None = None, max_rows: int = 1000, stdout: IO[str] | None = None) -> None:
    """Run one checked statement and write its result as `fmt` to `out`, or else to `stdout`.

    Parquet needs `out`. `max_rows` bounds the rows a table shows (0: all); the footer
    counts them all. DuckDB errors become StoreError.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    stdout = stdout if stdout is not None else sys.stdout
    try:
        if fmt == "parquet":
            if out is None:
                raise ValueError("parquet is written to a file: out is needed")
            con.sql(statement).write_parquet(str(out))
            return
        cursor = con.execute(statement)
        columns = [d[0] for d in cursor.description or []]
        rows = _batches(cursor)
        if fmt == "table":
            _print_table(columns, rows, max_rows, out, stdout)
            return
        json_columns = {d[0] for d in cursor.description or [] if str(d[1]) == "JSON"}
        if out is None:
            _write(fmt, columns, rows, stdout, json_columns)
            stdout.flush()
            return
        with open(out, "w", newline="") as stream:
            _write(fmt, columns, rows, stream, json_columns)
    except duckdb.Error as exc:
        raise StoreError(f"query failed: {analytics.first_line(exc)}") from exc


def run_shell(con: duckdb.DuckDBPyConnection, *, stdin: IO[str] | None = None,
              stdout: IO[str] | None = None, max_rows: int = 1000) -> None:
    """Read statements ending in ';' from `stdin` until end of input or .quit, and print each
    read's table on `stdout`. A refused or failing statement prints one error line and the
    shell goes on."""
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    console = Console(file=stdout)
    read_line = _line_reader(stdin, stdout)
    console.print(BANNER, style="dim")
    buffer: list[str] = []
    while True:
        try:
            line = read_line("csr> " if not buffer else "...> ")
        except EOFError:
            console.print()
            return
        if not buffer and line.strip() in QUIT_COMMANDS:
            return
        buffer.append(line)
        text = "\n".join(buffer).strip()
        if not text:
            buffer.clear()
            continue
        if not text.endswith(";"):
            continue
        buffer.clear()
        try:
            for statement in analytics.read_statements(text):
                write_result(con, statement, "table", max_rows=max_rows, stdout=stdout)
        except StoreError as exc:
            console.print(f"error: {exc}", style="red", markup=False)
        except KeyboardInterrupt:
            console.print("interrupted", style="red")


def _line_reader(stdin: IO[str], stdout: IO[str]) -> Callable[[str], str]:
    """prompt -> line, raising EOFError at the end of input."""
    if stdin is sys.stdin and stdout is sys.stdout and stdin.isatty():
        # input() edits lines and keeps history, but only on the process's own terminal
        # and once readline is loaded.
        try:
            import readline  # noqa: F401
        except ImportError:
            pass
        return input

    def read(prompt: str) -> str:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    return read


def _batches(cursor: duckdb.DuckDBPyConnection) -> Iterator[tuple]:
    # Results can be millions of rows: stream them instead of fetchall().
    while True:
        batch = cursor.fetchmany(_BATCH)
        if not batch:
            return
        yield from batch


def _cell(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _print_table(columns: list[str], rows: Iterator[tuple], max_rows: int, out: Path | None,
                 stdout: IO[str]) -> None:
    table = Table(*columns, show_lines=False)
    shown = total = 0
    for row in rows:
        total += 1
        if max_rows and shown >= max_rows:
            continue
        table.add_row(*(_cell(v) for v in row))
        shown += 1
    footer = f"{total} row{'s' if total != 1 else ''}"
    if shown < total:
        footer += f" ({shown} shown; --max-rows 0 or --format csv for all)"
    if out is not None:
        with open(out, "w") as handle:
            target = Console(file=handle, width=max(80, 24 * len(columns)), color_system=None)
            target.print(table)
            target.print(footer)
        return
    console = Console(file=stdout)
    if columns:
        console.print(table)
    console.print(footer, style="dim")


def _write(fmt: str, columns: list[str], rows: Iterator[tuple], stream: IO[str],
           json_columns: set[str]) -> None:
    if fmt == "csv":
        _write_csv(columns, rows, stream)
    else:
        _write_json(columns, rows, stream, json_columns)


def _write_csv(columns: list[str], rows: Iterator[tuple], stream: IO[str]) -> None:
    writer = csv.writer(stream)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None else _csv_cell(v) for v in row])


def _csv_cell(value):
    # SQL spelling, not Python's True/False.
    return ("true" if value else "false") if isinstance(value, bool) else _plain(value)


def _plain(value):
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (uuid.UUID, dt.timedelta)):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float):
        return analytics.clean_number(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _write_json(columns: list[str], rows: Iterator[tuple], stream: IO[str], json_columns: set[str]) -> None:
    # One array of objects, written row by row so that large results stream.
    # JSON columns (iteration configs, pair-set params) are embedded, not quoted.
    stream.write("[")
    for index, row in enumerate(rows):
        record = {
            column: json.loads(value) if column in json_columns and isinstance(value, str) else _plain(value)
            for column, value in zip(columns, row, strict=True)
        }
        stream.write(("," if index else "") + "\n  " + json.dumps(record, allow_nan=False))
    stream.write("\n]\n")
