"""PEFT LoRA adapters: an adapter directory loads as its base with the adapter applied
(engine/model_io.py), `adapter` (the default there) tracks the LoRA matrices (engine/modules.py),
their EK-FAC scores equal the dense inverse products of autograd's per-sequence gradients in
float64, and the fingerprint covers base and adapter."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model

from services.engine.data import tokenize_queries, tokenize_training
from services.engine.fit import FitConfig, fit_factors, prepare_model
from services.engine.model_io import load_model_and_tokenizer, model_fingerprint
from services.engine.modules import select_modules
from services.engine.precondition import Damping
from services.engine.score import ScoreConfig, compute_scores
from services.errors import InputError, NotFoundError
from tests.support.adapters import TARGETS, build_lora_adapter
from tests.support.families import build_family_model
from tests.support.numerics import assert_close
from tests.support.reference import IntTokenizer, dense_curvature, loop_gradients
from tests.support.tiny import random_examples, random_queries, tiny_model


def _adapted(arch: str):
    """A float64 tiny model with a random LoRA adapter on its attention and MLP linears."""
    targets, fan_in_fan_out = TARGETS[arch]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, fan_in_fan_out=fan_in_fan_out)
    model = get_peft_model(tiny_model(arch), config).to(torch.float64)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    return model.eval()


@pytest.mark.parametrize(
    "arch, strategy", [("llama", "ekfac"), ("gpt2", "ekfac"), pytest.param("llama", "identity", marks=pytest.mark.slow)]
)
def test_adapter_scores_equal_dense_inverse_products(arch, strategy):
    model = _adapted(arch)
    tokenizer = IntTokenizer()
    examples = random_examples(8, vocab=model.config.vocab_size, seed=7)
    queries = random_queries(2, vocab=model.config.vocab_size, seed=8)
    factors = fit_factors(model, tokenizer, examples, FitConfig(strategy=strategy, batch_size=4))
    modules, _ = prepare_model(model, "mlp")  # the default: on an adapter model, its LoRA matrices
    assert list(modules) == list(select_modules(model, "adapter")) == list(factors.modules)
    assert modules and all(".lora_A." in name or ".lora_B." in name for name in modules)
    result = compute_scores(model, tokenizer, factors, examples, queries, ScoreConfig(batch_size=3, top_k=3))
    train_grads = loop_gradients(model, modules, tokenize_training(tokenizer, examples, 512))
    query_grads = loop_gradients(model, modules, tokenize_queries(tokenizer, queries, 512))
    expected = torch.zeros(len(queries), len(examples), dtype=torch.float64)
    for name in modules:
        preconditioned = query_grads[name]
        if strategy == "ekfac":
            curvature = dense_curvature(factors.factors[name], strategy)
            damping = Damping(0.1).value(factors.factors[name].diagonal())
            identity = torch.eye(curvature.shape[0], dtype=torch.float64)
            preconditioned = torch.linalg.solve(curvature + damping * identity, query_grads[name].T).T
        expected += preconditioned @ train_grads[name].T
    assert float(expected.abs().max()) > 0
    assert_close(result.scores.to(torch.float64), expected, 1e-6, what=f"{arch} adapter {strategy} scores")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = build_family_model("llama", root / "base")
    other_base = build_family_model("llama", root / "other-base", seed=1)
    return base, other_base, build_lora_adapter(base, "llama", root / "adapter")


def test_an_adapter_directory_loads_on_its_base_and_the_fingerprint_covers_both(saved, tmp_path):
    base, other_base, adapter = saved
    model, tokenizer = load_model_and_tokenizer(adapter)
    names = list(select_modules(model, "mlp"))
    assert names == list(select_modules(model, "adapter")) and all(".lora_" in name for name in names)
    plain, plain_tokenizer = load_model_and_tokenizer(base)
    assert tokenizer.get_vocab() == plain_tokenizer.get_vocab()  # the base's tokenizer: the adapter saved none
    fingerprint = model_fingerprint(model, names)
    assert model_fingerprint(load_model_and_tokenizer(adapter, dtype="float64")[0], names) == fingerprint
    # another adapter on the same base, or the same adapter on another base: another model
    other_adapter = build_lora_adapter(base, "llama", tmp_path / "other-adapter", seed=1)
    assert model_fingerprint(load_model_and_tokenizer(other_adapter)[0], names) != fingerprint
    moved = shutil.copytree(adapter, tmp_path / "moved")
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(other_base)}))
    assert model_fingerprint(load_model_and_tokenizer(moved)[0], names) != fingerprint
    # a base that is no local directory is named, with the fix
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/hub-id"}))
    with pytest.raises(NotFoundError, match=r"names base model 'org/hub-id', which is no local directory: give"):
        load_model_and_tokenizer(moved)
    (moved / "adapter_config.json").write_text(json.dumps(config))
    (moved / "adapter_model.safetensors").rename(moved / "adapter_model.bin")
    with pytest.raises(InputError, match=r"holds no adapter_model\.safetensors"):
        load_model_and_tokenizer(moved)
    with pytest.raises(InputError, match="--modules 'adapter' matches no linear module"):
        select_modules(plain, "adapter")
