"""`csr report`: one static HTML page of the study's figures and a browsable pair sample.

The page opens from disk with no server and no network: plots are
SVG (engine/io/svg_plots.py) and image thumbnails JPEGs, both embedded as data URIs, and
the only script is inline (an iteration filter, and a load check that the
tests read back through headless Chromium). The markup is the Jinja2
template templates/report.html.j2, with its stylesheet and script beside it.
"""

from __future__ import annotations

import base64
import functools
import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import duckdb
import jinja2

from csr.engine.errors import CsrError
from csr.engine.io import svg_plots as svg
from csr.storage import analytics

THUMBNAIL_PX = 224
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
CHOSEN_COLOUR, REJECTED_COLOUR, ALL_COLOUR = "#2a9d8f", "#e76f51", "#6c757d"


# ---------------------------------------------------------------- plots
# SVG written by engine/io/svg_plots.py (matplotlib's import, fonts and double
# draw cost seconds whatever the store's size). Sizes as the former figures at 100 dpi.


def plot_ri_distribution(histograms: list[dict]) -> str | None:
    """Figure 5 of the paper: R_I (CLIP relevance) of chosen and rejected responses per iteration,
    from the counts of `analytics.ri_histograms` (one filled outline per histogram)."""
    if not histograms:
        return None
    width, height = 420, 320
    top = max((c for h in histograms for side in ("chosen", "rejected") for c in h[side]), default=0)
    panels = []
    for k, histogram in enumerate(histograms):
        edges = histogram["edges"]
        panel = svg.Panel(k * width, 0, width, height, (edges[0], edges[-1]), svg.span([0, top], zero=True))
        for side, colour in (("rejected", REJECTED_COLOUR), ("chosen", CHOSEN_COLOUR)):
            panel.stairs(histogram[side], edges, colour)
        ticks = [(t, f"{t:g}") for t in svg.nice_ticks(edges[0], edges[-1]) if edges[0] <= t <= edges[-1]]
        panel.axes(f"iteration {histogram['iteration']}", "mean R_I over sentences",
                   "responses" if k == 0 else "", yticks=k == 0, xticks=ticks)
        if k == len(histograms) - 1:
            panel.legend([("rejected", REJECTED_COLOUR), ("chosen", CHOSEN_COLOUR)], opacity=0.6)
        panels.append(panel)
    return svg.data_uri(svg.figure(width * len(histograms), height, panels))


def plot_reward_means(iterations: list[dict]) -> str | None:
    """Table 10 of the paper: mean reward of chosen and rejected responses per iteration."""
    rows = [it for it in iterations if it["pairs"]]
    if not rows:
        return None
    values = [it[key] for it in rows for key in ("chosen_mean_reward", "rejected_mean_reward")]
    panel = svg.Panel(0, 0, 550, 320, (-0.6, len(rows) - 0.4), svg.span(values, zero=True))
    bar = 0.38
    for x, it in enumerate(rows):
        for offset, key, colour in ((-bar / 2, "chosen_mean_reward", CHOSEN_COLOUR),
                                    (bar / 2, "rejected_mean_reward", REJECTED_COLOUR)):
            if it[key] is not None:
                panel.rect(x + offset - bar / 2, x + offset + bar / 2, 0.0, it[key], colour)
    panel.axes(ylabel="mean R(y)", xticks=[(x, f"iter {it['iteration']}") for x, it in enumerate(rows)])
    panel.legend([("chosen", CHOSEN_COLOUR), ("rejected", REJECTED_COLOUR)])
    return svg.data_uri(svg.figure(550, 320, [panel]))


def plot_lengths(iterations: list[dict]) -> str | None:
    """Table 7 of the paper: mean response length in words per iteration."""
    rows = [it for it in iterations if it["final_responses"]]
    if not rows:
        return None
    series = []
    for key, label, colour in (("final_mean_words", "all final responses", ALL_COLOUR),
                               ("chosen_mean_words", "chosen", CHOSEN_COLOUR),
                               ("rejected_mean_words", "rejected", REJECTED_COLOUR)):
        points = [(it["iteration"], it[key]) for it in rows if it[key] is not None]
        if points:
            series.append((label, colour, points))
    numbers = [it["iteration"] for it in rows]
    panel = svg.Panel(0, 0, 550, 320, (min(numbers) - 0.25, max(numbers) + 0.25),
                      svg.span([y for _, _, points in series for _, y in points]))
    for _, colour, points in series:
        panel.line(points, colour)
    panel.axes(ylabel="mean words", xticks=[(n, f"iter {n}") for n in numbers])
    if series:
        panel.legend([(label, colour) for label, colour, _ in series])
    return svg.data_uri(svg.figure(550, 320, [panel]))


