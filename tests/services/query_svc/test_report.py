"""The HTML report as users meet it: `influence score --report`, `influence report`, and
QueryService's report.html (ComputeScoresRequest.report) through a real `influence serve`;
read with an HTML parser for its contents and in headless Chromium (scripts/install/chromium.sh)
for how it shows: no console errors, every section, cards drawn when opened, nothing wider than
its box at 1280x800, and screenshots with real content (kept under the test's tmp dir). The
page's behaviour at scale (1,000 queries x top-100) is test_report_page.py's."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from services.cli import main
from services.client import InfluenceClient
from services.engine.records import read_queries_jsonl
from services.query_svc.report_html import SECTIONS
from tests.support.families import build_family_model, sentences

pytestmark = pytest.mark.needs_servers  # the module's fit and score run the embedded system

TOP_K = 4
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A tiny Llama (sub-word tokenizer), its factors, and a --per-token run over queries in two
    groups and one loner, with --report."""
    root = tmp_path_factory.mktemp("report")
    model = build_family_model("llama", root / "model")
    texts = sentences(24, seed=0)
    (root / "train.jsonl").write_text(
        "".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    queries = [
        {"id": "en", "prompt": "the quick brown", "completion": " fox jumps", "group": "fox"},
        {"id": "para", "prompt": "a quick brown", "completion": " fox leaps", "group": "fox"},
        {"id": "sea", "prompt": "sailors sing", "completion": " by the sea", "group": "sea"},
        {"id": "sea2", "prompt": "the sailors", "completion": " sing at sea", "group": "sea"},
        {"id": "alone", "prompt": "morning tea", "completion": " with silver"},
    ]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    common = ["--model", str(model), "--data", str(root / "train.jsonl"), "--quiet", "--batch-size", "8"]
    assert main(["fit", *common, "--out", str(root / "factors")]) == 0
    score = ["score", *common, "--factors", str(root / "factors"), "--queries", str(root / "queries.jsonl")]
    assert (
        main(
            [
                *score,
                "--out",
                str(root / "out"),
                "--top-k",
                str(TOP_K),
                "--per-token",
                "--per-module",
                "--report",
                str(root / "report.html"),
            ]
        )
        == 0
    )
    return root


class Page(HTMLParser):
    """What a reader of the page gets: section ids, elements by class, table cells, text and
    every URL the page would load."""

    def __init__(self, text: str):
        super().__init__()
        self.sections, self.classes, self.urls, self.tags = [], {}, [], []
        self.cells: list[str] = []
        self._in_cell = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        for name in (attrs.get("class") or "").split():
            self.classes[name] = self.classes.get(name, 0) + 1
        for key in ("src", "href", "xlink:href"):
            if attrs.get(key) and not attrs[key].startswith(("#", "data:")):  # inline is fine
                self.urls.append(attrs[key])
        self._in_cell = tag == "td"
        if tag == "td":
            self.cells.append("")

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_cell = False


def cards_of(text: str) -> list[dict]:
    """The data of each query's card, as the page carries it for its script."""
    found = re.findall(r'<script type="application/json" id="card-(\d+)">(.*?)</script>', text, re.S)
    assert [int(n) for n, _ in found] == list(range(len(found)))
    return [json.loads(payload) for _, payload in found]


def test_the_report_is_built_from_the_result_alone(scored, tmp_path, capsys):
    """`influence report` on the result directory writes the same bytes `score --report` did, and
    the result holds what the layer-wise and cross-query views read."""
    assert main(["report", "--results", str(scored / "out"), "--out", str(tmp_path / "again.html")]) == 0
    assert str(tmp_path / "again.html") in capsys.readouterr().err
    assert (tmp_path / "again.html").read_bytes() == (scored / "report.html").read_bytes()

    report = json.loads((scored / "out" / "results.json").read_text())
    tensors = load_file(str(scored / "out" / "scores.safetensors"))
    assert [q.get("group", "") for q in report["queries"]] == ["fox", "fox", "sea", "sea", ""]
    assert report["settings"]["top_k"] == TOP_K and report["settings"]["model"].endswith("model")
    ids = [json.loads(line)["id"] for line in (scored / "train.jsonl").read_text().splitlines()]
    modules = report["modules"]
    assert tensors["top_index"].shape == (5, TOP_K)
    assert tensors["top_per_module"].shape == (len(modules), 5, TOP_K)
    for q, query in enumerate(report["queries"]):
        assert [ids[i] for i in tensors["top_index"][q]] == [entry["id"] for entry in query["top"]]
        # the layer-wise breakdown adds up to each top sequence's score
        totals = tensors["top_per_module"][:, q, :].sum(0)
        np.testing.assert_allclose(totals, [entry["score"] for entry in query["top"]], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(
            tensors["scores"][q, tensors["top_index"][q]], [e["score"] for e in query["top"]], rtol=1e-5
        )


def test_each_query_carries_its_tokens_and_their_log_probabilities(scored):
    """--per-token: a query's tokens as scored, the completion's each with log p(token | tokens before),
    as the model (loaded here on its own) gives it; prompt tokens have none."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(scored / "model", torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(scored / "model")
    report = json.loads((scored / "out" / "results.json").read_text())
    for query in report["queries"]:
        tokens = query["tokens"]
        ids = torch.tensor([tokenizer.convert_tokens_to_ids([t["token"] for t in tokens])])
        completion = tokenizer(query["completion"], add_special_tokens=False)["input_ids"]
        assert [t["logprob"] is not None for t in tokens] == [False] * (len(tokens) - len(completion)) + [True] * len(
            completion
        )
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None])[:, 0]
        for position, token in enumerate(tokens):
            if token["logprob"] is not None:
                assert token["logprob"] == pytest.approx(float(logprobs[position - 1]), abs=1e-4), (
                    query["id"],
                    position,
                )


def test_the_report_shows_every_view_offline(scored):
    text = (scored / "report.html").read_text()
    page = Page(text)
    assert page.sections == list(SECTIONS)
    assert page.urls == [] and "link" not in page.tags and "img" not in page.tags  # inline scripts only
    assert "positive = up-weighting the training sequence makes the completion more likely" in text
    assert "nats of the completion" in text and "influence of predicting the next token" in text
    report = json.loads((scored / "out" / "results.json").read_text())
    assert report["schema_version"] == 4
    settings = report["settings"]
    assert settings["fisher"] and settings["model_fingerprint"] and settings["created"] and settings["tool_version"]
    inputs = report["inputs"]  # the CLI's inputs, with their checksums
    assert set(inputs) == {"model", "data", "factors", "queries"}
    assert inputs["data"]["path"] == str(scored / "train.jsonl")
    assert inputs["data"]["sha256"] == hashlib.sha256((scored / "train.jsonl").read_bytes()).hexdigest()
    assert inputs["data"]["sha256"] in text and settings["model_fingerprint"] in text
    for query in read_queries_jsonl(scored / "queries.jsonl"):
        assert query.prompt in text and query.completion.strip() in text
    # the overview: a row per query, its top-1 id and score; a card per query
    first = report["queries"][0]["top"][0]
    assert page.classes["overview"] == 1 and text.count("<tr data-q=") == 5
    assert text.count('<details class="query"') == 5
    assert f"{first['score']:+.4g}" in text
    # every card's data: every token of every top sequence, each layer and each module x top sequence
    cards = cards_of(text)
    tokens = sum(len(e["tokens"]) for q in report["queries"] for e in q["top"])
    assert sum(sum(card["tokens"]["counts"]) for card in cards) == tokens
    for card in cards:
        assert len(card["modules"]["rows"]) == len(report["modules"]) and len(card["top"]) == TOP_K
    # the layer-bin chart and the distribution's two tails; a layer-share sparkline per query
    assert page.classes["figure"] == 2 and page.classes["spark"] == 5
    for query in report["queries"]:
        assert f"query {query['id']}, positive" in text and f"query {query['id']}, negative" in text
    # cross-query: a table per group of two; its diagonal is each query's mean top-k score
    cross = text[text.index('<section id="cross-query">') :]
    assert cross.count("<h3>Group ") == 2 and "Group fox" in cross and "Group sea" in cross
    cells = [cell for cell in Page(cross).cells if cell.startswith(("+", "-"))]
    for position in (0, 1, 2, 3):
        mean = np.mean([e["score"] for e in report["queries"][position]["top"]])
        group_start = 0 if position < 2 else 2
        diagonal = cells[group_start * 2 + (position - group_start) * 3]
        assert float(diagonal) == pytest.approx(mean, rel=1e-3), (position, cells)


def test_an_older_result_reports_the_views_it_can(scored, tmp_path, capsys):
    """A result from before top_index/top_per_module and groups: the other views, and a note of
    what each missing view needs."""
    old = tmp_path / "old"
    shutil.copytree(scored / "out", old)
    tensors = load_file(str(old / "scores.safetensors"))
    save_file({"scores": tensors["scores"]}, str(old / "scores.safetensors"))
    report = json.loads((old / "results.json").read_text())
    for query in report["queries"]:
        query.pop("group", None)
        for entry in query["top"]:
            entry.pop("tokens")
            entry.pop("per_module")
    for key in ("settings", "schema_version", "inputs"):
        report.pop(key)
    (old / "results.json").write_text(json.dumps(report))
    assert main(["report", "--results", str(old), "--out", str(tmp_path / "old.html"), "--quiet"]) == 0
    text = (tmp_path / "old.html").read_text()
    assert Page(text).sections == list(SECTIONS)
    assert "score with --per-module" in text and "score with --per-token" in text
    assert "shared &quot;group&quot; in QUERIES.jsonl" in text
    assert Page(text).classes["figure"] == 1  # the distribution only


def test_bad_report_arguments_are_one_line_errors(scored, tmp_path, capsys):
    assert main(["report", "--results", str(tmp_path / "nothing"), "--out", str(tmp_path / "r.html")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("influence report: error: no result at") and "\n" not in error
    broken = tmp_path / "broken"
    shutil.copytree(scored / "out", broken)
    (broken / "scores.safetensors").write_bytes(b"not safetensors")
    assert main(["report", "--results", str(broken), "--out", str(tmp_path / "r.html")]) == 2
    assert "unreadable" in capsys.readouterr().err
    args = ["score", "--model", str(scored / "model"), "--data", str(scored / "train.jsonl"), "--quiet"]
    args += ["--factors", str(scored / "factors"), "--queries", str(scored / "queries.jsonl")]
    assert main([*args, "--out", str(tmp_path / "o"), "--report", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_query_service_returns_the_report_as_a_result_file(scored, served, tmp_path):
    """ComputeScoresRequest.report: report.html among the result's files, the same page the CLI
    makes of the downloaded result."""
    target, _ = served
    with InfluenceClient(target) as client:
        factor_set = client.import_factors(scored / "factors").name
        model = str(scored / "model")
        dataset = client.register_dataset(model, scored / "train.jsonl").name
        queries = read_queries_jsonl(scored / "queries.jsonl")
        result = client.compute_scores(model, factor_set, dataset, queries, top_k=TOP_K, per_module=True, report=True)
        client.download_result(result.name, tmp_path / "result")
    served_page = (tmp_path / "result" / "report.html").read_text()
    assert main(["report", "--results", str(tmp_path / "result"), "--out", str(tmp_path / "cli.html"), "--quiet"]) == 0
    assert (tmp_path / "cli.html").read_text() == served_page
    page = Page(served_page)
    assert page.sections == list(SECTIONS) and "Group fox" in served_page and page.classes["figure"] == 2


# -- in Chromium ----------------------------------------------------------------------------------

OVERFLOWING = """() => [...document.querySelectorAll('body *')]
  .filter(e => !(e.closest('svg')) && e.clientWidth > 0 && e.scrollWidth > e.clientWidth + 1)
  .map(e => e.tagName + '.' + e.className + ' ' + e.scrollWidth + '>' + e.clientWidth)"""


def _pixels(path: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(str(path))[..., :3]


@pytest.mark.needs_browser
@pytest.mark.slow
def test_the_report_in_headless_chromium(scored, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "run scripts/install/chromium.sh"
    report = json.loads((scored / "out" / "results.json").read_text())
    entries = [e for q in report["queries"] for e in q["top"]]
    problems = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("console", lambda m: m.type in ("error", "warning") and problems.append(m.text))
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: r.url.startswith("file://") or problems.append(f"request {r.url}"))
            page.goto((scored / "report.html").as_uri())
            page.wait_for_load_state("load")
            for section in SECTIONS:
                box = page.locator(f"section#{section}").bounding_box()
                assert box and box["width"] > 600 and box["height"] > 40, section
            # cards are drawn when opened: every top sequence's tokens, a layer and a module heatmap each
            assert page.locator("details.query[data-drawn]").count() == 0
            page.click("#expand-all")
            assert page.locator("details.query[data-drawn]").count() == 5
            shown = sum(min(len(e["tokens"]), 60) if len(e["tokens"]) > 80 else len(e["tokens"]) for e in entries)
            assert page.locator("details.query .tokens span").count() == shown
            assert page.locator(".heat").count() == 10
            assert page.locator(".query-tokens .target").count() == sum(
                t["logprob"] is not None for q in report["queries"] for t in q["tokens"]
            )
            ids = page.locator("details#query-0 .heat").first.locator(".col").all_inner_texts()
            assert ids == [e["id"] for e in report["queries"][0]["top"]]
            # the convention: each position's score is that of predicting the next token; shown by
            # default on the predicted token, on the predicting position once the box is unticked
            first = report["queries"][0]["top"][0]["tokens"]
            scale = max(abs(t["score"]) for e in report["queries"][0]["top"] for t in e["tokens"])
            for predicted, offset in ((True, 1), (False, 0)):
                page.set_checked("#predicted", predicted)
                titles = (
                    page.locator("details#query-0 li")
                    .first.locator(".tokens span")
                    .evaluate_all("spans => spans.map(s => +s.title)")
                )
                for position in range(1, min(len(first), 80)):
                    expected = first[position - offset]["score"]
                    assert titles[position] == pytest.approx(expected, abs=scale / 100), (predicted, position)
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            assert page.evaluate(OVERFLOWING) == []
            for figure in page.locator("svg.figure").all():  # every plot inside its section
                assert figure.bounding_box()["x"] + figure.bounding_box()["width"] <= 1280
            page.screenshot(path=str(tmp_path / "report-viewport.png"))
            page.screenshot(path=str(tmp_path / "report-full.png"), full_page=True)
            page.locator("section#distribution").screenshot(path=str(tmp_path / "distribution.png"))
        finally:
            browser.close()
    assert problems == []
    viewport, full = _pixels(tmp_path / "report-viewport.png"), _pixels(tmp_path / "report-full.png")
    assert viewport.shape[:2] == (800, 1280) and full.shape[0] > 2000
    for pixels in (viewport, full, _pixels(tmp_path / "distribution.png")):
        colors, counts = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0, return_counts=True)
        background = counts.max() / counts.sum()  # the most common colour's share of the picture
        assert 0.1 < 1 - background < 0.9 and len(colors) > 50  # content, neither blank nor a solid block
    # the token shading is on screen: strongly red pixels in the first screen of queries
    red = (full[..., 0] > 0.8) & (full[..., 1] < 0.5) & (full[..., 2] < 0.5)
    assert red.sum() > 200


# -- --json and `influence operations` ------------------------------------------------------------


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_output_and_operations_through_a_server(scored, served, tmp_path, capsys):
    """`--json` makes stdout JSON lines only (progress, then the outcome); `influence operations`
    lists the server's jobs and follows one to its end."""
    target, _ = served
    args = ["score", "--server", target, "--model", str(scored / "model"), "--data", str(scored / "train.jsonl")]
    args += ["--factors", str(scored / "factors"), "--queries", str(scored / "queries.jsonl"), "--top-k", "2"]
    assert main([*args, "--out", str(tmp_path / "out"), "--json", "--report", str(tmp_path / "r.html")]) == 0
    captured = capsys.readouterr()
    events = _json_lines(captured.out)  # every line parses
    assert captured.err == ""
    progress = [e for e in events if e["event"] == "progress"]
    # (no register_dataset job when the server already holds this data: datasets are content-addressed)
    assert progress and "compute_scores" in {e["kind"] for e in progress}
    # done within total, where the total is known yet (0: not yet)
    assert all(e["phase"] and e["done"] >= 0 and (e["total"] == 0 or e["done"] <= e["total"]) for e in progress)
    done = events[-1]
    assert done["event"] == "done" and done["command"] == "score" and done["queries"] == 5
    assert done["sequences"] == 24 and done["report"] == str(tmp_path / "r.html") and Path(done["report"]).is_file()
    result = done["result"]

    assert main(["operations", "--server", target, "--json"]) == 0
    listed = _json_lines(capsys.readouterr().out)
    assert all(e["event"] == "operation" for e in listed)
    scoring = [e for e in listed if e["target"] == result]
    assert len(scoring) == 1 and scoring[0]["kind"] == "compute_scores" and scoring[0]["state"] == "succeeded"
    assert main(["operations", "--server", target, "--kind", "register_dataset", "--json"]) == 0
    kinds = {e["kind"] for e in _json_lines(capsys.readouterr().out)}
    assert kinds == {"register_dataset"}

    assert main(["operations", "--server", target]) == 0
    table = capsys.readouterr().out
    assert scoring[0]["name"] in table and "succeeded" in table and result in table

    assert main(["operations", "--server", target, "--follow", scoring[0]["name"], "--json"]) == 0
    followed = _json_lines(capsys.readouterr().out)[-1]
    assert followed["event"] == "done" and followed["state"] == "succeeded" and followed["target"] == result

    assert main(["operations", "--server", target, "--follow", "operations/nosuchjob", "--json"]) == 2
    captured = capsys.readouterr()
    error = _json_lines(captured.out)[-1]
    assert error["event"] == "error" and error["exit_code"] == 2 and "not found" in error["message"]
    assert main(["operations"]) == 2
    assert "give --server HOST:PORT" in capsys.readouterr().err
