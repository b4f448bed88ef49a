"""The report page from results made without a model (tests/support/results.py): the overview
first, cards drawn when opened, approximate scores marked, a search, downloads; and, in Chromium,
a report of 1,000 queries x top-100 under 25 MB whose first screen shows within 2 s."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.cli import main
from services.query_svc.report_html import SECTIONS, build_report
from tests.support import ROOT
from tests.support.results import write_result

CHROMIUM = "/usr/bin/chromium"


def _cards(text: str) -> list[dict]:
    return [json.loads(p) for p in re.findall(r'<script type="application/json" id="card-\d+">(.*?)</script>', text)]


def test_the_overview_comes_first_and_cards_carry_their_data(tmp_path):
    result = write_result(tmp_path / "r", queries=6, top_k=5, train=80, layers=4, tokens=12, groups=2)
    text = build_report(result)
    report = json.loads((result / "results.json").read_text())
    # the sections, the overview first: one row per query with its top-1 id, score and tail exponents
    assert re.findall(r'<section id="([^"]+)"', text) == list(SECTIONS)
    overview = text[text.index('<section id="overview">') : text.index('<section id="queries">')]
    assert overview.count("<tr data-q=") == 6 and 'id="search"' in overview
    for position, query in enumerate(report["queries"]):
        top = query["top"][0]
        assert f'href="#query-{position}">{query["id"]}</a>' in overview
        assert top["id"] in overview and f"{top['score']:+.4g}" in overview
    # cards: collapsed, each with the data its script draws from (the tokens' scores within 1/127)
    assert text.count('<details class="query"') == 6 and '<details class="query" open' not in text
    for card, query in zip(_cards(text), report["queries"], strict=True):
        assert [score for _, score, _ in card["top"]] == [e["score"] for e in query["top"]]
        values = np.frombuffer(base64.b64decode(card["tokens"]["values"]), dtype="<i1") / 127 * card["tokens"]["scale"]
        expected = np.array([t["score"] for e in query["top"] for t in e["tokens"]])
        np.testing.assert_allclose(values, expected, atol=card["tokens"]["scale"] / 127)
        assert card["layers"]["rows"] == [f"layer {n}" for n in range(4)] and "modules" not in card
    # the settings table and provenance
    assert "results.json schema</th><td>2" in text and "fisher</th><td>sampled" in text
    assert "exact (every score computed from recomputed gradients)" in text


def test_approximate_scores_are_marked(tmp_path):
    result = write_result(tmp_path / "r", queries=3, top_k=4, train=40, tokens=0, approximate=True)
    text = build_report(result)
    assert "12 top-k scores are index scores, not rescored (approximate" in text
    assert text.count("<td class='num'>≈+") == 3  # each overview score
    assert all(approximate == 1 for card in _cards(text) for _, _, approximate in card["top"])


def test_the_most_negative_sequences_ride_in_each_card(tmp_path):
    """--bottom-k: each card carries its bottom list (most negative first) after its top one, and
    their token scores after the top's; the settings name bottom k."""
    result = write_result(tmp_path / "r", queries=3, top_k=4, train=40, tokens=6, bottom_k=3)
    text = build_report(result)
    report = json.loads((result / "results.json").read_text())
    sequences = json.loads(re.search(r'<script type="application/json" id="sequences">(.*?)</script>', text).group(1))
    for card, query in zip(_cards(text), report["queries"], strict=True):
        assert [sequences[s][0] for s, _, _ in card["bottom"]] == [e["id"] for e in query["bottom"]]
        scores = [score for _, score, _ in card["bottom"]]
        assert scores == sorted(scores) and scores[0] < 0
        assert card["tokens"]["counts"] == [len(e["tokens"]) for e in query["top"] + query["bottom"]]
    assert "bottom k</th><td>3" in text and "results.json schema</th><td>3" in text
    plain = build_report(write_result(tmp_path / "plain", queries=3, top_k=4, train=40, tokens=6))
    assert "bottom k</th>" not in plain and all("bottom" not in card for card in _cards(plain))


