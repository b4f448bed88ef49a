"""The index's compressions against exact EK-FAC scores (engine level, float64 models):
`none` is exact, `svd` at full rank and `eigen` at full dimension are exact, `random` is an
unbiased estimate; blocks are independent of batching."""

from __future__ import annotations

import pytest
import torch

from services.engine.fit import FitConfig, fit_factors
from services.engine.index import Indexer, IndexSpec
from services.engine.index_scan import score_index_shard
from services.engine.score import ScoreConfig, compute_scores
from tests.support.numerics import assert_close
from tests.support.reference import IntTokenizer
from tests.support.tiny import random_examples, random_queries, tiny_model


def index_scores(model, factors, examples, queries, spec: IndexSpec, batch_size: int = 4) -> torch.Tensor:
    tokenizer = IntTokenizer()
    indexer = Indexer(model, tokenizer, factors, spec, ScoreConfig(batch_size=batch_size))
    sequences = indexer.scorer.tokenize_training(examples)
    index_queries = indexer.queries(queries)
    shard = score_index_shard(index_queries, indexer.blocks(sequences, block_sequences=5))
    scores = torch.zeros(len(queries), len(examples), dtype=torch.float64)
    scores[:, shard.index] = shard.scores
    return scores.float()


@pytest.fixture(scope="module")
def fitted():
    model = tiny_model("gpt2")
    examples, queries = random_examples(17, seed=40), random_queries(3, seed=41)
    factors = {
        s: fit_factors(model, IntTokenizer(), examples, FitConfig(strategy=s))
        for s in ("ekfac", "kfac", "diagonal", "identity")
    }
    return model, examples, queries, factors


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal", "identity"])
@pytest.mark.parametrize(
    "spec",
    [
        IndexSpec("none", storage_dtype="float32"),
        IndexSpec("svd", rank=64, storage_dtype="float32", query_rank=None, energy=1.0),
        IndexSpec("svd", rank=64, storage_dtype="float32", query_rank=64, energy=1.0),
        IndexSpec("eigen", dim=64, storage_dtype="float32"),
    ],
    ids=["none", "svd-full-rank", "svd-full-rank-queries", "eigen-full"],
)
def test_uncompressed_indexes_score_exactly(fitted, strategy, spec):
    model, examples, queries, factors = fitted
    exact = compute_scores(model, IntTokenizer(), factors[strategy], examples, queries, ScoreConfig()).scores
    assert_close(
        index_scores(model, factors[strategy], examples, queries, spec), exact, 1e-5, f"{strategy} {spec.projection}"
    )


def test_compressed_indexes_approximate_and_random_projections_are_unbiased(fitted):
    model, examples, queries, factors = fitted
    exact = compute_scores(model, IntTokenizer(), factors["ekfac"], examples, queries, ScoreConfig()).scores
    low = index_scores(
        model, factors["ekfac"], examples, queries, IndexSpec("svd", rank=2, storage_dtype="float32", energy=1.0)
    )
    assert 1e-4 < float((low - exact).norm() / exact.norm()) < 0.9
    estimates = torch.stack(
        [
            index_scores(
                model,
                factors["ekfac"],
                examples,
                queries,
                IndexSpec("random", dim=4, seed=seed, storage_dtype="float32"),
            )
            for seed in range(40)
        ]
    )
    mean_error = float((estimates.mean(0) - exact).norm() / exact.norm())
    single_error = float((estimates[0] - exact).norm() / exact.norm())
    assert mean_error < single_error / 3, (mean_error, single_error)


def test_blocks_do_not_depend_on_batching(fitted):
    model, examples, queries, factors = fitted
    spec = IndexSpec("svd", rank=3, storage_dtype="bfloat16", energy=1.0)
    one = index_scores(model, factors["ekfac"], examples, queries, spec, batch_size=1)
    many = index_scores(model, factors["ekfac"], examples, queries, spec, batch_size=8)
    assert_close(many, one, 1e-2, "bfloat16 blocks, batch 1 vs 8")  # bfloat16 storage: 8-bit mantissa
