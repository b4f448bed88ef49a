"""The engine's curvature and scores against exact references in float64.

Tolerances: the models here are float64 on tiny problems (≤ ~200 parameters per module), where
the reference and the engine differ only by summation order and eigendecomposition round-off:
relative errors of 1e-12..1e-10 are typical, so 1e-8 is asserted (loose enough for any BLAS,
tight enough that any modelling error — a missing token, a wrong normalisation, a transposed
factor — shows as O(1)). Claims of exactness use models that are float64 end to end (GPT-2 and
the reference models); a Llama computes its softmax and RMSNorm in float32 even in a float64
model, so it is held to tests/support/numerics.FLOAT32 (see `model_tolerance`).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from services.engine.data import tokenize_queries, tokenize_training
from services.engine.fit import FitConfig, fit_factors, prepare_model
from services.engine.modules import weight_gradient_layout
from services.engine.precondition import Damping, precondition, preconditioner
from services.engine.records import Query, TrainingExample
from services.engine.score import ScoreConfig, Scorer, compute_scores
from tests.support.numerics import assert_close, model_tolerance, relative_error
from tests.support.reference import (
    BigramLM,
    IntTokenizer,
    dense_curvature,
    exact_fisher,
    exact_ggn,
    ids_text,
    kronecker_basis,
    loop_gradients,
    sequence_log_likelihood,
    single_batch,
)
from tests.support.tiny import random_examples, random_queries, tiny_model

TOL = 1e-8


# ---------------------------------------------------------------------------------------------
# Where theory says exact: a bigram LM with uniform predictions on every (x, y) pair.


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_kfac_and_ekfac_equal_exact_damped_ggn_when_it_factorises(strategy, bias):
    """Uniform predictions (W = 0) make the output Hessian H = diag(p) − ppᵀ the same for every
    input; over all (x, y) pairs the empirical Fisher equals that GGN and is exactly A ⊗ S. So
    K-FAC and EK-FAC must give the exact damped inverse."""
    vocab, width = 5, 3
    model = BigramLM(vocab, width, bias=bias)
    examples = [TrainingExample(f"{x}-{y}", ids_text([x, y])) for x, y in itertools.product(range(vocab), repeat=2)]
    factors = fit_factors(
        model, IntTokenizer(), examples, FitConfig(strategy=strategy, fisher="empirical", modules="mlp")
    )
    name = "layers.0.mlp"
    module = model.layers[0].mlp
    sequences = tokenize_training(IntTokenizer(), examples, 8)

    ggn = exact_ggn(model, name, module, sequences)
    fisher = exact_fisher(loop_gradients(model, {name: module}, sequences)[name])
    assert_close(fisher, ggn, TOL, what="reference check: empirical Fisher == GGN here")
    assert_close(dense_curvature(factors.factors[name], strategy), ggn, TOL, what=f"{strategy} curvature vs exact GGN")

    d_out, d_in = factors.factors[name].diagonal().shape
    vectors = torch.randn(3, d_out, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    damping = Damping(0.1)
    damping_value = damping.value(factors.factors[name].diagonal())
    expected = torch.linalg.solve(
        ggn + damping_value * torch.eye(ggn.shape[0], dtype=torch.float64), vectors.reshape(3, -1).T
    ).T
    actual = precondition(vectors, preconditioner(factors.factors[name], strategy, damping)).reshape(3, -1)
    assert_close(actual, expected, TOL, what=f"{strategy} IHVP vs exact damped GGN inverse")


# ---------------------------------------------------------------------------------------------
# Where EK-FAC is exact by construction: the eigenvalue correction.


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_ekfac_eigenvalues_are_the_exact_fisher_diagonal_in_the_kfac_basis(arch, fisher):
    """Λ = E_m[(Q_Sᵀ DW_m Q_A)²] = diag(Kᵀ F K) with F the exact per-sequence Fisher (same labels)."""
    model = tiny_model(arch)
    tokenizer = IntTokenizer()
    examples = random_examples(12, vocab=model.config.vocab_size, seed=1)
    config = FitConfig(strategy="ekfac", fisher=fisher, modules="mlp", batch_size=5, seed=3)
    factors = fit_factors(model, tokenizer, examples, config)
    modules, _ = prepare_model(model, "mlp")
    sequences = tokenize_training(tokenizer, examples, 64)
    objective = "sampled" if fisher == "sampled" else "true"
    gradients = loop_gradients(model, modules, sequences, objective=objective, seed=3)
    for name in modules:
        fisher_matrix = exact_fisher(gradients[name])
        basis = kronecker_basis(factors.factors[name])
        expected = torch.diagonal(basis.T @ fisher_matrix @ basis)
        tol = max(TOL, model_tolerance(model))
        assert_close(factors.factors[name].diagonal().reshape(-1), expected, tol, what=f"{name} Λ")


def test_ekfac_is_closer_to_the_exact_fisher_than_kfac():
    """EK-FAC's Λ is the best diagonal in the K-FAC eigenbasis (in Frobenius norm), so its
    curvature error can never exceed K-FAC's; on a real model its IHVPs are also closer."""
    model = tiny_model("gpt2")
    tokenizer = IntTokenizer()
    examples = random_examples(24, vocab=model.config.vocab_size, seed=5)
    queries = random_queries(4, vocab=model.config.vocab_size, seed=6)
    fitted = {
        strategy: fit_factors(model, tokenizer, examples, FitConfig(strategy=strategy, fisher="empirical"))
        for strategy in ("kfac", "ekfac")
    }
    modules, _ = prepare_model(model, "mlp")
    gradients = loop_gradients(model, modules, tokenize_training(tokenizer, examples, 64))
    factors = Scorer(model, tokenizer, fitted["ekfac"], ScoreConfig(batch_size=4, max_length=64)).query_factors(queries)
    query_grads = {name: module_factors.gradients() for name, module_factors in factors.items()}
    for name in modules:
        fisher_matrix = exact_fisher(gradients[name])
        errors = {
            strategy: relative_error(dense_curvature(fitted[strategy].factors[name], strategy), fisher_matrix)
            for strategy in fitted
        }
        assert errors["ekfac"] <= errors["kfac"] + 1e-12, errors
        damping_value = 0.1 * float(torch.diagonal(fisher_matrix).mean())
        vectors = query_grads[name].reshape(len(queries), -1).T
        exact = torch.linalg.solve(
            fisher_matrix + damping_value * torch.eye(fisher_matrix.shape[0], dtype=torch.float64), vectors
        )
        ihvp_errors = {}
        for strategy, factor_set in fitted.items():
            approx = precondition(
                query_grads[name], preconditioner(factor_set.factors[name], strategy, Damping(absolute=damping_value))
            )
            ihvp_errors[strategy] = relative_error(approx.reshape(len(queries), -1).T, exact)
        assert ihvp_errors["ekfac"] < ihvp_errors["kfac"], (name, ihvp_errors)


