"""LoRA adapters through the public contract, on two families (Llama naming, GPT-2's Conv1D):
`influence fit --model ADAPTER_DIR` tracks the LoRA matrices by default, then `influence score
--per-module --per-token`, embedded and through `influence serve`, each checked against the
in-process engine on the same adapter model and factors."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from services.catalog.factor_sets import load_factors
from services.cli import main
from services.engine.model_io import load_model_and_tokenizer, model_fingerprint
from services.engine.modules import select_modules
from services.engine.records import read_queries_jsonl, read_training_jsonl
from services.engine.score import ScoreConfig, compute_scores
from tests.support.adapters import build_lora_adapter
from tests.support.families import build_family_model, sentences
from tests.support.numerics import FLOAT32, assert_close

pytestmark = pytest.mark.needs_servers
FAMILIES = ("llama", "gpt2")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters-cli")
    (root / "train.jsonl").write_text(
        "".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(sentences(14, seed=2)))
    )
    queries = [{"id": "q", "prompt": "the quick brown", "completion": " fox jumps"}]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    built = {}
    for family in FAMILIES:
        base = build_family_model(family, root / f"{family}-base")
        built[family] = build_lora_adapter(base, family, root / f"{family}-adapter")
    return root, built


def _fit_and_score(root, adapter, out, server: str | None) -> None:
    extra = ["--server", server] if server else []
    common = ["--model", str(adapter), "--data", str(root / "train.jsonl"), "--quiet", "--batch-size", "4", *extra]
    assert main(["fit", *common, "--out", str(out / "factors")]) == 0
    score = ["score", *common, "--factors", str(out / "factors"), "--queries", str(root / "queries.jsonl")]
    assert main([*score, "--out", str(out / "scores"), "--top-k", "3", "--per-module", "--per-token"]) == 0


def _check(root, adapter, out) -> None:
    model, tokenizer = load_model_and_tokenizer(adapter)
    factors = load_factors(out / "factors")
    lora = list(select_modules(model, "adapter"))
    assert set(factors.modules) == set(lora) and all(".lora_A." in n or ".lora_B." in n for n in lora)
    manifest = json.loads((out / "factors" / "manifest.json").read_text())["metadata"]
    assert manifest["model_fingerprint"] == model_fingerprint(model, lora)
    examples, queries = read_training_jsonl(root / "train.jsonl"), read_queries_jsonl(root / "queries.jsonl")
    config = ScoreConfig(top_k=3, batch_size=4, per_module=True)
    expected = compute_scores(model, tokenizer, factors, examples, queries, config)
    tensors = load_file(str(out / "scores" / "scores.safetensors"))
    assert_close(tensors["scores"], expected.scores, FLOAT32, "adapter scores")
    assert_close(tensors["per_module"].sum(0), tensors["scores"], FLOAT32, "per-module sum")
    assert float(tensors["scores"].abs().max()) > 0
    for entry in json.loads((out / "scores" / "results.json").read_text())["queries"][0]["top"]:
        scale = float(tensors["scores"].abs().max())
        assert sum(t["score"] for t in entry["tokens"]) == pytest.approx(entry["score"], abs=1e-5 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_fit_and_score_embedded(adapters, family, tmp_path):
    root, built = adapters
    _fit_and_score(root, built[family], tmp_path, server=None)
    _check(root, built[family], tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_fit_and_score_through_influence_serve(adapters, served, family, tmp_path):
    root, built = adapters
    _fit_and_score(root, built[family], tmp_path, server=served[0])
    _check(root, built[family], tmp_path)


def test_an_adapter_whose_config_names_a_hub_id_runs_on_the_base_model_given(adapters, served, tmp_path):
    """--base-model DIR: the same model as the adapter on the base its config named, so the same
    factors' fingerprint; without it, one line naming the fix."""
    root, built = adapters
    moved = shutil.copytree(built["llama"], tmp_path / "moved")
    config = json.loads((moved / "adapter_config.json").read_text())
    base = config["base_model_name_or_path"]
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/llama"}))
    fit = ["fit", "--model", str(moved), "--data", str(root / "train.jsonl"), "--quiet", "--server", served[0]]
    assert main([*fit, "--out", str(tmp_path / "refused")]) == 2
    assert main([*fit, "--base-model", base, "--out", str(tmp_path / "factors")]) == 0
    model, _ = load_model_and_tokenizer(built["llama"])
    fingerprint = json.loads((tmp_path / "factors" / "manifest.json").read_text())["metadata"]["model_fingerprint"]
    assert fingerprint == model_fingerprint(model, list(select_modules(model, "adapter")))