def plot_benchmarks(rows: list[dict]) -> str | None:
    """Each benchmark figure across model versions (the paper's figure 3 view),
    one panel per benchmark and data set, 95 % bootstrap intervals as error bars.
    Word counts are left out: they are not on the 0-1 scale of the rest."""
    rows = [r for r in rows if r["metric"] not in ("words", "mean_words") and r["values"]]
    # F1 carries POPE's panel; accuracy and yes-ratio are in the table
    rows = [r for r in rows if r["benchmark"] != "pope" or r["metric"].endswith("F1")]
    if not rows:
        return None
    panels_of = list(dict.fromkeys((r["benchmark"], r["dataset"]) for r in rows))
    width, height = 500, 340
    panels = []
    for k, (benchmark, dataset) in enumerate(panels_of):
        series = []
        for row in (r for r in rows if (r["benchmark"], r["dataset"]) == (benchmark, dataset)):
            points = sorted((int(v), x) for v, x in row["values"].items())
            intervals = {int(v): ci for v, ci in row["intervals"].items()}
            series.append((row["metric"], svg.CYCLE[len(series) % len(svg.CYCLE)], points, intervals))
        versions = sorted({x for _, _, points, _ in series for x, _ in points})
        ys = [y for _, _, points, intervals in series for x, y in points]
        ys += [bound for _, _, _, intervals in series for ci in intervals.values() for bound in ci]
        panel = svg.Panel(k * width, 0, width, height, (versions[0] - 0.3, versions[-1] + 0.3), svg.span(ys))
        for _, colour, points, intervals in series:
            for x, _ in points:
                if x in intervals:
                    panel.error_bar(x, *intervals[x], colour)
            panel.line(points, colour)
        panel.axes(f"{benchmark} · {dataset}" if dataset else benchmark, "model version",
                   xticks=[(v, f"v{v}") for v in versions])
        panel.legend([(metric, colour) for metric, colour, _, _ in series])
        panels.append(panel)
    return svg.data_uri(svg.figure(width * len(panels), height, panels))


# ---------------------------------------------------------------- images