# ---------------------------------------------------------------------------------------------
# The whole scoring pipeline against dense matrices.


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
def test_scores_equal_dense_inverse_products(strategy):
    """score(q, m) = Σ_modules g_qᵀ (F_approx + λI)⁻¹ g_m with explicit dense matrices."""
    model = tiny_model("gpt2")
    tokenizer = IntTokenizer()
    examples = random_examples(10, vocab=model.config.vocab_size, seed=7)
    queries = random_queries(3, vocab=model.config.vocab_size, seed=8)
    factors = fit_factors(model, tokenizer, examples, FitConfig(strategy=strategy, batch_size=4))
    result = compute_scores(model, tokenizer, factors, examples, queries, ScoreConfig(batch_size=3, top_k=3))

    modules, _ = prepare_model(model, "mlp")
    train_grads = loop_gradients(model, modules, tokenize_training(tokenizer, examples, 512))
    query_sequences = tokenize_queries(tokenizer, queries, 512)
    query_grads = loop_gradients(model, modules, query_sequences)
    expected = torch.zeros(len(queries), len(examples), dtype=torch.float64)
    for name in modules:
        module_factors = factors.factors[name]
        if strategy == "identity":
            preconditioned = query_grads[name]
        else:
            curvature = dense_curvature(module_factors, strategy)
            damping_value = Damping(0.1).value(module_factors.diagonal())
            identity = torch.eye(curvature.shape[0], dtype=torch.float64)
            preconditioned = torch.linalg.solve(curvature + damping_value * identity, query_grads[name].T).T
        expected += preconditioned @ train_grads[name].T
    assert_close(result.scores.to(torch.float64), expected, 1e-6, what=f"{strategy} scores (stored as float32)")


