"""Per-sequence gradients, breakdowns and invariances of the engine (float64 unless stated).

Tolerances follow tests/support/numerics.py: FLOAT64 (1e-9) where two float64-end-to-end computations
differ only in summation order, FLOAT32 (1e-5) wherever float32 arithmetic is on the path (float32
storage, float32 models, and the float32 softmax inside float64 Llama/GPT-NeoX/OPT models).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from services.catalog.factor_sets import load_factors, save_factors
from services.engine.capture import capture, describe_all
from services.engine.data import collate, length_bucketed_batches, tokenize_queries, tokenize_training
from services.engine.factor_io import from_artifact, to_artifact
from services.engine.factors import ModuleFactors
from services.engine.fit import (
    CaptureCache,
    FitConfig,
    FitModel,
    eigendecompose,
    finalize,
    fit_factors,
    prepare_model,
)
from services.engine.modules import select_modules
from services.engine.precondition import Damping, low_rank, precondition, preconditioner
from services.engine.score import (
    ScoreConfig,
    Scorer,
    compute_scores,
    compute_self_influence,
    concatenate,
    mean_length,
    merge,
    merge_self_influence,
    score_in_memory,
)
from services.engine.scoring import module_scores, plan_module_queries
from services.engine.strategies import STRATEGIES
from services.errors import DataLossError, InputError, PreconditionError
from services.toy.models import build_tiny_model
from tests.support.numerics import FLOAT32, FLOAT64, assert_close, assert_columns_equal_up_to_sign, model_tolerance
from tests.support.reference import IntTokenizer, SharedLayerLM, loop_gradients
from tests.support.tiny import random_examples, random_queries, tiny_model

TOL = FLOAT64


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox", "opt"])
@pytest.mark.parametrize("selection", ["mlp", "attention"])
def test_per_sequence_gradients_equal_a_plain_autograd_loop(arch, selection):
    """Batched, padded, hook-captured DW_m == each sequence alone with loss.backward()."""
    model = tiny_model(arch)
    tokenizer = IntTokenizer()
    sequences = tokenize_training(tokenizer, random_examples(7, seed=11), 64)
    modules, _ = prepare_model(model, selection)
    expected = loop_gradients(model, modules, sequences)
    for batch in length_bucketed_batches(sequences, 3, tokenizer.pad_token_id):
        captures = capture(model, modules, batch)
        for name, module_capture in captures.items():
            actual = module_capture.per_sequence_gradients().reshape(len(batch.indices), -1)
            assert_close(actual, expected[name][batch.indices], model_tolerance(model), f"{arch} {name}")


def test_module_selection_finds_mlp_and_attention_per_architecture():
    expected_mlp = {
        "gpt2": {"mlp.c_fc", "mlp.c_proj"},
        "llama": {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
        "gpt_neox": {"mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
        "opt": {"fc1", "fc2"},
    }
    for arch, suffixes in expected_mlp.items():
        model = tiny_model(arch)
        mlp = select_modules(model, "mlp")
        attention = select_modules(model, "attention")
        assert all(any(name.endswith(suffix) for suffix in suffixes) for name in mlp), (arch, list(mlp))
        assert len(mlp) == len(suffixes) * 2, (arch, list(mlp))
        assert attention and not set(attention) & set(mlp), arch
        assert set(select_modules(model, "all")) == set(mlp) | set(attention)
        assert "lm_head" not in " ".join(select_modules(model, "all"))


def test_bad_module_selection_is_a_clear_error():
    model = tiny_model("gpt2")
    with pytest.raises(InputError, match="matches no linear module"):
        select_modules(model, "no_such_module")
    with pytest.raises(InputError, match="invalid --modules regular expression"):
        select_modules(model, "mlp(")


def test_query_gradient_counts_only_completion_tokens():
    model = tiny_model("gpt2")
    tokenizer = IntTokenizer()
    queries = random_queries(4, seed=12)
    sequences = tokenize_queries(tokenizer, queries, 64)
    for sequence, query in zip(sequences, queries, strict=True):
        n_prompt = len(query.prompt.split())
        assert not bool(sequence.target_mask[:n_prompt].any()) and bool(sequence.target_mask[n_prompt:].all())
    modules, _ = prepare_model(model, "mlp")
    expected = loop_gradients(model, modules, sequences)
    batch = collate(sequences, 0)
    for name, module_capture in capture(model, modules, batch).items():
        assert_close(module_capture.per_sequence_gradients().reshape(len(queries), -1), expected[name], TOL, name)


def test_breakdowns_sum_to_the_total():
    """Per-module scores sum to the total; per-token scores of each top-k sequence sum to its score."""
    model = tiny_model("gpt2")
    tokenizer = IntTokenizer()
    examples, queries = random_examples(9, seed=13), random_queries(3, seed=14)
    factors = fit_factors(model, tokenizer, examples, FitConfig(batch_size=4))
    for rank in (None, 2):
        config = ScoreConfig(per_module=True, per_token=True, top_k=4, batch_size=4, query_rank=rank)
        result = compute_scores(model, tokenizer, factors, examples, queries, config)
        assert_close(result.per_module.sum(0), result.scores, 1e-6, "per-module sum (float32 storage)")
        for query_top in result.top:
            for entry in query_top:
                assert len(entry.token_scores) == len(examples[entry.index].text.split())
                assert abs(sum(entry.token_scores) - entry.score) <= 1e-9 * max(1.0, abs(entry.score))
                assert abs(sum(entry.per_module.values()) - entry.score) <= 1e-9 * max(1.0, abs(entry.score))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batch_size_does_not_change_factors_or_scores(arch):
    """Sampled labels come from per-sequence generators, so batching changes nothing but round-off
    (float64 round-off for GPT-2; float32 for Llama, whose softmax and RMSNorm are float32)."""
    model = tiny_model(arch)
    tokenizer = IntTokenizer()
    examples, queries = random_examples(11, seed=15), random_queries(2, seed=16)
    results = []
    for batch_size in (1, 4, 11):
        factors = fit_factors(model, tokenizer, examples, FitConfig(batch_size=batch_size, seed=1))
        results.append(
            (factors, compute_scores(model, tokenizer, factors, examples, queries, ScoreConfig(batch_size=batch_size)))
        )
    (reference_factors, reference), *others = results
    tol = model_tolerance(model)
    for factors, result in others:
        for name in factors.factors:
            assert_close(factors.factors[name].diagonal(), reference_factors.factors[name].diagonal(), tol, name)
        assert_close(result.scores, reference.scores, max(tol, 1e-6), "scores (float32 storage)")


def test_partitioned_fit_equals_unpartitioned():
    """Covariance and correction sums over shards (reduced in any order) equal the single-process fit."""
    model = tiny_model("gpt2")
    tokenizer = IntTokenizer()
    examples = random_examples(13, seed=17)
    config = FitConfig(batch_size=3, seed=2)
    whole = fit_factors(model, tokenizer, examples, config)

    fit = FitModel(model, tokenizer, config)
    sequences = fit.tokenize(examples)
    shards = [sequences[:5], sequences[5:6], sequences[6:]]
    eigen = eigendecompose([fit.covariance(shard) for shard in shards], torch.float64)
    corrections = [fit.correction(shard, eigen) for shard in reversed(shards)]
    merged = finalize(fit.fitted, config, eigen, corrections, len(sequences)).factors
    tracked = fit.tracked
    for name in tracked:
        for field, value in whole.factors[name].tensors().items():
            other = getattr(merged[name], field)
            if "eigenvectors" in field:  # a unit eigenvector is unique up to its sign
                assert_columns_equal_up_to_sign(other, value, 1e-7, f"{name} {field}")
            else:
                assert_close(other, value, TOL, f"{name} {field}")
        # and the IHVPs they produce agree
        gradient = torch.randn(
            3, *whole.factors[name].diagonal().shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
        )
        assert_close(
            precondition(gradient, preconditioner(merged[name], "ekfac", Damping())),
            precondition(gradient, preconditioner(whole.factors[name], "ekfac", Damping())),
            TOL,
            f"{name} IHVP",
        )


def test_partitioned_scoring_equals_the_in_memory_chain():
    """The score stages' path (queries prepared once, the TF-IDF mask over all the data, a score
    per shard, one merge) gives the in-memory chain's result bit for bit when each batch is one
    sequence (sharding then changes no arithmetic): scores, breakdowns, top-k and token scores;
    self-influence likewise."""
    model = tiny_model("gpt2")
    tokenizer = IntTokenizer()
    examples, queries = random_examples(13, seed=31), random_queries(3, seed=32)
    factors = fit_factors(model, tokenizer, examples, FitConfig(batch_size=4))
    config = ScoreConfig(batch_size=1, top_k=3, per_module=True, per_token=True, tfidf=5)
    scorer = Scorer(model, tokenizer, factors, config)
    sequences = scorer.tokenize_training(examples)
    whole = score_in_memory(scorer, queries, sequences)

    shards = [sequences[:5], sequences[5:6], sequences[6:]]
    prepared = scorer.prepare(queries, mean_length(sequences))
    mask = scorer.lexical_mask(queries, sequences)
    partials = [scorer.score(prepared, shard, mask=mask) for shard in shards]
    merged = merge(partials, scorer.names, config, mask)
    scorer.attach_token_scores(prepared, merged.top, sequences.__getitem__)
    assert mask is not None and torch.equal(mask, whole.mask) and not bool(mask.any(0).all())
    assert torch.equal(concatenate(partials), whole.partial.scores)
    assert torch.equal(merged.scores, whole.result.scores)
    assert torch.equal(merged.per_module, whole.result.per_module)
    assert merged.top == whole.result.top and all(entry.token_scores for top in merged.top for entry in top)
    assert compute_scores(model, tokenizer, factors, examples, queries, config).top == whole.result.top

    sharded_self = merge_self_influence([scorer.self_influence(shard) for shard in shards])
    assert torch.equal(sharded_self, compute_self_influence(model, tokenizer, factors, examples, config))


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_each_strategy_stores_the_tensors_it_declares_and_its_files_must_hold_them(strategy):
    declared = STRATEGIES[strategy]
    assert set(declared.stores) <= set(ModuleFactors.TENSOR_FIELDS)
    # a basis exactly when there is a covariance pass, a measured Λ exactly when there is a correction pass
    assert ("gradient_eigenvectors" in declared.stores) == declared.covariance
    assert ("eigenvalues" in declared.stores) == declared.correction
    model = tiny_model("gpt2")
    factors = fit_factors(model, IntTokenizer(), random_examples(5, seed=33), FitConfig(strategy=strategy))
    for name, module_factors in factors.factors.items():
        assert set(module_factors.tensors()) == set(declared.stores), name
    metadata, files = to_artifact(factors)
    loaded = from_artifact(metadata, files.__getitem__)
    for name, module_factors in factors.factors.items():
        for key, value in module_factors.tensors().items():
            assert torch.equal(loaded.factors[name].tensors()[key], value), (name, key)
    for missing in declared.stores:
        damaged = {file: {k: v for k, v in tensors.items() if k != missing} for file, tensors in files.items()}
        with pytest.raises(PreconditionError, match=f"no tensor {missing}, which {strategy} needs"):
            from_artifact(metadata, damaged.__getitem__)


def test_cached_and_recomputed_correction_pass_agree():
    model = tiny_model("gpt2")
    tokenizer = IntTokenizer()
    examples = random_examples(8, seed=18)
    cached = fit_factors(model, tokenizer, examples, FitConfig(batch_size=3))
    recomputed = fit_factors(model, tokenizer, examples, FitConfig(batch_size=3, cache_gib=0))
    for name in cached.factors:
        assert torch.equal(cached.factors[name].diagonal(), recomputed.factors[name].diagonal()), name
    cache = CaptureCache(0)
    cache.offer(
        capture(model, prepare_model(model, "mlp")[0], collate(tokenize_training(tokenizer, examples, 64)[:2], 0)), 2
    )
    assert not cache.complete


def test_full_rank_query_batching_reproduces_full_scores_and_kernels_agree():
    model = tiny_model("gpt2")
    tokenizer = IntTokenizer()
    examples, queries = random_examples(7, seed=19), random_queries(3, seed=20)
    factors = fit_factors(model, tokenizer, examples, FitConfig())
    full = compute_scores(model, tokenizer, factors, examples, queries, ScoreConfig())
    ranked = compute_scores(model, tokenizer, factors, examples, queries, ScoreConfig(query_rank=64))
    assert_close(ranked.scores, full.scores, 1e-6, "rank >= min(d_out, d_in)")
    low = compute_scores(model, tokenizer, factors, examples, queries, ScoreConfig(query_rank=1))
    assert relative_error_of(low.scores, full.scores) > 1e-4, "rank 1 should differ from full rank"

    # Both kernels score the same low-rank P identically.
    modules, _ = prepare_model(model, "mlp")
    batch = collate(tokenize_training(tokenizer, examples, 64), 0)
    captures = capture(model, modules, batch)
    name = next(iter(modules))
    gradient = torch.randn(3, *factors.factors[name].diagonal().shape, dtype=torch.float64)
    factor_pair = low_rank(gradient, 2)
    contract = plan_module_queries(gradient, factor_pair, expected_tokens=1.0, dtype=torch.float64)
    materialise = plan_module_queries(gradient, factor_pair, expected_tokens=1e9, dtype=torch.float64)
    assert (contract.kernel, materialise.kernel) == ("contract", "materialise")
    assert_close(module_scores(captures[name], contract), module_scores(captures[name], materialise), TOL, "kernels")


def relative_error_of(actual, expected) -> float:
    return float((actual - expected).norm() / expected.norm())


def test_conv1d_equals_an_equivalent_linear():
    """GPT-2's Conv1D (weight stored transposed) scores exactly like nn.Linear with Wᵀ."""
    model = tiny_model("gpt2")
    tokenizer = IntTokenizer()
    examples, queries = random_examples(6, seed=21), random_queries(2, seed=22)
    conv_factors = fit_factors(model, tokenizer, examples, FitConfig())
    conv_scores = compute_scores(model, tokenizer, conv_factors, examples, queries, ScoreConfig()).scores

    linear_model = tiny_model("gpt2")
    for block in linear_model.transformer.h:
        for attribute in ("c_fc", "c_proj"):
            conv = getattr(block.mlp, attribute)
            linear = nn.Linear(conv.weight.shape[0], conv.weight.shape[1], dtype=torch.float64)
            linear.weight.data = conv.weight.data.T.clone()
            linear.bias.data = conv.bias.data.clone()
            setattr(block.mlp, attribute, linear)
    linear_factors = fit_factors(linear_model, tokenizer, examples, FitConfig())
    linear_factors.model_fingerprint = ""
    linear_scores = compute_scores(linear_model, tokenizer, linear_factors, examples, queries, ScoreConfig()).scores
    for name in conv_factors.factors:
        assert_close(linear_factors.factors[name].diagonal(), conv_factors.factors[name].diagonal(), TOL, name)
    assert_close(linear_scores, conv_scores, 1e-6, "scores")