@pytest.mark.needs_browser
def test_the_bottom_list_beside_the_top_in_chromium(tmp_path):
    """A card shows the most negative sequences beside the most positive; a sequence of either
    list expands; each names its line in the training file; the CSV download marks each row's tail
    and line; the bottom list has its layer heatmap beside the top's."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "run scripts/install/chromium.sh"
    result = write_result(tmp_path / "r", queries=2, top_k=3, train=30, tokens=0, bottom_k=2, lines=True)
    page_path = tmp_path / "report.html"
    assert main(["report", "--results", str(result), "--out", str(page_path), "--quiet"]) == 0
    query = json.loads((result / "results.json").read_text())["queries"][1]
    problems = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(accept_downloads=True)
            page.on("console", lambda m: m.type in ("error", "warning") and problems.append(m.text))
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(page_path.as_uri())
            page.click("table.overview a[href='#query-1']")
            card = page.locator("details#query-1")
            card.locator(".tails").wait_for(state="visible")
            assert card.locator("ol.top li").count() == 5 and card.locator("ol.bottom li").count() == 2
            shown = card.locator("ol.bottom li .meta").all_inner_texts()
            for entry, line in zip(query["bottom"], shown, strict=True):
                assert entry["id"] in line and f"line {entry['line']} " in line
            assert card.locator(".heat").count() == 2  # layers x top sequences, layers x most negative ones
            if card.locator("ol.bottom button.whole").count():
                card.locator("ol.bottom button.whole").first.click()
            with page.expect_download() as download:
                card.locator("button[data-download='csv']").click()
            rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
            assert [row["tail"] for row in rows] == ["top"] * 3 + ["bottom"] * 2
            assert [row["training_id"] for row in rows[3:]] == [e["id"] for e in query["bottom"]]
            assert [int(row["line"]) for row in rows] == [e["line"] for e in query["top"] + query["bottom"]]
        finally:
            browser.close()
    assert problems == []


def test_both_tails_in_the_cross_query_and_layer_views(tmp_path):
    """With the bottom index in scores.safetensors (--bottom-k), the cross-query view has a table
    of each query's most negative sequences beside its top one, and the layer view a bar per tail;
    a result without the bottom tensors (older files) shows the top tail alone."""
    from services.query_svc.report_data import load_result
    from services.query_svc.report_html import render

    result = write_result(tmp_path / "r", queries=4, top_k=3, train=40, tokens=0, groups=2, bottom_k=3)
    data = load_result(result)
    report = json.loads((result / "results.json").read_text())
    ids = {f"train-{i}": i for i in range(40)}
    for cross in data.cross:
        members = [int(q[1:]) for q in cross.query_ids]
        for row, source in enumerate(members):
            chosen = [ids[e["id"]] for e in report["queries"][source]["bottom"]]
            expected = [data.scores[target, chosen].mean() for target in members]
            np.testing.assert_allclose(cross.bottom[row], expected, rtol=1e-12)
    assert all(q.bottom_layers is not None and q.bottom_layers.scores.shape == (12, 3) for q in data.queries)
    text = render(data)
    assert text.count('<table class="cross most-negative">') == 2 and text.count('<table class="cross top">') == 2
    assert "<th>most negative (bottom-k)</th>" in text
    assert all("bottom_layers" in card for card in _cards(text))

    old = write_result(
        tmp_path / "old", queries=4, top_k=3, train=40, tokens=0, groups=2, bottom_k=3, bottom_tensors=False
    )
    data = load_result(old)
    assert all(cross.bottom is None for cross in data.cross) and all(q.bottom_layers is None for q in data.queries)
    text = render(data)
    assert '<table class="cross most-negative">' not in text and "<th>most negative (bottom-k)</th>" not in text


def test_a_self_influence_result_has_an_overview_too(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "results.json").write_text(
        json.dumps(
            {
                "kind": "self",
                "strategy": "ekfac",
                "damping": "d",
                "top": [
                    {"rank": 1, "id": "a", "score": 2.0, "text": "alpha"},
                    {"rank": 2, "id": "b", "score": 1.0, "text": "beta"},
                ],
            }
        )
    )
    save_file({"scores": np.array([2.0, 1.0, -0.5], dtype=np.float32)}, str(tmp_path / "scores.safetensors"))
    text = build_report(tmp_path)
    assert (
        re.findall(r'<section id="([^"]+)"', text) == list(SECTIONS)
        and "alpha" in text
        and "<details class" not in text
    )


def test_report_refuses_an_out_that_is_a_directory_or_under_a_missing_one(tmp_path, capsys):
    result = write_result(tmp_path / "r", queries=2, top_k=2, train=10, tokens=0)
    assert main(["report", "--results", str(result), "--out", str(tmp_path)]) == 2
    assert "--out " in capsys.readouterr().err
    assert main(["report", "--results", str(result), "--out", str(tmp_path / "no" / "such" / "r.html")]) == 2
    error = capsys.readouterr().err
    assert "--out" in error and "does not exist" in error and not (tmp_path / "no").exists()


WITHOUT = """
import sys, importlib.abc
class Absent(importlib.abc.MetaPathFinder):  # a client-only install: these packages are not there
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Absent())
from services.cli import main
code = main(["report", "--results", sys.argv[1], "--out", sys.argv[2], "--quiet"])
assert "torch" not in sys.modules, "torch imported"
sys.exit(code)
"""


@pytest.mark.slow  # a fresh interpreter imports matplotlib and draws: ~5 s
@pytest.mark.parametrize(
    ("blocked", "code"), [({"torch", "transformers"}, 0), ({"torch", "transformers", "matplotlib"}, 2)]
)
def test_report_runs_in_a_client_only_install(tmp_path, blocked, code):
    """`influence report` without torch (numpy, safetensors and matplotlib: the `report` extra); without
    those, one line naming what it needs."""
    result = write_result(tmp_path / "r", queries=3, top_k=3, train=20, tokens=0)
    ran = subprocess.run(
        [sys.executable, "-c", WITHOUT.format(blocked=sorted(blocked)), str(result), str(tmp_path / "r.html")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert ran.returncode == code, ran.stderr
    if code:
        assert ran.stderr.count("\n") == 1 and "needs matplotlib" in ran.stderr and "[report]" in ran.stderr
    else:
        assert (tmp_path / "r.html").stat().st_size > 1000


# -- in Chromium ----------------------------------------------------------------------------------

# when the browser first painted, when it had read the overview (the page marks it), and when it
# painted the largest element of the first screen (ms since the navigation began)
FIRST_SCREEN = """() => new Promise((resolve) => new PerformanceObserver((list) => resolve({
  painted: performance.getEntriesByName('first-contentful-paint')[0].startTime,
  overview: performance.getEntriesByName('overview')[0].startTime,
  largest: list.getEntries().at(-1).startTime,
})).observe({type: 'largest-contentful-paint', buffered: true}))"""


@pytest.mark.needs_browser
@pytest.mark.slow
def test_a_thousand_queries_at_top_100_in_chromium(tmp_path):
    """1,000 queries x top-100 (5,000 sequences, 12 layers): under 25 MB, the overview painted
    within 2 s, a search narrows the overview and the cards, a card opens from its link and
    closes, its rows download as CSV."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "run scripts/install/chromium.sh"
    result = write_result(tmp_path / "r", queries=1000, top_k=100, train=5000, tokens=0, groups=3)
    page_path = tmp_path / "report.html"
    assert main(["report", "--results", str(result), "--out", str(page_path), "--quiet"]) == 0
    size = page_path.stat().st_size
    assert size < 25 * 2**20, size
    problems = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
            page.on("console", lambda m: m.type in ("error", "warning") and problems.append(m.text))
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: r.url.startswith(("file://", "blob:")) or problems.append(r.url))
            page.goto(page_path.as_uri())
            first_screen = page.evaluate(FIRST_SCREEN)
            assert max(first_screen.values()) < 2000, first_screen
            assert page.locator("table.overview tr[data-q='0']").is_visible()
            # every section is a link away on the first screen
            for section in SECTIONS:
                assert page.locator(f"nav a[href='#{section}']").is_visible()
            assert page.locator("details.query[data-drawn]").count() == 0
            # search: a training id, a group, text
            page.fill("#search", "q99")
            page.wait_for_function("document.getElementById('matches').textContent.startsWith('11 of 1000')")
            assert page.locator("table.overview tr[data-q]:not([hidden])").count() == 11
            assert page.locator("details.query:not([hidden])").count() == 11
            page.fill("#search", "g1")
            page.wait_for_function("document.getElementById('matches').textContent.startsWith('2 of 1000')")
            page.fill("#search", "")
            page.wait_for_function("document.getElementById('matches').textContent === ''")
            assert page.locator("details.query:not([hidden])").count() == 1000
            # the overview lists the first 100 (a search looks through all), the rest on demand
            assert page.locator("table.overview tr[data-q]:not([hidden])").count() == 100
            page.click("#show-all")
            assert page.locator("table.overview tr[data-q]:not([hidden])").count() == 1000
            # a card opens from its overview link, is drawn, closes
            page.click("table.overview a[href='#query-500']")
            card = page.locator("details#query-500")
            card.locator(".heat").wait_for(state="visible")
            assert card.evaluate("d => d.open") and page.locator("details.query[data-drawn]").count() == 1
            assert card.locator("ol.top li").count() == 100
            with page.expect_download() as download:
                card.locator("button[data-download='csv']").click()
            rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
            report = json.loads((result / "results.json").read_text())
            expected = report["queries"][500]["top"]
            assert [row["training_id"] for row in rows] == [e["id"] for e in expected]
            assert [float(row["score"]) for row in rows] == [e["score"] for e in expected]
            card.locator("summary").click()
            assert not card.evaluate("d => d.open")
        finally:
            browser.close()
    assert problems == []
