"""The public contract on every architecture family the README names (tests/support/families.py):
`influence fit` -> `influence score --per-module --per-token` -> `influence self`, in embedded
mode and with --server against `influence serve`, each checked against the in-process engine
on the same model and factors. Mixture-of-experts families (MOE_FAMILIES: Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, gpt-oss, DeepSeek-V3) go the same way, every expert tracked, and on to
`influence index build` and scoring through the index; every fit states its coverage (the
factor manifest, and through the server the FactorSet message): all of the MLP by default.

Tolerances: the CLI and the engine run the same float32 model over differently composed batches
(the system shards and buckets on its own), so scores agree to float32 round-off (FLOAT32);
breakdowns sum to their totals to float32 storage precision.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.catalog.factor_sets import load_factors
from services.cli import main
from services.client import InfluenceClient
from services.engine.data import tokenize_training
from services.engine.fit import FitConfig, fit_factors
from services.engine.model_io import load_model_and_tokenizer, model_fingerprint
from services.engine.modules import select_modules
from services.engine.records import Query, TrainingExample, read_queries_jsonl, read_training_jsonl
from services.engine.score import ScoreConfig, compute_scores, compute_self_influence
from tests.support.families import FAMILIES, MLP_NAMES, MOE_FAMILIES, build_family_model, sentences
from tests.support.numerics import FLOAT32, assert_close

TOP_K = 3


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    texts = sentences(18, seed=1)
    (root / "train.jsonl").write_text(
        "".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    queries = [
        {"id": "q-fox", "prompt": "the quick brown", "completion": " fox jumps"},
        {"id": "q-tea", "prompt": "merchants trade copper", "completion": " tea and amber"},
        {"prompt": "seven sailors sing about", "completion": " silver rivers"},  # id defaults to its position
    ]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    models = {family: build_family_model(family, root / family) for family in FAMILIES | MOE_FAMILIES}
    return root, models


def strict_json(path: Path):
    """results.json parsed as strict JSON: a bare NaN or Infinity is an error."""

    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def run_cli(args: list[str], server: str | None) -> None:
    extra = ["--server", server] if server else []
    assert main([*args, "--quiet", "--batch-size", "4", *extra]) == 0, args


def fit_score_self(family: str, model_dir: Path, root: Path, out: Path, server: str | None) -> None:
    data, queries = str(root / "train.jsonl"), str(root / "queries.jsonl")
    modules = (FAMILIES | MOE_FAMILIES)[family].modules
    run_cli(
        ["fit", "--model", str(model_dir), "--data", data, "--out", str(out / "factors"), "--modules", modules], server
    )
    factors = ["--factors", str(out / "factors")]
    common = ["--model", str(model_dir), "--data", data, *factors, "--top-k", str(TOP_K)]
    run_cli(
        ["score", *common, "--queries", queries, "--out", str(out / "scores"), "--per-module", "--per-token"], server
    )
    run_cli(["self", *common, "--out", str(out / "self")], server)


def check_against_the_engine(family: str, model_dir: Path, root: Path, out: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(model_dir)
    examples = read_training_jsonl(root / "train.jsonl")
    queries = read_queries_jsonl(root / "queries.jsonl")
    factors = load_factors(out / "factors")

    # the factors cover exactly the modules the selection names
    in_model_order = list(select_modules(model, (FAMILIES | MOE_FAMILIES)[family].modules))
    assert set(factors.modules) == set(in_model_order) and set(MLP_NAMES[family]) <= set(in_model_order)

    config = ScoreConfig(per_module=True, per_token=True, top_k=TOP_K, batch_size=4)
    expected = compute_scores(model, tokenizer, factors, examples, queries, config)
    tensors = load_file(str(out / "scores" / "scores.safetensors"))
    assert tensors["scores"].shape == (len(queries), len(examples))
    assert tensors["per_module"].shape == (len(factors.modules), len(queries), len(examples))
    assert_close(tensors["scores"], expected.scores, FLOAT32, f"{family} scores")
    assert_close(tensors["per_module"].sum(0), tensors["scores"], FLOAT32, f"{family} per-module sum")
    assert bool(torch.isfinite(tensors["scores"]).all()) and float(tensors["scores"].abs().max()) > 0

    report = strict_json(out / "scores" / "results.json")
    assert report["modules"] == in_model_order  # the row order of per_module
    assert_close(tensors["per_module"], expected.per_module, FLOAT32, f"{family} per-module")
    assert [q["id"] for q in report["queries"]] == ["q-fox", "q-tea", "2"]
    sequences = tokenize_training(tokenizer, examples, 512)
    ids = [example.id for example in examples]
    for row, query in enumerate(report["queries"]):
        assert [entry["rank"] for entry in query["top"]] == list(range(1, TOP_K + 1))
        ranked = [entry["score"] for entry in query["top"]]
        assert ranked == sorted(ranked, reverse=True)
        for entry in query["top"]:
            index = ids.index(entry["id"])
            assert entry["score"] == pytest.approx(float(tensors["scores"][row, index]), rel=1e-6)
            assert entry["text"] == examples[index].text
            # token-wise attribution over the model tokenizer's own pieces, summing to the score
            expected_tokens = tokenizer.convert_ids_to_tokens(sequences[index].input_ids.tolist())
            assert [t["token"] for t in entry["tokens"]] == expected_tokens
            scale = float(tensors["scores"].abs().max())
            assert sum(t["score"] for t in entry["tokens"]) == pytest.approx(entry["score"], abs=1e-5 * scale)
            assert sum(entry["per_module"].values()) == pytest.approx(entry["score"], abs=1e-5 * scale)
            assert set(entry["per_module"]) == set(factors.modules)

    self_scores = load_file(str(out / "self" / "scores.safetensors"))["scores"]
    assert_close(self_scores, compute_self_influence(model, tokenizer, factors, examples), FLOAT32, f"{family} self")
    assert bool((self_scores > 0).all()), "self-influence is a preconditioned squared norm"
    self_report = strict_json(out / "self" / "results.json")
    assert [entry["id"] for entry in self_report["top"]] == [
        ids[i] for i in self_scores.argsort(descending=True)[:TOP_K]
    ]


def check_coverage(family: str, out: Path) -> dict:
    """The factor manifest states the fit's coverage: all of the MLP (every expert of a MoE)."""
    coverage = json.loads((out / "factors" / "manifest.json").read_text())["metadata"]["provenance"]["coverage"]
    assert coverage["mlp_share"] == 1.0 and coverage["mlp_left_out"] == [] and 0 < coverage["model_share"] < 1
    assert (coverage["experts"] > 0) == (family in MOE_FAMILIES)
    return coverage


