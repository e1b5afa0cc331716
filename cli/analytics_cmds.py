"""sql, stats, report: read-only analytics over the store through DuckDB."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from csr.cli import sql_shell
from csr.cli.context import state
from csr.cli.output import Console, echo_json, json_option
from csr.cli.vocabulary import SqlFormat
from csr.engine.errors import CsrError
from csr.storage import analytics

console = Console()
CACHE_HELP = ("DuckDB file keeping a columnar copy of the candidates, synced at each use: much faster "
              "aggregates on large stores (default: none, read the store directly).")


def _cache_option() -> Path | None:
    return typer.Option(None, "--cache", envvar="CSR_ANALYTICS_CACHE", help=CACHE_HELP)


def sql_cmd(
    ctx: typer.Context,
    query: str = typer.Argument(None, help="SQL to run; read from stdin when left out (an interactive prompt on a terminal)."),
    fmt: SqlFormat = typer.Option(SqlFormat.table, "--format", "-f", help="Output format."),
    out: Path = typer.Option(None, "--out", "-o", help="Write the result to this file path (required for parquet)."),
    max_rows: int = typer.Option(1000, "--max-rows", help="Rows shown by --format table (0: all)."),
    cache: Path = _cache_option(),
) -> None:
    """Query the store with DuckDB, read-only.

    Every store table is a view under its own name (`responses`: one row per
    final response), plus `response_paths`, `response_sentences`, `pair_stats` and the macro
    words(text). Only reads run: SELECT, WITH, FROM, SHOW, DESCRIBE,
    SUMMARIZE, EXPLAIN; anything that would write is refused.
    """
    fmt = fmt.value
    if fmt == "parquet" and out is None:
        raise CsrError("--format parquet writes a file: give --out PATH")
    if query is None and sys.stdin.isatty():
        if out is not None or fmt != "table":
            raise CsrError("the interactive prompt prints tables: pass the query to use --format or --out")
        with analytics.connect(state(ctx).url, cache=cache) as con:
            sql_shell.run_shell(con, max_rows=max_rows)
        return
    if query is None:
        query = sys.stdin.read()
    # Refused before the store is even opened.
    statements = analytics.read_statements(query)
    if len(statements) > 1 and (fmt != "table" or out is not None):
        raise CsrError(f"--format {fmt} and --out take one statement; this query has {len(statements)}")
    with analytics.connect(state(ctx).url, cache=cache) as con:
        for statement in statements:
            sql_shell.write_result(con, statement, fmt, out=out, max_rows=max_rows)


def stats_cmd(
    ctx: typer.Context,
    iteration: int = typer.Option(None, "--iter", help="Only this iteration."),
    as_json: bool = json_option("The figures"),
    cache: Path = _cache_option(),
) -> None:
    """The paper's figures per iteration: rewards of chosen and rejected (table 10), R_T and R_I,
    length (table 7), pair margins, exclusions; the benchmarks (CHAIR, POPE,
    recorded ones) per model version."""
    st = state(ctx)
    limit = st.settings.train.get("max_response_tokens", 1024)
    with analytics.connect(st.url, cache=cache) as con:
        summary = analytics.stats(con, iteration, max_response_tokens=limit)
    if as_json:
        echo_json(summary)
        return
    _print_stats(summary)


# (label, key, format) rows of the per-iteration table; the figures are columns
# per iteration, as in the paper's tables.
_STAT_ROWS = (
    ("prompts searched", "prompts", "d"),
    ("candidates", "candidates", "d"),
    ("final responses", "final_responses", "d"),
    ("excluded candidates", "excluded", "d"),
    ("mean words, final responses", "final_mean_words", ".1f"),
    ("responses cut at max_length", "truncated_responses", "d"),
    ("default pair set", "pair_set", "s"),
    ("pairs", "pairs", "d"),
    ("chosen mean reward R(y)", "chosen_mean_reward", ".3f"),
    ("rejected mean reward R(y)", "rejected_mean_reward", ".3f"),
    ("chosen mean R_T", "chosen_mean_r_t", ".4f"),
    ("rejected mean R_T", "rejected_mean_r_t", ".4f"),
    ("chosen mean R_I", "chosen_mean_r_i", ".3f"),
    ("rejected mean R_I", "rejected_mean_r_i", ".3f"),
    ("chosen mean words", "chosen_mean_words", ".1f"),
    ("rejected mean words", "rejected_mean_words", ".1f"),
)


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec != "s" else str(value)


def _print_stats(summary: dict) -> None:
    iterations = summary["iterations"]
    if not iterations:
        console.print("no iteration in the store yet (csr generate --iter 1)")
    else:
        table = Table("", *(f"iter {it['iteration']}" for it in iterations), title="per iteration")
        for label, key, spec in _STAT_ROWS:
            table.add_row(label, *(_fmt(it[key], spec) for it in iterations))
        for quantile in ("min", "p25", "median", "p75", "max"):
            table.add_row(f"margin {quantile}", *(_fmt(it["margin"][quantile], ".3f") for it in iterations))
        table.add_row("pairs over max_response_tokens", *(
            f"{it['pairs_over_training_limit']} (> {it['max_response_tokens']})" for it in iterations))
        reasons = sorted({reason for it in iterations for reason in it["exclusions"]})
        for reason in reasons:
            table.add_row(f"excluded: {reason}", *(str(it["exclusions"].get(reason, 0)) for it in iterations))
        console.print(table)
    if summary["benchmarks"]:
        console.print(benchmark_by_version(summary["benchmarks"]))


def benchmark_by_version(rows: list[dict]) -> Table:
    """One line per benchmark figure, one column per model version; 95 % bootstrap intervals in brackets."""
    versions = sorted({int(v) for row in rows for v in row["values"]})
    table = Table("benchmark", "data set", "metric", *(f"v{v}" for v in versions),
                  title="benchmarks per model version")
    for row in rows:
        cells = []
        for v in versions:
            value = row["values"].get(v, row["values"].get(str(v)))
            ci = row["intervals"].get(v, row["intervals"].get(str(v)))
            cells.append("" if value is None else f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        table.add_row(row["benchmark"], row["dataset"], row["metric"], *cells)
    return table


def report_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="Directory for report.html (created if missing)."),
    pairs: int = typer.Option(50, "--pairs", min=0, help="Pairs shown in the browsable sample."),
    screenshot: bool = typer.Option(False, "--screenshot", help="Also write report.png with headless Chromium."),
    cache: Path = _cache_option(),
    as_json: bool = json_option("The files written"),
) -> None:
    """A static HTML report: reward and length plots per iteration, the benchmarks (CHAIR, POPE,
    recorded ones) per model version, a sample of pairs."""
    from csr.engine.io import report
    with analytics.connect(state(ctx).url, cache=cache) as con:
        page = report.write_report(con, out, pairs=pairs)
    png = report.screenshot(page, out / "report.png") if screenshot else None
    if as_json:
        echo_json({"report": str(page), "screenshot": None if png is None else str(png)})
        return
    console.print(f"report written to {page}")
    if png is not None:
        console.print(f"screenshot written to {png}")


def register(app: typer.Typer) -> None:
    app.command("sql")(sql_cmd)
    app.command("stats")(stats_cmd)
    app.command("report")(report_cmd)
