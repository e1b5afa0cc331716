"""csr report: a static page that loads in headless Chromium with its plots and pairs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from csr.engine.io import report
from tests.analytics_fixtures import Study, fill_study, sqlite_store
from tests.cli_runner import invoke_csr

needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
    reason="headless Chromium is not installed (Debian: apt-get install chromium)",
)


@pytest.fixture
def study_store(tmp_path: Path) -> tuple[str, Study]:
    url, engine = sqlite_store(tmp_path)
    study = fill_study(engine, tmp_path / "images", prompts=5)
    engine.dispose()
    return url, study


def body_data(dom: str) -> dict[str, str]:
    """The data-* attributes the page's load check writes on <body>."""
    match = re.search(r"<body([^>]*)>", dom)
    assert match, dom[:500]
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', match.group(1)))


def default_pairs(study: Study) -> list:
    return [p for p in study.pairs if p.is_default]


@needs_chromium
def test_report_loads_in_chromium_with_every_pair(study_store, tmp_path: Path):
    url, study = study_store
    out = tmp_path / "report"
    result = invoke_csr("--db", url, "report", "--out", out, "--pairs", "100")
    assert result.returncode == 0, result.stderr
    page = out / "report.html"
    html = page.read_text()
    # Nothing to fetch: every image is a data URI and no link leaves the page.
    assert not re.findall(r'(?:src|href)="(?!data:|#)', html)
    assert "http://" not in html and "https://" not in html
    assert html.count('class="plot"') == 4  # R_I distribution, rewards, lengths, CHAIR

    dom = dump_dom(page)
    data = body_data(dom)
    pairs = default_pairs(study)
    assert data["state"] == "loaded"
    assert data["errors"] == "0"
    assert data["broken-images"] == "0"
    assert data["pairs"] == str(len(pairs))
    assert len(re.findall(r'<section class="pair[ "]', dom)) == len(pairs)
    assert len(re.findall(r'<img class="thumb"', dom)) == len(pairs)
    # One row per sentence of each chosen and rejected response, with R_T, R_I and R(s).
    sentences = sum(len(p.chosen_node_path) + len(p.rejected_node_path) for p in pairs)
    assert len(re.findall(r'<tr class="sentence">', dom)) == sentences
    some = pairs[0]
    assert re.sub(r"\s+", " ", some.chosen_node_path[0]["text"]) in dom


@needs_chromium
def test_report_pair_limit_and_screenshot(study_store, tmp_path: Path):
    url, study = study_store
    out = tmp_path / "report"
    result = invoke_csr("--db", url, "report", "--out", out, "--pairs", "3", "--screenshot")
    assert result.returncode == 0, result.stderr
    dom = dump_dom(out / "report.html")
    assert body_data(dom)["pairs"] == "3"
    # The sample spreads over iterations.
    assert set(re.findall(r'<section class="pair[^"]*" id="pair-\d+" data-iteration="(\d+)"', dom)) == {"1", "2"}
    png = out / "report.png"
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.size[0] >= 800 and image.size[1] >= 600
        # Not a blank page: the screenshot has more than one colour.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or range(2)) > 1


@needs_chromium
def test_missing_image_shows_a_placeholder(study_store, tmp_path: Path):
    url, study = study_store
    for image in study.image_dir.iterdir():
        image.unlink()
    out = tmp_path / "report"
    assert invoke_csr("--db", url, "report", "--out", out, "--pairs", "2").returncode == 0
    dom = dump_dom(out / "report.html")
    assert body_data(dom)["broken-images"] == "0"
    assert dom.count("image not found") == 2


@needs_chromium
def test_report_of_an_empty_store(tmp_path: Path):
    url, engine = sqlite_store(tmp_path)
    engine.dispose()
    out = tmp_path / "report"
    result = invoke_csr("--db", url, "report", "--out", out)
    assert result.returncode == 0, result.stderr
    data = body_data(dump_dom(out / "report.html"))
    assert (data["state"], data["errors"], data["pairs"]) == ("loaded", "0", "0")


