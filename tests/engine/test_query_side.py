"""The query side from per-token factors (issue 24) against the path it replaces, in float64:
query gradients rotated into the eigenbasis token by token equal the materialised gradients
rotated whole; the prepared (preconditioned) queries equal precondition(materialised gradients);
queries kept in the eigenbasis score what the parameter-basis ones score; the index's full-rank
whitened queries equal the old whitening; and the randomized low rank stays near the optimal one."""

from __future__ import annotations

import pytest
import torch

from services.engine.fit import FitConfig, fit_factors
from services.engine.index import Indexer, IndexSpec
from services.engine.precondition import low_rank, precondition
from services.engine.rotation import rotate
from services.engine.score import PreparedQueries, ScoreConfig, Scorer, mean_length
from tests.support.numerics import assert_close
from tests.support.reference import IntTokenizer
from tests.support.tiny import random_examples, random_queries, tiny_model

EXACT = 1e-10  # float64 models: the two paths differ by round-off only


@pytest.fixture(scope="module", params=["ekfac", "kfac", "diagonal", "identity"])
def setup(request):
    model = tiny_model("llama", d_model=8)
    examples, queries = random_examples(14, seed=50), random_queries(3, seed=51)
    factors = fit_factors(model, IntTokenizer(), examples, FitConfig(strategy=request.param, batch_size=4))
    scorer = Scorer(model, IntTokenizer(), factors, ScoreConfig(batch_size=2))
    return model, factors, scorer, examples, queries


def test_rotated_per_token_equals_the_materialised_gradient_rotated(setup):
    _, _, scorer, _, queries = setup
    factors = scorer.query_factors(queries)
    for name in scorer.names:
        curvature = scorer.preconditioners[name]
        gradients = factors[name].gradients()  # [Q, d_out, d_in], the old path's query gradients
        expected = gradients
        if curvature.gradient_basis is not None:
            expected = rotate(gradients, curvature.gradient_basis, curvature.activation_basis)
        assert_close(scorer.rotated_query_gradients(name, factors[name]), expected, EXACT, name)


def test_prepared_queries_equal_preconditioned_materialised_gradients(setup):
    _, _, scorer, _, queries = setup
    factors = scorer.query_factors(queries)
    prepared = scorer.prepare(queries, mean_tokens=8.0)
    for name in scorer.names:
        expected = precondition(factors[name].gradients(), scorer.preconditioners[name], torch.float64)
        module = prepared.modules[name]
        assert not module.eigenbasis
        assert_close(module.full.reshape(expected.shape), expected, EXACT, name)


@pytest.mark.slow
def test_queries_kept_in_the_eigenbasis_score_as_rotated_back(setup):
    _, _, scorer, examples, queries = setup
    sequences = scorer.tokenize_training(examples)
    back = scorer.prepare(queries, mean_length(sequences))  # a whole corpus: rotated back
    factors = scorer.query_factors(queries)
    kept = PreparedQueries(
        {name: scorer.prepare_module(name, factors[name], mean_length(sequences)) for name in scorer.names}
    )  # full rank: in the eigenbasis until settled
    if scorer.preconditioners[scorer.names[0]].gradient_basis is not None:
        assert all(module.eigenbasis for module in kept.modules.values())
        assert all(module.eigenbasis for module in scorer.settle(kept, 1, 8.0).modules.values())  # one: cheaper
    assert_close(scorer.score(kept, sequences).scores, scorer.score(back, sequences).scores, EXACT, "scores")
    token_kept = scorer.token_scores(sequences[0], kept, [0, 2])
    assert_close(token_kept, scorer.token_scores(sequences[0], back, [0, 2]), EXACT, "token scores")
    settled = scorer.settle(kept, len(sequences) * 10**6, mean_length(sequences))
    assert not any(module.eigenbasis for module in settled.modules.values())
    assert_close(scorer.score(settled, sequences).scores, scorer.score(back, sequences).scores, EXACT, "settled")


def test_low_rank_prepared_queries_equal_the_old_low_rank(setup):
    model, factors, _, _, queries = setup
    scorer = Scorer(model, IntTokenizer(), factors, ScoreConfig(batch_size=2, query_rank=2))
    old_factors = scorer.query_factors(queries)
    prepared = scorer.prepare(queries, mean_tokens=400.0)  # long sequences: the contract kernel
    for name in scorer.names:
        old = precondition(old_factors[name].gradients(), scorer.preconditioners[name], torch.float64)
        left, right = low_rank(old, 2)
        module = prepared.modules[name]
        n_queries, rank = module.n_queries, module.rank
        if module.full is not None:
            new = module.full.reshape(old.shape)
        else:
            u = module.left.reshape(-1, n_queries, rank).transpose(0, 1)
            v = module.right.reshape(-1, n_queries, rank).transpose(0, 1)
            new = u @ v.transpose(1, 2)
        assert_close(new, left @ right.transpose(1, 2), 1e-8, name)


def test_index_queries_at_full_rank_equal_the_old_whitening(setup):
    model, factors, scorer, _, queries = setup
    indexer = Indexer(model, IntTokenizer(), factors, IndexSpec("none", storage_dtype="float32"), ScoreConfig())
    query_factors = scorer.query_factors(queries)
    index_queries = indexer.queries(queries)
    for name in scorer.names:
        curvature = scorer.preconditioners[name]
        gradients = query_factors[name].gradients()
        if curvature.gradient_basis is not None:
            gradients = rotate(gradients, curvature.gradient_basis, curvature.activation_basis)
        expected = gradients if curvature.denominator is None else gradients / curvature.denominator.sqrt()
        assert_close(index_queries[name]["w"].double(), expected, 1e-6, name)  # index queries are float32


@pytest.mark.slow
def test_randomized_query_low_rank_is_near_the_optimal_truncation():
    """The index's query side truncates by the build's randomized SVD (float32, one power
    iteration): its Frobenius error stays within 10% of the optimal rank-r error on these queries
    (BENCHMARKS.md states the bound measured on SmolLM2)."""
    model = tiny_model("llama", d_model=16)
    examples, queries = random_examples(10, seed=52), random_queries(4, seed=53)
    factors = fit_factors(model, IntTokenizer(), examples, FitConfig(batch_size=4))
    spec = IndexSpec("svd", rank=2, query_rank=2, storage_dtype="float32")
    indexer = Indexer(model, IntTokenizer(), factors, spec, ScoreConfig())
    full = Indexer(model, IntTokenizer(), factors, IndexSpec("none", storage_dtype="float32"), ScoreConfig())
    low, exact = indexer.queries(queries), full.queries(queries)
    for name in indexer.modules:
        whitened = exact[name]["w"].double()
        approximate = (low[name]["u"] @ low[name]["v"].transpose(1, 2)).double()
        left, right = low_rank(whitened, 2)
        optimal = (whitened - left @ right.transpose(1, 2)).norm()
        assert float((whitened - approximate).norm()) <= 1.1 * float(optimal) + 1e-6, name