def test_a_module_called_twice_contributes_both_calls():
    model = SharedLayerLM(vocab=11, width=4)
    tokenizer = IntTokenizer()
    examples = random_examples(5, vocab=11, seed=23)
    sequences = tokenize_training(tokenizer, examples, 64)
    modules, tracked = prepare_model(model, "mlp")
    expected = loop_gradients(model, modules, sequences)
    batch = collate(sequences, 0)
    module_capture = capture(model, modules, batch)["blocks.0.mlp"]
    assert module_capture.calls == 2
    assert_close(module_capture.per_sequence_gradients().reshape(5, -1), expected["blocks.0.mlp"], TOL, "shared")
    covariance = FitModel(model, tokenizer, FitConfig(fisher="empirical", batch_size=2)).covariance(sequences)
    assert covariance.token_counts["blocks.0.mlp"] == 2 * sum(s.length for s in sequences)
    factors = fit_factors(model, tokenizer, examples, FitConfig(fisher="empirical"))
    scores = compute_self_influence(model, tokenizer, factors, examples)
    assert bool((scores > 0).all())
    assert describe_all(modules)["blocks.0.mlp"] == tracked["blocks.0.mlp"]


def test_padding_does_not_change_a_sequence_score():
    model = tiny_model("opt")
    tokenizer = IntTokenizer()
    examples, queries = random_examples(6, seed=24, min_len=2, max_len=14), random_queries(2, seed=25)
    factors = fit_factors(model, tokenizer, examples, FitConfig(fisher="empirical"))
    together = compute_scores(model, tokenizer, factors, examples, queries, ScoreConfig(batch_size=6)).scores
    alone = compute_scores(model, tokenizer, factors, examples, queries, ScoreConfig(batch_size=1)).scores
    assert_close(together, alone, FLOAT32, "padded batch vs one at a time (OPT's softmax is float32)")


