"""`csr report`: one static HTML page of the study's figures and a browsable pair sample.

The page opens from disk with no server and no network: plots are
matplotlib PNGs and image thumbnails JPEGs, both embedded as data URIs, and
the only script is inline (an iteration filter, and a load check that the
tests read back through headless Chromium).
"""

from __future__ import annotations

import base64
import html
import io
import os
import shutil
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

import duckdb

from csr.engine.errors import CsrError
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


def _png_data_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    # Agg: no display, no GUI toolkit; must be chosen before pyplot is imported.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_ri_distribution(pairs: list[dict]) -> str | None:
    """Figure 5 of the paper: R_I (CLIP relevance) of chosen and rejected responses per iteration."""
    by_iteration: dict[int, list[dict]] = defaultdict(list)
    for pair in pairs:
        by_iteration[pair["iteration"]].append(pair)
    if not by_iteration:
        return None
    plt = _pyplot()
    iterations = sorted(by_iteration)
    figure, axes = plt.subplots(1, len(iterations), figsize=(4.2 * len(iterations), 3.2), squeeze=False,
                                sharey=True)
    for ax, number in zip(axes[0], iterations, strict=True):
        chosen = [p["chosen_mean_r_i"] for p in by_iteration[number] if p["chosen_mean_r_i"] is not None]
        rejected = [p["rejected_mean_r_i"] for p in by_iteration[number] if p["rejected_mean_r_i"] is not None]
        values = chosen + rejected
        bins = 20 if values and min(values) != max(values) else 1
        ax.hist(rejected, bins=bins, range=_range(values), alpha=0.6, color=REJECTED_COLOUR, label="rejected")
        ax.hist(chosen, bins=bins, range=_range(values), alpha=0.6, color=CHOSEN_COLOUR, label="chosen")
        ax.set_title(f"iteration {number}")
        ax.set_xlabel("mean R_I over sentences")
    axes[0][0].set_ylabel("responses")
    axes[0][-1].legend()
    return _png_data_uri(figure)


def _range(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    low, high = min(values), max(values)
    return (low, high) if low != high else (low - 0.5, high + 0.5)


def plot_reward_means(iterations: list[dict]) -> str | None:
    """Table 10 of the paper: mean reward of chosen and rejected responses per iteration."""
    rows = [it for it in iterations if it["pairs"]]
    if not rows:
        return None
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(5.5, 3.2))
    xs = range(len(rows))
    width = 0.38
    ax.bar([x - width / 2 for x in xs], [it["chosen_mean_reward"] for it in rows], width, color=CHOSEN_COLOUR,
           label="chosen")
    ax.bar([x + width / 2 for x in xs], [it["rejected_mean_reward"] for it in rows], width,
           color=REJECTED_COLOUR, label="rejected")
    ax.set_xticks(list(xs), [f"iter {it['iteration']}" for it in rows])
    ax.set_ylabel("mean R(y)")
    ax.legend()
    return _png_data_uri(figure)


def plot_lengths(iterations: list[dict]) -> str | None:
    """Table 7 of the paper: mean response length in words per iteration."""
    rows = [it for it in iterations if it["final_responses"]]
    if not rows:
        return None
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(5.5, 3.2))
    labels = [it["iteration"] for it in rows]
    for key, label, colour in (("final_mean_words", "all final responses", ALL_COLOUR),
                               ("chosen_mean_words", "chosen", CHOSEN_COLOUR),
                               ("rejected_mean_words", "rejected", REJECTED_COLOUR)):
        points = [(n, it[key]) for n, it in zip(labels, rows, strict=True) if it[key] is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colour, label=label)
    ax.set_xticks(labels, [f"iter {n}" for n in labels])
    ax.set_ylabel("mean words")
    ax.legend()
    return _png_data_uri(figure)


