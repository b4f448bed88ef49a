"""The index through the CLI, embedded and against `influence serve`: an uncompressed index scores
exactly like recompute scoring; a compressed one rescores its candidates exactly; an append equals
indexing the concatenated data; mismatched factors or damping and repeated ids are refused;
TF-IDF filtering scores only each query's candidates, exactly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.cli import main
from services.query_svc.report_html import build_report
from services.toy.models import build_tiny_model, save_model_dir
from services.toy.tokenizer import build_word_tokenizer
from tests.support.numerics import FLOAT32, assert_close

pytestmark = pytest.mark.needs_servers  # the module's fit and index builds run the embedded system

WORDS = [f"w{i}" for i in range(40)]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def texts(count: int, first: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "id": f"t{first + i}",
            "text": " ".join(WORDS[int(j)] for j in torch.randint(0, 40, (3 + i % 9,), generator=generator)),
        }
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    tokenizer = build_word_tokenizer(WORDS)
    save_model_dir(build_tiny_model("gpt2", len(tokenizer), d_model=16, seed=0), tokenizer, root / "model")
    first, more = texts(30, 0, seed=1), texts(12, 100, seed=2)
    paths = {
        "train": write_jsonl(root / "train.jsonl", first),
        "more": write_jsonl(root / "more.jsonl", more),
        "all": write_jsonl(root / "all.jsonl", first + more),
        "queries": write_jsonl(
            root / "queries.jsonl",
            [{"id": "a", "prompt": "w1 w2", "completion": "w3 w4"}, {"id": "b", "prompt": "w5", "completion": "w6"}],
        ),
        "model": str(root / "model"),
        "factors": str(root / "factors"),
    }
    assert cli(["fit", "--model", paths["model"], "--data", paths["train"], "--out", paths["factors"]]) == 0
    assert cli(["fit", "--model", paths["model"], "--data", paths["more"], "--out", str(root / "other-factors")]) == 0
    return root, paths


def cli(args: list[str]) -> int:
    return main([*args, "--quiet"])


def scores(out) -> torch.Tensor:
    return load_file(str(out / "scores.safetensors"))["scores"]


def recompute(paths, data: str, out, *extra) -> torch.Tensor:
    args = ["score", "--model", paths["model"], "--factors", paths["factors"], "--data", paths[data]]
    assert cli([*args, "--queries", paths["queries"], "--out", str(out), *extra]) == 0
    return scores(out)


def build(paths, out, *extra, server=None) -> None:
    args = ["index", "build", "--model", paths["model"], "--factors", paths["factors"], "--data", paths["train"]]
    assert cli([*args, "--out", str(out), *extra, *(["--server", server] if server else [])]) == 0


def indexed(paths, index, out, *extra, server=None) -> int:
    args = ["score", "--model", paths["model"], "--factors", paths["factors"], "--index", str(index)]
    return cli(
        [*args, "--queries", paths["queries"], "--out", str(out), *extra, *(["--server", server] if server else [])]
    )


def test_an_uncompressed_index_scores_like_recompute_and_an_append_like_the_concatenated_data(ws, tmp_path):
    _, paths = ws
    build(paths, tmp_path / "index", "--projection", "none", "--storage-dtype", "float32", "--shard-size", "7")
    assert indexed(paths, tmp_path / "index", tmp_path / "s1", "--rescore", "0") == 0
    assert_close(scores(tmp_path / "s1"), recompute(paths, "train", tmp_path / "r1"), FLOAT32, "none index")
    assert cli(["index", "append", "--index", str(tmp_path / "index"), "--data", paths["more"]]) == 0
    assert indexed(paths, tmp_path / "index", tmp_path / "s2", "--rescore", "0") == 0
    assert_close(scores(tmp_path / "s2"), recompute(paths, "all", tmp_path / "r2"), FLOAT32, "appended index")
    ids = [e["id"] for e in json.loads((tmp_path / "s2" / "results.json").read_text())["queries"][0]["top"]]
    expected = [e["id"] for e in json.loads((tmp_path / "r2" / "results.json").read_text())["queries"][0]["top"]]
    assert ids == expected
    # not rescored: index scores, marked approximate (the recomputed result's are exact)
    report = json.loads((tmp_path / "s2" / "results.json").read_text())
    assert report["schema_version"] == 4
    assert all(e["approximate"] for q in report["queries"] for e in q["top"])
    assert not any(
        "approximate" in e
        for q in json.loads((tmp_path / "r2" / "results.json").read_text())["queries"]
        for e in q["top"]
    )
    # the same ids again: refused, and the index is unchanged
    manifest = (tmp_path / "index" / "manifest.json").read_bytes()
    assert cli(["index", "append", "--index", str(tmp_path / "index"), "--data", paths["more"]]) == 2
    assert (tmp_path / "index" / "manifest.json").read_bytes() == manifest


def test_a_compressed_index_rescores_its_candidates_exactly(ws, tmp_path):
    _, paths = ws
    build(paths, tmp_path / "index", "--rank", "2")  # svd, int8: the defaults, compressed hard
    exact = recompute(paths, "train", tmp_path / "r", "--per-module", "--per-token")
    assert indexed(paths, tmp_path / "index", tmp_path / "s", "--rescore", "8", "--per-module", "--per-token") == 0
    report = json.loads((tmp_path / "s" / "results.json").read_text())
    assert report["index"]["projection"] == "svd" and report["index"]["rescore"] == 8
    ids = [json.loads(line)["id"] for line in Path(paths["train"]).read_text().splitlines()]
    for row, query in enumerate(report["queries"]):
        assert len(query["top"]) == 8
        for entry in query["top"]:
            column = ids.index(entry["id"])
            assert entry["score"] == pytest.approx(float(exact[row, column]), rel=1e-5, abs=1e-6)
            assert "approximate" not in entry  # rescored: exact
            assert sum(t["score"] for t in entry["tokens"]) == pytest.approx(entry["score"], rel=1e-4, abs=1e-5)
            assert sum(entry["per_module"].values()) == pytest.approx(entry["score"], rel=1e-4, abs=1e-5)
    # its final ranking is the exact ranking of its candidates
    for query in report["queries"]:
        assert [e["score"] for e in query["top"]] == sorted((e["score"] for e in query["top"]), reverse=True)


def test_bottom_k_in_recompute_and_index_scoring(ws, tmp_path):
    """--bottom-k: each query's most negative sequences by exact scores, most negative first, from
    recompute scoring and from an index (candidates from both ends, rescored exactly); off by
    default (no "bottom" in results.json)."""
    _, paths = ws
    ids = [json.loads(line)["id"] for line in Path(paths["train"]).read_text().splitlines()]
    page = tmp_path / "r.html"
    exact = recompute(paths, "train", tmp_path / "r", "--bottom-k", "3", "--per-token", "--report", str(page))
    report = json.loads((tmp_path / "r" / "results.json").read_text())
    assert report["settings"]["bottom_k"] == 3
    for row, query in enumerate(report["queries"]):
        lowest = [ids[i] for i in exact[row].argsort(stable=True)[:3].tolist()]
        assert [e["id"] for e in query["bottom"]] == lowest and [e["rank"] for e in query["bottom"]] == [1, 2, 3]
        assert all("tokens" in e for e in query["bottom"])
    tensors = load_file(str(tmp_path / "r" / "scores.safetensors"))  # the bottom index beside the top one
    assert [[ids[i] for i in row] for row in tensors["bottom_index"].tolist()] == [
        [e["id"] for e in q["bottom"]] for q in report["queries"]
    ]
    assert tensors["bottom_per_module"].shape == (len(report["modules"]), 2, 3)
    assert_close(
        tensors["bottom_per_module"].sum(0),
        torch.tensor([[e["score"] for e in q["bottom"]] for q in report["queries"]]),
        FLOAT32,
        "bottom-k layer-wise sums",
    )
    cards = re.findall(r'<script type="application/json" id="card-\d+">(.*?)</script>', page.read_text())
    assert [len(json.loads(card)["bottom"]) for card in cards] == [3, 3]  # the cards carry the bottom lists
    assert all("bottom_layers" in json.loads(card) for card in cards)  # the bottom tail's heatmap
    recompute(paths, "train", tmp_path / "r0")
    plain = json.loads((tmp_path / "r0" / "results.json").read_text())
    assert "bottom_index" not in load_file(str(tmp_path / "r0" / "scores.safetensors"))
    assert all("bottom" not in query for query in plain["queries"]) and "bottom_k" not in plain["settings"]

    build(paths, tmp_path / "index", "--rank", "2")
    assert indexed(paths, tmp_path / "index", tmp_path / "all", "--rescore", str(len(ids)), "--bottom-k", "3") == 0
    everything = json.loads((tmp_path / "all" / "results.json").read_text())
    assert torch.equal(load_file(str(tmp_path / "all" / "scores.safetensors"))["bottom_index"], tensors["bottom_index"])
    assert [[e["id"] for e in q["bottom"]] for q in everything["queries"]] == [
        [e["id"] for e in q["bottom"]] for q in report["queries"]
    ]
    assert indexed(paths, tmp_path / "index", tmp_path / "s", "--rescore", "4", "--bottom-k", "3") == 0
    for row, query in enumerate(json.loads((tmp_path / "s" / "results.json").read_text())["queries"]):
        assert len(query["bottom"]) == 3 and all("approximate" not in e for e in query["bottom"])
        for entry in query["bottom"]:
            assert entry["score"] == pytest.approx(float(exact[row, ids.index(entry["id"])]), rel=1e-5, abs=1e-6)
        assert [e["score"] for e in query["bottom"]] == sorted(e["score"] for e in query["bottom"])


def as_format_1(index: Path) -> None:
    """Rewrite an index built with every pair in bfloat16 (`--storage-dtype bfloat16 --energy 1`)
    as the code before issue 24 wrote it: format 1, its spec without energy and budget, its svd
    blocks u [n, d_out, R] and v [n, d_in, R]."""
    from safetensors.torch import save_file

    from services.storage.manifest import sha256_file

    manifest = json.loads((index / "manifest.json").read_text())
    metadata = manifest["metadata"]
    metadata["format_version"] = 1
    rank = metadata["spec"]["rank"]
    for key in ("energy", "budget"):
        del metadata["spec"][key]
    for name in list(manifest["files"]):
        if not name.endswith(".safetensors"):
            continue
        block = load_file(str(index / name))
        old = {"index": block["index"]}
        for key, value in block.items():
            module, _, field = key.rpartition("/")
            if field in ("u", "v"):
                count = block[f"{module}/count"]
                assert bool((count == rank).all())
                old[key] = value.reshape(len(count), rank, -1).transpose(1, 2).contiguous()
        save_file(old, str(index / name))
        digest, size = sha256_file(index / name)
        manifest["files"][name] = {"sha256": digest, "size": size}
    (index / "manifest.json").write_text(json.dumps(manifest))


def test_an_index_of_format_1_still_scores_and_takes_an_append(ws, tmp_path, capsys):
    _, paths = ws
    index = tmp_path / "index"
    build(paths, index, "--rank", "3", "--storage-dtype", "bfloat16", "--energy", "1", "--shard-size", "7")
    assert indexed(paths, index, tmp_path / "new", "--rescore", "0") == 0
    as_format_1(index)
    assert indexed(paths, index, tmp_path / "old", "--rescore", "0") == 0
    assert torch.equal(scores(tmp_path / "old"), scores(tmp_path / "new"))
    assert cli(["index", "append", "--index", str(index), "--data", paths["more"]]) == 0
    metadata = json.loads((index / "manifest.json").read_text())["metadata"]
    assert metadata["format_version"] == 2 and metadata["spec"]["energy"] == 1.0 and metadata["spec"]["budget"] == 0
    assert indexed(paths, index, tmp_path / "appended", "--rescore", "4") == 0
    appended = scores(tmp_path / "appended")
    assert appended.shape[1] == 42 and bool(torch.isfinite(appended).all())
    # a format this code does not read: one line naming the rebuild
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["metadata"]["format_version"] = 3
    (index / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert indexed(paths, index, tmp_path / "refused", "--rescore", "0") != 0
    error = capsys.readouterr().err.strip()
    assert "format 3" in error and "rebuild it with `influence index build`" in error and "\n" not in error


def test_an_index_refuses_other_factors_and_other_damping(ws, tmp_path, capsys):
    root, paths = ws
    build(paths, tmp_path / "index")
    capsys.readouterr()
    args = [
        "score",
        "--model",
        paths["model"],
        "--factors",
        str(root / "other-factors"),
        "--index",
        str(tmp_path / "index"),
    ]
    assert cli([*args, "--queries", paths["queries"], "--out", str(tmp_path / "x")]) == 2
    assert "was built with factorSets/" in capsys.readouterr().err
    assert indexed(paths, tmp_path / "index", tmp_path / "y", "--damping-factor", "0.5") == 2
    assert "whitened with damping 0.1 x mean eigenvalue" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["tfidf", "bm25"])
def test_a_lexical_filter_scores_only_each_querys_candidates_exactly(ws, tmp_path, method):
    _, paths = ws
    exact = recompute(paths, "train", tmp_path / "all")
    filtered = recompute(paths, "train", tmp_path / method, f"--{method}", "5", "--top-k", "3")
    scored = load_file(str(tmp_path / method / "scores.safetensors"))["scored"]
    assert scored.shape == exact.shape and (scored.sum(1) == 5).all()
    assert torch.allclose(filtered[scored], exact[scored], rtol=1e-5, atol=1e-6 * float(exact.abs().max()))
    assert (filtered[~scored] == 0).all()
    report = json.loads((tmp_path / method / "results.json").read_text())
    assert report[method]["k"] == 5
    page = build_report(tmp_path / method)
    assert f"{'BM25' if method == 'bm25' else 'TF-IDF'}: 5 per query" in page and "lexically filtered" in page
    ids = [json.loads(line)["id"] for line in Path(paths["train"]).read_text().splitlines()]
    for row, query in enumerate(report["queries"]):
        assert all(bool(scored[row, ids.index(entry["id"])]) for entry in query["top"])


@pytest.mark.slow
def test_an_index_built_on_a_server_scores_there(ws, served, tmp_path):
    _, paths = ws
    target, _ = served
    build(
        paths,
        tmp_path / "index",
        "--projection",
        "none",
        "--storage-dtype",
        "float32",
        "--shard-size",
        "9",
        server=target,
    )
    source = json.loads((tmp_path / "index" / "source.json").read_text())
    assert source["server"] == target and source["index"].startswith("indexes/")
    assert indexed(paths, tmp_path / "index", tmp_path / "s", "--rescore", "0", server=target) == 0
    assert_close(scores(tmp_path / "s"), recompute(paths, "train", tmp_path / "r"), FLOAT32, "server index")
    assert (
        cli(["index", "append", "--index", str(tmp_path / "index"), "--data", paths["more"], "--server", target]) == 0
    )
    assert indexed(paths, tmp_path / "index", tmp_path / "s2", "--rescore", "0", server=target) == 0
    assert_close(scores(tmp_path / "s2"), recompute(paths, "all", tmp_path / "r2"), FLOAT32, "server append")


def test_the_damping_check_reports_each_querys_top_k_overlap_and_needs_recompute_scoring(ws, tmp_path, capsys):
    _, paths = ws
    args = ["score", "--model", paths["model"], "--factors", paths["factors"], "--data", paths["train"]]
    out = tmp_path / "checked"
    assert main([*args, "--queries", paths["queries"], "--out", str(out), "--top-k", "3", "--damping-check"]) == 0
    assert "top-k kept at 0.1x the damping: mean " in capsys.readouterr().err
    report = json.loads((out / "results.json").read_text())
    assert sorted(report["damping_check"]) == ["0.1x", "10x"]
    for query in report["queries"]:
        assert sorted(query["damping_overlap"]) == ["0.1x", "10x"]
        assert all(0 <= value <= 1 for value in query["damping_overlap"].values())
    assert indexed(paths, tmp_path / "no-index", tmp_path / "x", "--damping-check") == 2
    assert "--damping-check needs recompute scoring" in capsys.readouterr().err


def test_lexical_candidates_join_the_index_candidates_and_the_result_says_what_each_source_held(ws, tmp_path, capsys):
    _, paths = ws
    index = tmp_path / "index"
    build(paths, index, "--rank", "1")  # compressed hard: its own candidates miss much of the exact top-k
    exact = recompute(paths, "train", tmp_path / "r")
    assert indexed(paths, index, tmp_path / "plain", "--rescore", "2", "--top-k", "3") == 0
    assert indexed(paths, index, tmp_path / "both", "--rescore", "2", "--lexical", "4", "--top-k", "3") == 0
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    both = json.loads((tmp_path / "both" / "results.json").read_text())
    assert "lexical" not in plain["index"] and "sources" not in plain["index"]  # off: the result as before
    assert both["index"]["lexical"] == 4
    sources = both["index"]["sources"]
    queries = len(both["queries"])
    assert sources["index"]["candidates"] == 2 * queries and sources["lexical"]["candidates"] == 4 * queries
    assert sources["union"] == {"candidates": sources["union"]["candidates"], "in_top_k": 3 * queries, "recall": 1.0}
    assert max(sources["index"]["candidates"], sources["lexical"]["candidates"]) <= sources["union"]["candidates"]
    assert sources["index"]["in_top_k"] + sources["lexical"]["in_top_k"] >= 3 * queries
    for name in ("index", "lexical"):
        assert sources[name]["recall"] == pytest.approx(sources[name]["in_top_k"] / (3 * queries))
    assert both["index"]["rescored_sequences"] > plain["index"]["rescored_sequences"]
    ids = [json.loads(line)["id"] for line in Path(paths["train"]).read_text().splitlines()]
    for row, query in enumerate(both["queries"]):
        assert len(query["top"]) == 3  # the index's 2 candidates alone could not fill it
        for entry in query["top"]:
            assert entry["score"] == pytest.approx(float(exact[row, ids.index(entry["id"])]), rel=1e-5, abs=1e-6)
            assert "approximate" not in entry
    assert "4 BM25 candidates per query" in build_report(tmp_path / "both")
    capsys.readouterr()
    args = ["score", "--model", paths["model"], "--factors", paths["factors"], "--data", paths["train"]]
    assert cli([*args, "--queries", paths["queries"], "--out", str(tmp_path / "x"), "--lexical", "3"]) == 2
    assert "give it with --index" in capsys.readouterr().err
