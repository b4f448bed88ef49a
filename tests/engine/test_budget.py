"""One memory mechanism (engine/budget.py): module groups and batch sizes from a worker's budget,
the same factors whatever the grouping, an out-of-memory error lowering the batch size once, and
the sums a pass keeps on its device (engine/sums.py: float64, or float32 compensated)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from services.engine.budget import GIB, STATE_SHARE, USABLE_SHARE, WorkerBudget, module_groups, module_state_bytes
from services.engine.factor_io import to_artifact
from services.engine.fit import FitConfig, FitModel, fit_factors, fit_in_memory
from services.engine.resources import MemoryBudget, cgroup_cpu_limit
from services.engine.sums import RunningSums
from services.errors import ResourceExhaustedError
from services.storage.tensors import tensors_to_bytes
from tests.support.memory import RunsOutOfMemory
from tests.support.reference import IntTokenizer
from tests.support.tiny import random_examples, tiny_model

ROOMY = WorkerBudget.of_gib(64)


def smollm2_config_model(layers: int = 2) -> LlamaForCausalLM:
    """SmolLM2-135M's shapes (576 wide, MLP 1536, 9 heads of 64, 3 KV heads, 49,152 tokens, tied
    embeddings), random weights, fewer layers."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


def factor_files(factor_set) -> dict[str, bytes]:
    """Each module's factor file as the store gets it."""
    _, files = to_artifact(factor_set)
    return {name: tensors_to_bytes(tensors) for name, tensors in files.items()}


def budget_for_state(fit: FitModel, state_bytes: int) -> WorkerBudget:
    """A host-only budget whose groups hold at most `state_bytes` of module state."""
    weights = sum(p.numel() * p.element_size() for p in fit.model.parameters())
    return WorkerBudget(int((state_bytes / STATE_SHARE + weights) / USABLE_SHARE) + 1)


def grouped_and_whole(model, tokenizer, examples, config: FitConfig, state_bytes: int):
    """The fit in the groups a budget of `state_bytes` per group makes, and in one group."""
    fit = FitModel(model, tokenizer, config)
    groups = module_groups(fit.tracked, state_bytes)
    sequences = fit.tokenize(examples)
    cache = MemoryBudget(GIB)
    grouped = fit_in_memory(fit, sequences, cache, groups=groups)
    whole = fit_in_memory(fit, sequences, cache, groups=[list(fit.tracked)])
    return groups, grouped, whole


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_module_groups_give_the_factors_of_one_group_byte_for_byte(strategy):
    model, tokenizer = tiny_model("llama"), IntTokenizer()
    config = FitConfig(strategy=strategy, modules="all", batch_size=3, fisher="sampled")
    fit = FitModel(model, tokenizer, config)
    largest = max(module_state_bytes(m) for m in fit.tracked.values())
    groups, grouped, whole = grouped_and_whole(model, tokenizer, random_examples(11, seed=3), config, 2 * largest)
    assert len(groups) >= 4
    assert [name for group in groups for name in group] == list(fit.tracked)  # model order, each once
    assert factor_files(grouped) == factor_files(whole)
    assert grouped.n_tokens == whole.n_tokens and grouped.n_sequences == whole.n_sequences


@pytest.mark.slow
def test_a_smollm2_config_fit_in_four_or_more_groups_equals_one_group_byte_for_byte():
    """The issue's test: SmolLM2-135M's shapes (random weights, 2 layers), the MLPs, a budget whose
    groups hold one module each (6 groups), factors byte-identical to the one-group fit."""
    model, tokenizer = smollm2_config_model(), IntTokenizer()
    config = FitConfig(strategy="ekfac", modules="mlp", batch_size=4, max_length=24)
    fit = FitModel(model, tokenizer, config)
    largest = max(module_state_bytes(m) for m in fit.tracked.values())
    examples = random_examples(10, vocab=49152, seed=7, min_len=8, max_len=24)
    groups, grouped, whole = grouped_and_whole(model, tokenizer, examples, config, largest + 1)
    assert len(groups) == len(fit.tracked) == 6
    assert fit.plan(budget_for_state(fit, largest + 1)).groups == groups  # what such a worker plans
    assert factor_files(grouped) == factor_files(whole)