def test_screenshot_without_chromium_is_a_clear_error(study_store, tmp_path: Path):
    url, _ = study_store
    out = tmp_path / "report"
    result = invoke_csr("--db", url, "report", "--out", out, "--pairs", "1", "--screenshot",
                        env={"PATH": str(tmp_path / "empty-bin"), "CSR_CHROMIUM": ""})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Chromium" in lines[0] and "not found" in lines[0], result.stderr
    assert (out / "report.html").exists() and not (out / "report.png").exists()


def test_out_must_be_a_directory(study_store, tmp_path: Path):
    url, _ = study_store
    file = tmp_path / "taken"
    file.write_text("x")
    result = invoke_csr("--db", url, "report", "--out", file)
    assert result.returncode == 1 and "not a directory" in result.stderr


def test_store_text_cannot_inject_markup():
    """Prompts, sentences and paths come from the store: they render as text, never as markup."""
    injected = "<script>alert(1)</script>"
    pair = {"pair_id": 1, "iteration": 1, "image_root": "/images", "image_rel_path": 'a.jpg" onerror="alert(2)',
            "external_id": "<b>p1</b>", "margin": 0.5, "prompt": f"Describe {injected}",
            "chosen_candidate_id": 10, "chosen_reward": 1.0, "chosen_words": 3,
            "rejected_candidate_id": 11, "rejected_reward": 0.5, "rejected_words": 4}
    sentences = {10: [{"text": f"A cat {injected}", "r_t": -0.1, "r_i": 25.0, "reward": 1.0}], 11: []}
    thumbnails = {("/images", pair["image_rel_path"]): "data:image/jpeg;base64,AAAA"}
    page = report.render({"iterations": [], "benchmarks": []}, {}, [pair], sentences, thumbnails)
    assert page.count("<script>") == 1  # the page's own
    assert "alert(1)" in page and "<script>alert" not in page
    assert "Describe &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "A cat &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;p1&lt;/b&gt;" in page and "<b>" not in page
    assert 'onerror="' not in page and 'alt="a.jpg&#34; onerror=&#34;alert(2)"' in page


def dump_dom(page: Path) -> str:
    """The page's DOM after load (scripts run), as headless Chromium serialises it."""
    return report._chromium(page, "--dump-dom", "--virtual-time-budget=5000").stdout


def test_the_plots_are_svg_documents_of_the_figures(study_store, tmp_path):
    import base64
    from xml.dom import minidom

    from csr.storage import analytics

    url, study = study_store
    page = tmp_path / "report"
    done = invoke_csr("--db", url, "report", "--out", str(page))
    assert done.returncode == 0, done.stderr
    uris = re.findall(r'<img class="plot" src="data:image/svg\+xml;base64,([^"]+)"', (page / "report.html").read_text())
    assert len(uris) == 4
    documents = [minidom.parseString(base64.b64decode(uri)) for uri in uris]  # raises on malformed XML
    assert all(doc.documentElement.tagName == "svg" for doc in documents)
    # Figure 5: one panel per iteration with pairs, one outline per side.
    with analytics.connect(url) as con:
        histograms = analytics.ri_histograms(con)
    titles = [t.firstChild.data for t in documents[0].getElementsByTagName("text") if t.firstChild]
    assert [f"iteration {h['iteration']}" for h in histograms] == [t for t in titles if t.startswith("iteration")]
    assert len(documents[0].getElementsByTagName("polygon")) == 2 * len(histograms)
    pairs = default_pairs(study)
    assert sum(sum(h["chosen"]) for h in histograms) == len(pairs)
    # Table 10: a bar per side and iteration with pairs.
    bars = [r for r in documents[1].getElementsByTagName("rect")
            if r.getAttribute("fill") in (report.CHOSEN_COLOUR, report.REJECTED_COLOUR) and r.getAttribute("width") != "10"]
    assert len(bars) == 2 * len(histograms)