def test_sign_positive_score_means_upweighting_makes_completion_more_likely():
    """With identity curvature the score is the first-order change of log p(completion) when
    the training sequence's log-likelihood gradient is added to the tracked weights (and biases).
    GPT-2 computes in float64 end to end (Llama's RMSNorm upcasts only to float32, too coarse
    for a small step), so a central difference with ε = 1e-5 is accurate to ~1e-8 relative; scores are
    stored as float32 (~1e-7), so 1e-5 relative is asserted."""
    model = tiny_model("gpt2")
    tokenizer = IntTokenizer()
    examples = random_examples(6, seed=9)
    queries = random_queries(1, seed=10)
    factors = fit_factors(model, tokenizer, examples, FitConfig(strategy="identity"))
    scores = compute_scores(model, tokenizer, factors, examples, queries, ScoreConfig()).scores[0].to(torch.float64)
    modules, tracked = prepare_model(model, "mlp")
    train_grads = loop_gradients(model, modules, tokenize_training(tokenizer, examples, 512))
    query_sequence = tokenize_queries(tokenizer, queries, 512)[0]

    def measurement() -> float:
        with torch.no_grad():
            return float(sequence_log_likelihood(model, single_batch(query_sequence)))

    def shifted_measurement(index: int, step: float) -> float:
        originals = {name: [p.detach().clone() for p in module.parameters()] for name, module in modules.items()}
        with torch.no_grad():
            for name, module in modules.items():
                info = tracked[name]
                weight_step, bias_step = weight_gradient_layout(info, train_grads[name][index].reshape(info.d_out, -1))
                module.weight += step * weight_step
                module.bias += step * bias_step
        value = measurement()
        with torch.no_grad():
            for name, module in modules.items():
                for parameter, original in zip(module.parameters(), originals[name], strict=True):
                    parameter.copy_(original)
        return value

    epsilon = 1e-5
    for index in range(len(examples)):
        change = (shifted_measurement(index, epsilon) - shifted_measurement(index, -epsilon)) / (2 * epsilon)
        assert abs(change - float(scores[index])) <= 1e-5 * max(1e-3, abs(change)), (
            index,
            change,
            float(scores[index]),
        )
    assert scores.abs().max() > 0 and (scores > 0).any() and (scores < 0).any()


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
@pytest.mark.needs_servers
def test_the_service_system_reproduces_the_exact_damped_ggn(strategy, tmp_path):
    """The factorising bigram case through the whole system: a float64 checkpoint loaded by the
    workers, the data in four shards (per-shard partial sums, eigendecomposition, correction,
    finalize), scores by the distributed score stages. Curvature == exact GGN, and scores ==
    g_qᵀ (GGN + λI)⁻¹ g_m with dense matrices (stored as float32: 1e-6)."""
    from safetensors.torch import load_file

    from services.catalog.factor_sets import load_factors
    from services.client import InfluenceClient, model_spec
    from services.embedded import EmbeddedSystem
    from services.engine.model_io import load_model_and_tokenizer
    from tests.support.reference import save_bigram_checkpoint

    vocab = 5
    model_dir = save_bigram_checkpoint(tmp_path / "bigram", vocab=vocab)
    pairs = [f"{x} {y}" for x, y in itertools.product(range(vocab), repeat=2)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(f'{{"text": "{text}"}}\n' for text in pairs))
    queries = [Query("q0", "1", "3"), Query("q1", "4", "0")]
    spec = model_spec(model_dir, dtype="float64")
    with EmbeddedSystem() as system, InfluenceClient(system.target) as client:
        dataset = client.register_dataset(spec, data, shard_size=7)
        assert dataset.num_shards == 4
        factor_set = client.fit_factors(spec, dataset.name, strategy=strategy, fisher="empirical")
        result = client.compute_scores(spec, factor_set.name, dataset.name, queries, top_k=3)
        client.download_factors(factor_set.name, tmp_path / "factors")
        client.download_result(result.name, tmp_path / "scores")

    model, tokenizer = load_model_and_tokenizer(model_dir, dtype="float64")
    name, module = "layers.0.mlp", model.layers[0].mlp
    factors = load_factors(tmp_path / "factors").factors[name]
    sequences = tokenize_training(tokenizer, [TrainingExample(str(i), text) for i, text in enumerate(pairs)], 8)
    ggn = exact_ggn(model, name, module, sequences)
    assert_close(dense_curvature(factors, strategy), ggn, TOL, f"{strategy} curvature through the system")

    train_grads = loop_gradients(model, {name: module}, sequences)[name]
    query_grads = loop_gradients(model, {name: module}, tokenize_queries(tokenizer, queries, 8))[name]
    damping = Damping(0.1).value(factors.diagonal())
    expected = torch.linalg.solve(ggn + damping * torch.eye(ggn.shape[0], dtype=torch.float64), query_grads.T).T
    scores = load_file(str(tmp_path / "scores" / "scores.safetensors"))["scores"]
    assert_close(scores, expected @ train_grads.T, 1e-6, f"{strategy} scores through the system")