def test_the_plan_is_deterministic_and_follows_the_budget():
    model = tiny_model("llama", n_layer=3)
    fit = FitModel(model, IntTokenizer(), FitConfig(modules="all", batch_size=8, max_length=4))
    assert fit.plan(ROOMY) == fit.plan(ROOMY)
    assert fit.plan(ROOMY).groups == [list(fit.tracked)] and fit.plan(ROOMY).batch_size == 8
    largest = max(module_state_bytes(m) for m in fit.tracked.values())
    tight = fit.plan(budget_for_state(fit, 4 * largest))
    assert len(tight.groups) > 1 and tight.to_provenance()["module_groups"] == len(tight.groups)
    # a device budget bounds the batch: its captures must fit beside the weights and a group's state
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    batches = []
    for extra in range(2 * largest, 64 * largest, largest):
        try:
            batches.append(fit.plan(WorkerBudget(64 * GIB, device=int((weights + extra) / USABLE_SHARE))).batch_size)
        except ResourceExhaustedError:  # not even one sequence beside a group's state
            assert not batches
    assert 1 <= min(batches) < 8 and batches[-1] == 8  # (not monotone: more memory, larger groups)
    with pytest.raises(ResourceExhaustedError, match="weights"):
        fit.plan(WorkerBudget(64 * GIB, device=weights))


def test_a_smollm2_and_a_7b_plan_on_paper():
    """The choices the size table (docs/deploy.md, Sizing) quotes: SmolLM2 in one group on an 80 GB
    GPU; a 7B Llama's MLPs in several groups on the same GPU, each within the budget."""
    from bench.memory_plans import llama_modules, plan_for  # the bench's paper configurations

    smol = plan_for(llama_modules(576, 1536, 30, 9, 3), 135e6 * 4, WorkerBudget.of_gib(64, 80), 2048, 49152)
    assert len(smol.groups) == 1
    seven = llama_modules(4096, 11008, 32, 32, 32)
    plan = plan_for(seven, 7e9 * 2, WorkerBudget.of_gib(64, 80), 4096, 32000)
    assert len(plan.groups) > 1
    limit = (64 * GIB * USABLE_SHARE) * STATE_SHARE
    assert all(sum(module_state_bytes(seven[n]) for n in group) <= limit or len(group) == 1 for group in plan.groups)


def test_out_of_memory_lowers_the_batch_size_once_and_the_manifest_says_so():
    model, tokenizer = tiny_model("llama"), IntTokenizer()
    oom = RunsOutOfMemory(most=2)
    handle = model.register_forward_pre_hook(oom, with_kwargs=True)
    try:
        factors = fit_factors(
            model, tokenizer, random_examples(9, seed=1), FitConfig(batch_size=4), worker_budget=ROOMY
        )
    finally:
        handle.remove()
    assert oom.batches[0] == 4 and set(oom.batches[1:]) <= {1, 2}  # one failed batch, then half, kept
    assert factors.metadata["effective_batch_sizes"] == [2]
    assert factors.metadata["planned_batch_size"] == 4
    reference = fit_factors(model, tokenizer, random_examples(9, seed=1), FitConfig(batch_size=2), worker_budget=ROOMY)
    for name, module in factors.factors.items():
        torch.testing.assert_close(module.eigenvalues, reference.factors[name].eigenvalues, rtol=0, atol=0)


def test_out_of_memory_twice_fails_the_task_without_a_third_try():
    model, tokenizer = tiny_model("llama"), IntTokenizer()
    oom = RunsOutOfMemory(most=1)
    handle = model.register_forward_pre_hook(oom, with_kwargs=True)
    try:
        with pytest.raises(ResourceExhaustedError, match="batch size 4 and again at 2"):
            fit_factors(model, tokenizer, random_examples(9, seed=1), FitConfig(batch_size=4), worker_budget=ROOMY)
    finally:
        handle.remove()
    assert oom.batches == [4, 2]


