"""Line numbers of training sequences: each ranked sequence names its 1-based line in the user's
TRAIN.jsonl (blank lines skipped but counted), in results.json, the report (overview, card rows,
CSV/JSON rows) and StreamScoreRows, whether the file was read in place (the embedded system) or
uploaded through UploadDataset; results without lines (older datasets) still report, with "—"."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from services.cli import main
from services.client import InfluenceClient
from services.client.resources import model_spec
from services.engine.records import read_queries_jsonl
from services.query_svc.report_data import load_result
from services.query_svc.report_html import render
from services.toy.models import build_tiny_model, save_model_dir
from services.toy.tokenizer import build_word_tokenizer
from tests.support.results import write_result

WORDS = [f"w{i}" for i in range(30)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny GPT-2, a TRAIN.jsonl with blank and whitespace-only lines between its records (so a
    record's line is not its position + 1), queries, and factors fitted through the CLI."""
    root = tmp_path_factory.mktemp("lines")
    tokenizer = build_word_tokenizer(WORDS)
    save_model_dir(build_tiny_model("gpt2", len(tokenizer), n_layer=1, d_model=16, seed=0), tokenizer, root / "model")
    generator = torch.Generator().manual_seed(3)
    lines = ["", "   "]
    for i in range(12):
        text = " ".join(WORDS[int(j)] for j in torch.randint(0, 30, (4 + i % 5,), generator=generator))
        lines.append(json.dumps({"id": f"t{i}", "text": text}))
        lines += [""] * (i % 3)
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "queries.jsonl").write_text(
        json.dumps({"id": "a", "prompt": "w1 w2 w3", "completion": "w4 w5"})
        + "\n"
        + json.dumps({"id": "b", "prompt": "w7", "completion": "w9 w3"})
        + "\n"
    )
    common = ["--model", str(root / "model"), "--data", str(root / "train.jsonl"), "--quiet", "--batch-size", "4"]
    assert main(["fit", *common, "--out", str(root / "factors")]) == 0
    return root


def line_of(train: Path) -> dict[str, int]:
    """Each record's id -> its 1-based line in the file, as a reader of the file counts them."""
    return {
        json.loads(text)["id"]: number
        for number, text in enumerate(train.read_text().split("\n"), start=1)
        if text.strip()
    }


@pytest.mark.needs_servers
def test_results_and_report_name_each_sequence_by_its_line_in_the_users_file(workspace, tmp_path):
    out = tmp_path / "scores"
    args = ["--model", str(workspace / "model"), "--data", str(workspace / "train.jsonl"), "--quiet"]
    queries = ["--queries", str(workspace / "queries.jsonl"), "--factors", str(workspace / "factors")]
    assert main(["score", *args, *queries, "--out", str(out), "--top-k", "4", "--bottom-k", "3"]) == 0
    report = json.loads((out / "results.json").read_text())
    expected = line_of(workspace / "train.jsonl")
    assert report["schema_version"] == 4
    entries = [entry for query in report["queries"] for entry in query["top"] + query["bottom"]]
    assert len(entries) == 2 * (4 + 3)
    assert all(entry["line"] == expected[entry["id"]] for entry in entries)
    assert any(entry["line"] != int(entry["id"][1:]) + 1 for entry in entries)  # blank lines counted

    assert main(["report", "--results", str(out), "--out", str(tmp_path / "report.html"), "--quiet"]) == 0
    page = (tmp_path / "report.html").read_text()
    first = report["queries"][0]["top"][0]
    assert f"<td>{first['id']}</td><td class='num'>{first['line']}</td>" in page  # the overview's top-1 row
    sequences = json.loads(re.search(r'<script type="application/json" id="sequences">(.*?)</script>', page).group(1))
    assert {row[0]: row[3] for row in sequences} == {entry["id"]: entry["line"] for entry in entries}

    assert main(["self", *args, "--factors", str(workspace / "factors"), "--out", str(tmp_path / "self")]) == 0
    self_report = json.loads((tmp_path / "self" / "results.json").read_text())
    assert all(entry["line"] == expected[entry["id"]] for entry in self_report["top"])


@pytest.mark.needs_servers
def test_a_dataset_uploaded_through_the_api_keeps_its_lines_in_the_streamed_rows(workspace, served):
    model = model_spec(str(workspace / "model"))
    with InfluenceClient(served[0]) as client:
        dataset = client.register_dataset(model, workspace / "train.jsonl", shard_size=5)  # UploadDataset
        factor_set = client.import_factors(workspace / "factors")
        queries = read_queries_jsonl(workspace / "queries.jsonl")
        result = client.compute_scores(model, factor_set.name, dataset.name, queries, top_k=4)
        rows = list(client.score_rows(result.name))
    expected = line_of(workspace / "train.jsonl")
    assert len(rows) == 2 * 4
    assert all(row.HasField("line") and row.line == expected[row.train_id] for row in rows)


def test_a_result_without_lines_reports_them_as_not_recorded(tmp_path):
    data = load_result(write_result(tmp_path / "old", queries=3, top_k=2, train=20, tokens=0))
    assert all(sequence.line is None for query in data.queries for sequence in query.top)
    page = render(data)
    first = data.queries[0].top[0]
    assert f"<td>{first.id}</td><td class='num'>—</td>" in page
    with_lines = load_result(write_result(tmp_path / "new", queries=3, top_k=2, train=20, tokens=0, lines=True))
    top = with_lines.queries[0].top
    assert [s.line for s in top] == [int(s.id.split("-")[1]) + 1 for s in top]