def index_scores_like_recompute(model_dir: Path, root: Path, out: Path, server: str | None) -> None:
    """An uncompressed index of the training data scores the queries as recomputing does."""
    data, queries = str(root / "train.jsonl"), str(root / "queries.jsonl")
    common = ["--model", str(model_dir), "--factors", str(out / "factors")]
    run_cli(["index", "build", *common, "--data", data, "--out", str(out / "index"), "--projection", "none"], server)
    run_cli(
        ["score", *common, "--index", str(out / "index"), "--queries", queries, "--out", str(out / "indexed")], server
    )
    indexed = load_file(str(out / "indexed" / "scores.safetensors"))["scores"]
    assert_close(indexed, load_file(str(out / "scores" / "scores.safetensors"))["scores"], FLOAT32, "index scores")


@pytest.mark.parametrize("family", list(FAMILIES) + list(MOE_FAMILIES))
@pytest.mark.needs_servers
@pytest.mark.slow
def test_fit_score_self_embedded(zoo, family, tmp_path):
    root, models = zoo
    fit_score_self(family, models[family], root, tmp_path, server=None)
    check_against_the_engine(family, models[family], root, tmp_path)
    check_coverage(family, tmp_path)
    if family in MOE_FAMILIES:
        index_scores_like_recompute(models[family], root, tmp_path, server=None)


@pytest.mark.parametrize("family", list(FAMILIES) + list(MOE_FAMILIES))
def test_fit_score_self_through_influence_serve(zoo, served, family, tmp_path):
    root, models = zoo
    target, _ = served
    fit_score_self(family, models[family], root, tmp_path, server=target)
    check_against_the_engine(family, models[family], root, tmp_path)
    coverage = check_coverage(family, tmp_path)
    with InfluenceClient(target) as client:
        fitted = [f for f in client.list_factor_sets() if f.model.path == str(models[family])]
    assert fitted and all(f.coverage.summary == coverage["summary"] for f in fitted)
    assert fitted[0].coverage.mlp_parameters == fitted[0].coverage.tracked_mlp_parameters > 0
    if family in MOE_FAMILIES:
        index_scores_like_recompute(models[family], root, tmp_path, server=target)


def test_the_fingerprint_depends_on_the_model_only(zoo, tmp_path):
    """Not on the order of the tracked names (Llama's gate/up/down do not sort in model order),
    nor on the dtype or device the checkpoint was loaded in; another model's weights differ."""
    _, models = zoo
    model, tokenizer = load_model_and_tokenizer(models["llama"])
    names = list(select_modules(model, "mlp"))
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled != names and sorted(shuffled) != names
    fingerprint = model_fingerprint(model, names)
    assert model_fingerprint(model, shuffled) == model_fingerprint(model, sorted(names)) == fingerprint
    for dtype in ("bfloat16", "float64"):
        other_dtype, _ = load_model_and_tokenizer(models["llama"], dtype=dtype)
        assert model_fingerprint(other_dtype, names) == fingerprint, dtype
    other_model, _ = load_model_and_tokenizer(build_family_model("llama", tmp_path / "other", seed=1))
    assert model_fingerprint(other_model, names) != fingerprint

    # factors whose module table comes back in any order still score this model
    examples = [TrainingExample(f"t{i}", text) for i, text in enumerate(sentences(6, seed=3))]
    factors = fit_factors(model, tokenizer, examples, FitConfig(batch_size=3))
    factors.modules = {
        name: factors.modules[name] for name in shuffled + [n for n in factors.modules if n not in names]
    }
    result = compute_scores(model, tokenizer, factors, examples, [Query("q", "the quick", " brown fox")])
    assert bool(torch.isfinite(result.scores).all())