def test_compensated_float32_sums_match_float64_where_plain_float32_drifts():
    """The device sums of a GPU without full-rate float64 (float32, Kahan-compensated) against the
    float64 sum: within 1e-6 relative over 20,000 adds, where a plain float32 sum is off by more."""
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(20_000, 6, 6, generator=generator) * 100 + 1  # float32 batches' grams
    exact = values.to(torch.float64).sum(0)
    compensated = RunningSums({"x": (6, 6)}, "cpu", compensated=True)
    plain = torch.zeros(6, 6)
    for value in values:
        compensated.add("x", value)
        plain += value
    compensated_error = ((compensated.to_host()["x"] - exact).abs() / exact).max().item()
    plain_error = ((plain.to(torch.float64) - exact).abs() / exact).max().item()
    assert compensated_error <= 1e-6 < plain_error


def test_a_fit_with_compensated_float32_sums_agrees_with_float64_sums():
    model, tokenizer = tiny_model("llama"), IntTokenizer()
    model = model.to(torch.float32)
    fit = FitModel(model, tokenizer, FitConfig(modules="all", batch_size=3))
    sequences = fit.tokenize(random_examples(15, seed=2))
    exact = fit.covariance(sequences)
    with mock.patch("services.engine.sums.full_rate_float64", lambda device: False):
        compensated = fit.covariance(sequences)
    for name in fit.tracked:
        for sums in ("activation_sums", "gradient_sums"):
            reference = getattr(exact, sums)[name]
            scale = reference.abs().max()
            assert ((getattr(compensated, sums)[name] - reference).abs().max() / scale).item() <= 1e-6


def test_the_cgroup_cpu_limit_caps_the_cores(tmp_path):
    v2, v1 = tmp_path / "cpu.max", tmp_path / "v1" / "cpu.cfs_quota_us"
    v1.parent.mkdir()
    v2.write_text("250000 100000\n")
    assert cgroup_cpu_limit((v2, v1)) == 3
    v2.write_text("max 100000\n")
    assert cgroup_cpu_limit((v2, v1)) is None
    v2.unlink()
    v1.write_text("200000\n")
    (v1.parent / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit((v2, v1)) == 2
    v1.write_text("-1\n")
    assert cgroup_cpu_limit((v2, v1)) is None


def test_an_api_server_plans_with_its_workers_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("INFLUENCE_WORKER_HOST_GIB", "48")
    monkeypatch.setenv("INFLUENCE_WORKER_DEVICE_GIB", "80")
    assert WorkerBudget.of_process("") == WorkerBudget(48 * GIB, 80 * GIB)
    monkeypatch.delenv("INFLUENCE_WORKER_DEVICE_GIB")
    assert WorkerBudget.of_process("cuda").device is None  # this CPU machine: no GPU to ask


def test_workers_sharing_a_gpu_each_plan_with_their_share_and_are_told_the_fix(monkeypatch):
    """`influence serve --workers N` on a GPU loads N models on it (INFLUENCE_WORKERS_PER_GPU): each
    worker's device budget is 1/N of the GPU, and a model whose N copies do not fit is refused with
    a line naming --workers (a fake GPU of 80 GiB: this machine has none)."""
    monkeypatch.delenv("INFLUENCE_WORKER_DEVICE_GIB", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * GIB, 80 * GIB))
    assert WorkerBudget.of_process("cuda").device == 80 * GIB
    monkeypatch.setenv("INFLUENCE_WORKERS_PER_GPU", "4")
    shared = WorkerBudget.of_process("cuda")
    assert (shared.device, shared.sharing) == (20 * GIB, 4)
    model = tiny_model("llama")
    fit = FitModel(model, IntTokenizer(), FitConfig(batch_size=2, max_length=8))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert fit.plan(WorkerBudget(64 * GIB, device=4 * weights, sharing=1)).batch_size >= 1
    with pytest.raises(ResourceExhaustedError, match=r"1/4 of a GPU.*serve fewer workers per GPU \(--workers 4"):
        fit.plan(WorkerBudget(64 * GIB, device=weights, sharing=4))