def plot_benchmarks(rows: list[dict]) -> str | None:
    """Each benchmark figure across model versions (the paper's figure 3 view),
    one panel per benchmark and data set, 95 % bootstrap intervals as error bars.
    Word counts are left out: they are not on the 0-1 scale of the rest."""
    rows = [r for r in rows if r["metric"] not in ("words", "mean_words") and r["values"]]
    if not rows:
        return None
    plt = _pyplot()
    panels = list(dict.fromkeys((r["benchmark"], r["dataset"]) for r in rows))
    figure, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.4), squeeze=False)
    for ax, (benchmark, dataset) in zip(axes[0], panels, strict=True):
        for row in (r for r in rows if (r["benchmark"], r["dataset"]) == (benchmark, dataset)):
            if benchmark == "pope" and not row["metric"].endswith("F1"):
                continue  # F1 carries POPE's panel; accuracy and yes-ratio are in the table
            points = sorted((int(v), x) for v, x in row["values"].items())
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            intervals = {int(v): ci for v, ci in row["intervals"].items()}
            if intervals:
                low = [y - intervals[x][0] if x in intervals else 0.0 for x, y in points]
                high = [intervals[x][1] - y if x in intervals else 0.0 for x, y in points]
                ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=row["metric"])
            else:
                ax.plot(xs, ys, marker="o", label=row["metric"])
            ax.set_xticks(xs, [f"v{x}" for x in xs])
        ax.set_title(f"{benchmark} · {dataset}" if dataset else benchmark)
        ax.set_xlabel("model version")
        ax.legend(fontsize="small")
    return _png_data_uri(figure)


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

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { margin-bottom: 4px; } .muted { color: #666; font-size: 0.9em; }
table.stats { border-collapse: collapse; margin: 12px 0; font-size: 0.9em; }
table.stats td, table.stats th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
table.stats td:first-child, table.stats th:first-child { text-align: left; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.plots figure { margin: 0; } .plots img { max-width: 100%; border: 1px solid #eee; }
.filter button { margin-right: 6px; padding: 3px 10px; cursor: pointer; }
.filter button.active { background: #264653; color: white; }
.pair { border: 1px solid #ddd; border-radius: 6px; padding: 12px; margin: 12px 0; display: grid;
        grid-template-columns: 240px 1fr 1fr; gap: 14px; }
.pair.hidden { display: none; }
.pair .thumb { max-width: 224px; border-radius: 4px; }
.pair .noimage { width: 224px; height: 100px; background: #f3f3f3; color: #999; display: flex;
                 align-items: center; justify-content: center; font-size: 0.8em; text-align: center; }
.response h4 { margin: 0 0 6px 0; } .chosen h4 { color: #2a9d8f; } .rejected h4 { color: #e76f51; }
.response table { border-collapse: collapse; font-size: 0.85em; width: 100%; }
.response td { border-top: 1px solid #eee; padding: 2px 4px; vertical-align: top; }
.response td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
"""

# Counts script errors and images that failed to decode into data attributes
# of <body>, so a headless browser's DOM dump shows whether the page is sound.
_SCRIPT = """
(function () {
  var errors = 0;
  window.addEventListener('error', function () { errors += 1; document.body.dataset.errors = errors; }, true);
  function filter(value) {
    document.querySelectorAll('.filter button').forEach(function (b) {
      b.classList.toggle('active', b.dataset.iteration === value);
    });
    document.querySelectorAll('.pair').forEach(function (p) {
      p.classList.toggle('hidden', value !== 'all' && p.dataset.iteration !== value);
    });
  }
  document.addEventListener('DOMContentLoaded', function () {
    document.querySelectorAll('.filter button').forEach(function (b) {
      b.addEventListener('click', function () { filter(b.dataset.iteration); });
    });
  });
  window.addEventListener('load', function () {
    var broken = 0;
    document.querySelectorAll('img').forEach(function (img) {
      if (!img.complete || img.naturalWidth === 0) { broken += 1; }
    });
    document.body.dataset.brokenImages = broken;
    document.body.dataset.errors = errors;
    document.body.dataset.pairs = document.querySelectorAll('.pair').length;
    document.body.dataset.state = 'loaded';
  });
})();
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _num(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _stats_table(iterations: list[dict]) -> str:
    rows = (
        ("prompts searched", "prompts", "d"), ("candidates", "candidates", "d"),
        ("final responses", "final_responses", "d"), ("excluded candidates", "excluded", "d"),
        ("pairs (default set)", "pairs", "d"),
        ("chosen mean R(y)", "chosen_mean_reward", ".3f"), ("rejected mean R(y)", "rejected_mean_reward", ".3f"),
        ("chosen mean R_T", "chosen_mean_r_t", ".4f"), ("rejected mean R_T", "rejected_mean_r_t", ".4f"),
        ("chosen mean R_I", "chosen_mean_r_i", ".3f"), ("rejected mean R_I", "rejected_mean_r_i", ".3f"),
        ("mean words, final responses", "final_mean_words", ".1f"),
        ("chosen mean words", "chosen_mean_words", ".1f"), ("rejected mean words", "rejected_mean_words", ".1f"),
    )
    head = "".join(f"<th>iter {it['iteration']}</th>" for it in iterations)
    body = []
    for label, key, spec in rows:
        cells = "".join(f"<td>{_num(it[key], spec)}</td>" for it in iterations)
        body.append(f"<tr><td>{_e(label)}</td>{cells}</tr>")
    for quantile in ("min", "median", "max"):
        cells = "".join(f"<td>{_num(it['margin'][quantile])}</td>" for it in iterations)
        body.append(f"<tr><td>margin {quantile}</td>{cells}</tr>")
    reasons = sorted({reason for it in iterations for reason in it["exclusions"]})
    for reason in reasons:
        cells = "".join(f"<td>{it['exclusions'].get(reason, 0)}</td>" for it in iterations)
        body.append(f"<tr><td>excluded: {_e(reason)}</td>{cells}</tr>")
    return f'<table class="stats"><tr><th></th>{head}</tr>{"".join(body)}</table>'


def _benchmark_table(rows: list[dict]) -> str:
    versions = sorted({int(v) for row in rows for v in row["values"]})
    head = "".join(f"<th>v{v}</th>" for v in versions)
    body = []
    for row in rows:
        values = {int(v): x for v, x in row["values"].items()}
        intervals = {int(v): ci for v, ci in row["intervals"].items()}
        cells = "".join(
            "<td></td>" if v not in values else
            f"<td>{_num(values[v], '.3f')}"
            + (f' <span class="muted">[{_num(intervals[v][0], ".3f")}, {_num(intervals[v][1], ".3f")}]</span>'
               if v in intervals else "") + "</td>"
            for v in versions)
        body.append(f"<tr><td>{_e(row['benchmark'])}</td><td>{_e(row['dataset'])}</td>"
                    f"<td>{_e(row['metric'])}</td>{cells}</tr>")
    return ('<table class="stats"><tr><th>benchmark</th><th>data set</th><th>metric</th>'
            f"{head}</tr>{''.join(body)}</table>")


def _response_html(kind: str, reward, words, sentences: list[dict]) -> str:
    rows = "".join(
        f'<tr class="sentence"><td>{_e(s["text"])}</td><td class="num">{_num(s["r_t"], ".4f")}</td>'
        f'<td class="num">{_num(s["r_i"], ".2f")}</td><td class="num">{_num(s["reward"], ".3f")}</td></tr>'
        for s in sentences
    )
    return (
        f'<div class="response {kind}"><h4>{kind} &middot; R(y) {_num(reward)} &middot; {_e(words)} words</h4>'
        f'<table><tr><td></td><td class="num">R_T</td><td class="num">R_I</td><td class="num">R(s)</td></tr>'
        f"{rows}</table></div>"
    )


def _pair_html(pair: dict, sentences: dict[int, list[dict]], thumbnails: dict[tuple, str | None]) -> str:
    thumb = thumbnails[(pair["image_root"], pair["image_rel_path"])]
    image = (
        f'<img class="thumb" src="{thumb}" alt="{_e(pair["image_rel_path"])}">' if thumb
        else f'<div class="noimage">image not found<br>{_e(pair["image_rel_path"])}</div>'
    )
    return (
        f'<section class="pair" id="pair-{pair["pair_id"]}" data-iteration="{pair["iteration"]}">'
        f'<div>{image}<p class="muted">iteration {pair["iteration"]} &middot; prompt {_e(pair["external_id"])}'
        f' &middot; margin {_num(pair["margin"])}</p><p class="prompt">{_e(pair["prompt"])}</p></div>'
        + _response_html("chosen", pair["chosen_reward"], pair["chosen_words"],
                         sentences.get(pair["chosen_candidate_id"], []))
        + _response_html("rejected", pair["rejected_reward"], pair["rejected_words"],
                         sentences.get(pair["rejected_candidate_id"], []))
        + "</section>"
    )


def render(summary: dict, plots: dict[str, str | None], pairs: list[dict],
           sentences: dict[int, list[dict]], thumbnails: dict[tuple, str | None]) -> str:
    iterations = summary["iterations"]
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<title>csr report</title>",
        f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
        "<h1>CSR study report</h1>",
        f'<p class="muted">{len(iterations)} iteration(s); pair figures use each iteration\'s default pair set; '
        "a response's R_T and R_I are means over its sentences.</p>",
        "<h2>Per iteration</h2>",
        _stats_table(iterations) if iterations else "<p>No iteration yet.</p>",
        '<h2>Plots</h2><div class="plots">',
    ]
    captions = {
        "ri": "R_I of chosen and rejected responses per iteration (paper, figure 5)",
        "rewards": "Mean reward of chosen and rejected responses (paper, table 10)",
        "lengths": "Mean response length in words (paper, table 7)",
        "benchmarks": "Benchmarks per model version, 95 % bootstrap intervals (paper, figure 3)",
    }
    for key, caption in captions.items():
        if plots.get(key):
            parts.append(f'<figure><img class="plot" src="{plots[key]}" alt="{_e(caption)}">'
                         f"<figcaption class=\"muted\">{_e(caption)}</figcaption></figure>")
    parts.append("</div>")
    if summary["benchmarks"]:
        parts += ["<h2>Benchmarks per model version</h2>", _benchmark_table(summary["benchmarks"])]
    parts.append(f"<h2>Pairs ({len(pairs)} shown)</h2>")
    numbers = sorted({p["iteration"] for p in pairs})
    if pairs:
        buttons = ['<button data-iteration="all" class="active">all</button>']
        buttons += [f'<button data-iteration="{n}">iteration {n}</button>' for n in numbers]
        parts.append(f'<div class="filter">{"".join(buttons)}</div>')
    parts += [_pair_html(pair, sentences, thumbnails) for pair in pairs]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(con: duckdb.DuckDBPyConnection, out: Path, *, pairs: int = 50) -> Path:
    """Write out/report.html from the store behind `con`; returns the page's path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CsrError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    summary = analytics.stats(con)
    distributions = analytics.pair_distributions(con)
    plots = {
        "ri": plot_ri_distribution(distributions),
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


def dump_dom(page: Path) -> str:
    """The page's DOM after load (scripts run), as headless Chromium serialises it."""
    return _chromium(page, "--dump-dom", "--virtual-time-budget=5000").stdout