def test_seeded_fit_is_bit_reproducible_and_seed_matters():
    model = tiny_model("gpt2").float()
    tokenizer = IntTokenizer()
    examples = random_examples(8, seed=26)
    first = fit_factors(model, tokenizer, examples, FitConfig(seed=4))
    second = fit_factors(model, tokenizer, examples, FitConfig(seed=4))
    other = fit_factors(model, tokenizer, examples, FitConfig(seed=5))
    for name in first.factors:
        for field, value in first.factors[name].tensors().items():
            assert torch.equal(value, getattr(second.factors[name], field)), (name, field)
        assert not torch.equal(first.factors[name].eigenvalues, other.factors[name].eigenvalues)


def test_self_influence_is_the_preconditioned_gradient_norm():
    model = tiny_model("gpt2")
    tokenizer = IntTokenizer()
    examples = random_examples(5, seed=27)
    factors = fit_factors(model, tokenizer, examples, FitConfig())
    self_scores = compute_self_influence(model, tokenizer, factors, examples)
    modules, _ = prepare_model(model, "mlp")
    gradients = loop_gradients(model, modules, tokenize_training(tokenizer, examples, 64))
    expected = torch.zeros(len(examples), dtype=torch.float64)
    for name in modules:
        shape = factors.factors[name].diagonal().shape
        curvature = preconditioner(factors.factors[name], "ekfac", Damping())
        preconditioned = precondition(gradients[name].reshape(-1, *shape), curvature)
        expected += (preconditioned.reshape(len(examples), -1) * gradients[name]).sum(-1)
    assert_close(self_scores.to(torch.float64), expected, 1e-6, "self-influence")


