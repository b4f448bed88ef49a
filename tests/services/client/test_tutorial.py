"""docs/tutorial.md runs as written: its Python blocks, in order, in one namespace, against a real
`influence serve` (real Redis and S3), from a directory holding the files it names."""

from __future__ import annotations

import json
import re

import pytest

from tests.support import ROOT
from tests.support.families import build_family_model, sentences

TUTORIAL = ROOT / "docs" / "tutorial.md"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


@pytest.mark.slow
def test_the_tutorial_runs_as_written(served, tmp_path, monkeypatch, capsys):
    target, _ = served
    build_family_model("gpt2", tmp_path / "model")
    train = [{"id": f"t{i}", "text": text} for i, text in enumerate(sentences(16, seed=1))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(record) + "\n" for record in train))
    queries = [
        {"id": "a", "prompt": "the quick", "completion": " brown fox", "group": "fox"},
        {"id": "b", "prompt": "a quick", "completion": " brown fox", "group": "fox"},
    ]
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(record) + "\n" for record in queries))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INFLUENCE_SERVER", target)

    blocks = python_blocks(TUTORIAL.read_text())
    assert len(blocks) >= 6
    namespace: dict = {"__name__": "tutorial"}
    for number, block in enumerate(blocks, start=1):
        exec(compile(block, f"docs/tutorial.md python block {number}", "exec"), namespace)

    printed = capsys.readouterr().out
    assert "['report.html', 'results.json', 'scores.safetensors']" in printed
    results = json.loads((tmp_path / "scores" / "results.json").read_text())
    assert [len(query["top"]) for query in results["queries"]] == [3, 3]
    assert all(entry["tokens"] for query in results["queries"] for entry in query["top"])
    rows = [line.split() for line in printed.splitlines() if re.match(r"^[ab] [123] t\d+ line \d+ [+-]\d", line)]
    assert len(rows) == 6 and all(int(row[4]) == int(row[2][1:]) + 1 for row in rows)  # t{i} is on line i + 1
    # the server's report and the one built locally from the downloaded files are the same page
    assert (tmp_path / "report.html").read_text() == (tmp_path / "scores" / "report.html").read_text()
    assert re.search(r"operations/\S+ done", printed)
    assert re.search(r"^factorSets/\S+ ekfac \d+ modules$", printed, re.M)  # the strategy by name