def thumbnail_data_uri(root: str, rel_path: str) -> str | None:
    """A JPEG thumbnail of images.root / images.rel_path, or None when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    path = Path(root) / rel_path
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
    except (OSError, UnidentifiedImageError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------- HTML

# (label, key, format) rows of the per-iteration table, one column per iteration.
STAT_ROWS = (
    ("prompts searched", "prompts", "d"), ("candidates", "candidates", "d"),
    ("final responses", "final_responses", "d"), ("excluded candidates", "excluded", "d"),
    ("pairs (default set)", "pairs", "d"),
    ("chosen mean R(y)", "chosen_mean_reward", ".3f"), ("rejected mean R(y)", "rejected_mean_reward", ".3f"),
    ("chosen mean R_T", "chosen_mean_r_t", ".4f"), ("rejected mean R_T", "rejected_mean_r_t", ".4f"),
    ("chosen mean R_I", "chosen_mean_r_i", ".3f"), ("rejected mean R_I", "rejected_mean_r_i", ".3f"),
    ("mean words, final responses", "final_mean_words", ".1f"),
    ("chosen mean words", "chosen_mean_words", ".1f"), ("rejected mean words", "rejected_mean_words", ".1f"),
)
PLOT_CAPTIONS = {
    "ri": "R_I of chosen and rejected responses per iteration (paper, figure 5)",
    "rewards": "Mean reward of chosen and rejected responses (paper, table 10)",
    "lengths": "Mean response length in words (paper, table 7)",
    "benchmarks": "Benchmarks per model version, 95 % bootstrap intervals (paper, figure 3)",
}


def _num(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


@functools.cache
def _templates() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("csr.engine.io", "templates"),
        # On for every template but the static stylesheet and script: store text must stay text.
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), disabled_extensions=("css", "js"),
                                            default=True),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        # A missing value (no data set, no word count) shows as nothing, not "None".
        finalize=lambda value: "" if value is None else value,
    )
    environment.filters["num"] = _num
    return environment


def render(summary: dict, plots: dict[str, str | None], pairs: list[dict],
           sentences: dict[int, list[dict]], thumbnails: dict[tuple, str | None]) -> str:
    iterations = summary["iterations"]
    # Versions arrive as ints from the store and as strings through JSON.
    benchmarks = [{**row, "values": {int(v): x for v, x in row["values"].items()},
                   "intervals": {int(v): ci for v, ci in row["intervals"].items()}}
                  for row in summary["benchmarks"]]
    shown = [{**pair,
              "thumbnail": thumbnails[(pair["image_root"], pair["image_rel_path"])],
              "chosen_sentences": sentences.get(pair["chosen_candidate_id"], []),
              "rejected_sentences": sentences.get(pair["rejected_candidate_id"], [])}
             for pair in pairs]
    return _templates().get_template("report.html.j2").render(
        iterations=iterations,
        stat_rows=STAT_ROWS,
        exclusion_reasons=sorted({reason for it in iterations for reason in it["exclusions"]}),
        plots=[(caption, plots[key]) for key, caption in PLOT_CAPTIONS.items() if plots.get(key)],
        benchmarks=benchmarks,
        versions=sorted({v for row in benchmarks for v in row["values"]}),
        pairs=shown,
        pair_iterations=sorted({pair["iteration"] for pair in pairs}),
    )


def write_report(con: duckdb.DuckDBPyConnection, out: Path, *, pairs: int = 50) -> Path:
    """Write out/report.html from the store behind `con`; returns the page's path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CsrError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    summary = analytics.stats(con)
    histograms = analytics.ri_histograms(con)
    plots = {
        "ri": plot_ri_distribution(histograms),
        "rewards": plot_reward_means(summary["iterations"]),
        "lengths": plot_lengths(summary["iterations"]),
        "benchmarks": plot_benchmarks(summary["benchmarks"]),
    }
    sample = analytics.pair_sample(con, pairs)
    leaves = [p[key] for p in sample for key in ("chosen_candidate_id", "rejected_candidate_id")]
    sentences = analytics.path_sentences(con, leaves)
    thumbnails: dict[tuple, str | None] = {}
    for pair in sample:
        key = (pair["image_root"], pair["image_rel_path"])
        if key not in thumbnails:
            thumbnails[key] = thumbnail_data_uri(*key)
    page = out / "report.html"
    page.write_text(render(summary, plots, sample, sentences, thumbnails), encoding="utf-8")
    return page


# ---------------------------------------------------------------- headless Chromium


def chromium_path() -> str:
    """The Chromium binary: $CSR_CHROMIUM, else chromium / chromium-browser on PATH."""
    override = os.environ.get("CSR_CHROMIUM")
    if override:
        if not Path(override).exists():
            raise CsrError(f"CSR_CHROMIUM={override} does not exist")
        return override
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise CsrError("headless Chromium is needed for --screenshot and was not found: "
                   "install it (Debian: apt-get install chromium) or set CSR_CHROMIUM")


def _chromium(page: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    binary = chromium_path()
    with tempfile.TemporaryDirectory(prefix="csr-chromium-") as profile:
        command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise CsrError(f"headless Chromium did not finish within {timeout:.0f} s") from exc
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise CsrError(f"headless Chromium failed (exit {result.returncode}): {last}")
    return result


def screenshot(page: Path, png: Path, *, width: int = 1400, height: int = 2400) -> Path:
    """Render the page with headless Chromium into a PNG."""
    png = Path(png).resolve()
    png.unlink(missing_ok=True)
    _chromium(page, f"--screenshot={png}", f"--window-size={width},{height}", "--virtual-time-budget=5000")
    if not png.exists():
        raise CsrError("headless Chromium ran but wrote no screenshot")
    return png