def test_factor_files_round_trip_and_are_verified(tmp_path):
    model = tiny_model("gpt2")
    tokenizer = IntTokenizer()
    examples, queries = random_examples(5, seed=28), random_queries(2, seed=29)
    factors = fit_factors(model, tokenizer, examples, FitConfig())
    save_factors(factors, tmp_path / "f")
    loaded = load_factors(tmp_path / "f")
    assert loaded.strategy == "ekfac" and loaded.modules == factors.modules
    for name in factors.factors:
        for field, value in factors.factors[name].tensors().items():
            assert torch.equal(getattr(loaded.factors[name], field), value), (name, field)
    assert torch.equal(
        compute_scores(model, tokenizer, loaded, examples, queries).scores,
        compute_scores(model, tokenizer, factors, examples, queries).scores,
    )
    other_model = tiny_model("gpt2", seed=1)
    with pytest.raises(PreconditionError, match="another model"):
        compute_scores(other_model, tokenizer, loaded, examples, queries)
    # another architecture: the fingerprint's message, not one about a --modules never given
    with pytest.raises(PreconditionError, match=r"another model .*has no module") as refused:
        compute_scores(tiny_model("llama"), tokenizer, loaded, examples, queries)
    assert "--modules" not in str(refused.value)
    victim = next((tmp_path / "f").glob("*.safetensors"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(DataLossError, match="corrupted"):
        load_factors(tmp_path / "f")


def test_bfloat16_model_scores_track_float32():
    """A bfloat16 model (8-bit mantissa, ~0.4% error per op) is captured and contracted in
    float32: its scores are not equal to float32's but must correlate almost perfectly."""
    examples, queries = random_examples(20, seed=30), random_queries(3, seed=31)
    scores = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_tiny_model("llama", 23, d_model=16, seed=0, dtype=dtype)
        factors = fit_factors(model, IntTokenizer(), examples, FitConfig(fisher="empirical"))
        scores[dtype] = compute_scores(model, IntTokenizer(), factors, examples, queries).scores.flatten()
    assert scores[torch.bfloat16].dtype == torch.float32
    pearson = float(torch.corrcoef(torch.stack([scores[torch.float32], scores[torch.bfloat16]]))[0, 1])
    assert pearson > 0.999, pearson


@pytest.mark.parametrize("vocab", [7, 64, 100, 5000])
def test_two_level_inverse_cdf_matches_the_flat_scan(vocab):
    """The sampler's two-level search picks the first index whose running sum reaches u·total,
    like a flat cumulative-sum search (in float64 no rounding separates the two), never an index
    of zero weight, and leaves the padding of the last block alone."""
    from services.engine.capture import inverse_cdf

    generator = torch.Generator().manual_seed(vocab)
    weights = torch.softmax(3 * torch.randn(4, 33, vocab, generator=generator, dtype=torch.float64), -1)
    weights[..., 1::3] = 0.0
    uniforms = torch.rand(4, 33, generator=generator, dtype=torch.float64)
    cumulative = weights.cumsum(-1)
    flat = torch.searchsorted(cumulative, (uniforms.unsqueeze(-1) * cumulative[..., -1:])).squeeze(-1)
    drawn = inverse_cdf(weights, uniforms)
    assert torch.equal(drawn, flat)
    assert (weights.gather(-1, drawn.unsqueeze(-1)) > 0).all()


@pytest.mark.parametrize("d", [1, 2, 7, 300])
def test_packed_symmetric_partial_sums_round_trip(d):
    """Partial covariance sums travel as upper triangles: unpacking gives the symmetrised matrix
    exactly, with d(d+1)/2 stored entries."""
    from services.engine.covariance import symmetric_from_upper, upper_triangle

    x = torch.randn(d, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    packed = upper_triangle(x)
    assert packed.shape == (d * (d + 1) // 2,)
    assert torch.equal(symmetric_from_upper(packed, d), 0.5 * (x + x.T))
    with pytest.raises(ValueError, match="entries"):
        symmetric_from_upper(packed[:-1], d)


def test_the_capture_cache_is_sized_up_front():
    """capture_bytes predicts the cache's size exactly, so a pass whose captures cannot fit in the
    budget (or the fit's own cap) never starts caching; the fit is the same either way."""
    from services.engine.resources import MemoryBudget

    model = tiny_model("gpt2")
    tokenizer = IntTokenizer()
    examples = random_examples(9, seed=31)
    fit = FitModel(model, tokenizer, FitConfig(batch_size=4))
    sequences = fit.tokenize(examples)
    needed = fit.capture_bytes(sequences)
    cache = fit.capture_cache(MemoryBudget(needed), sequences)
    fit.covariance(sequences, cache=cache)
    assert cache.complete and cache.bytes == needed
    cache.release()
    assert fit.capture_cache(MemoryBudget(needed - 1), sequences) is None
    capped = FitModel(model, tokenizer, FitConfig(batch_size=4, cache_gib=(needed - 1) / 2**30))
    assert capped.capture_cache(MemoryBudget(10 * needed), sequences) is None
    budget = MemoryBudget(10 * needed)
    budget.reserve(9 * needed + 1)  # another job's caches hold most of the budget
    assert fit.capture_cache(budget, sequences) is None


def test_every_association_of_the_rotated_gradient_is_the_same_and_the_cheapest_is_chosen():
    """Q_Sᵀ sᵀ a Q_A in any of its four orders equals the plain einsum in float64; short sequences
    rotate their tokens, long ones the gradient (2,048 tokens through a 576 x 1536 MLP)."""
    from services.engine.rotation import ROTATION_ORDERS, rotate_in_order, rotation_order

    generator = torch.Generator().manual_seed(0)
    s = torch.randn(3, 9, 12, generator=generator, dtype=torch.float64)
    a = torch.randn(3, 9, 5, generator=generator, dtype=torch.float64)
    q_s = torch.linalg.qr(torch.randn(12, 12, generator=generator, dtype=torch.float64))[0]
    q_a = torch.linalg.qr(torch.randn(5, 5, generator=generator, dtype=torch.float64))[0]
    expected = torch.einsum("io,bni,bnj,jk->bok", q_s, s, a, q_a)
    for order in ROTATION_ORDERS:
        assert_close(rotate_in_order(s, a, q_s, q_a, order), expected, TOL, order)
    assert rotation_order(36, 1536, 576) == rotation_order(36, 576, 1536) == "tokens"
    assert rotation_order(2048, 1536, 576) == rotation_order(2048, 576, 1536) == "gradient"
    assert rotation_order(700, 1536, 576) == "inputs" and rotation_order(700, 576, 1536) == "outputs"
