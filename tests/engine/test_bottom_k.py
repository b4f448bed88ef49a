"""--bottom-k: each query's most negative training sequences, by exact scores, in recompute scoring
and after an index's two stages (candidates from both ends of the index ranking, rescored exactly)."""

from __future__ import annotations

import pytest
import torch

from services.engine.fit import FitConfig, fit_factors
from services.engine.index import Indexer, IndexSpec
from services.engine.index_scan import score_index_shard
from services.engine.score import ScoreConfig, compute_scores
from services.engine.two_stage import merged, top_candidates, two_stage
from tests.support.reference import IntTokenizer
from tests.support.tiny import random_examples, random_queries, tiny_model

N, BOTTOM = 24, 4


@pytest.fixture(scope="module")
def fitted():
    model = tiny_model("gpt2", d_model=16)
    examples, queries = random_examples(N, seed=70), random_queries(3, seed=71)
    factors = fit_factors(model, IntTokenizer(), examples, FitConfig(batch_size=8))
    return model, examples, queries, factors


def lowest(scores: torch.Tensor, k: int) -> list[list[int]]:
    """Each row's k lowest columns, lowest first: scores [Q, N]."""
    return [row.argsort(stable=True)[:k].tolist() for row in scores]


def test_bottom_k_is_the_argsort_of_exact_scores(fitted):
    model, examples, queries, factors = fitted
    config = ScoreConfig(batch_size=8, top_k=3, bottom_k=BOTTOM, per_module=True, per_token=True)
    result = compute_scores(model, IntTokenizer(), factors, examples, queries, config)
    assert [[entry.index for entry in entries] for entries in result.bottom] == lowest(result.scores, BOTTOM)
    for query, entries in enumerate(result.bottom):
        assert [entry.score for entry in entries] == pytest.approx(result.scores[query, [e.index for e in entries]])
        assert all(entry.score < 0 for entry in entries[:1])  # the most negative is negative on random data
        assert all(entry.per_module and entry.token_scores and not entry.approximate for entry in entries)
    off = compute_scores(model, IntTokenizer(), factors, examples, queries, ScoreConfig(batch_size=8, top_k=3))
    assert off.bottom == [] and [[e.index for e in q] for q in off.top] == [[e.index for e in q] for q in result.top]


def test_bottom_k_never_ranks_a_sequence_the_lexical_filter_left_out(fitted):
    model, examples, queries, factors = fitted
    config = ScoreConfig(batch_size=8, top_k=2, bottom_k=N, bm25=5)
    result = compute_scores(model, IntTokenizer(), factors, examples, queries, config)
    for entries in result.bottom:
        assert 0 < len(entries) <= 5 and all(entry.score != 0 for entry in entries)


@pytest.mark.slow
def test_the_index_bottom_k_comes_from_both_ends_and_is_rescored_exactly(fitted):
    model, examples, queries, factors = fitted
    config = ScoreConfig(batch_size=4, top_k=2, bottom_k=BOTTOM)
    indexer = Indexer(model, IntTokenizer(), factors, IndexSpec("svd", rank=2, energy=0.8), config)
    sequences = indexer.scorer.tokenize_training(examples)
    shard = score_index_shard(indexer.queries(queries), list(indexer.blocks(sequences, block_sequences=8)))
    index_scores = torch.zeros(len(queries), N, dtype=torch.float64)
    index_scores[:, shard.index] = shard.scores
    exact = compute_scores(model, IntTokenizer(), factors, examples, queries, ScoreConfig(batch_size=4)).scores
    _, prepared = indexer.query_side(queries, 8.0)

    everything = top_candidates(index_scores, N)  # every sequence rescored: the exact bottom-k
    result, _ = two_stage(indexer.scorer, prepared, index_scores, everything, sequences.__getitem__)
    assert [[entry.index for entry in entries] for entries in result.bottom] == lowest(exact, BOTTOM)

    ends = merged(top_candidates(index_scores, 5), top_candidates(index_scores, 5, largest=False))
    assert all(set(lowest(index_scores, 5)[query]) <= set(chosen) for query, chosen in enumerate(ends))
    result, rescored = two_stage(indexer.scorer, prepared, index_scores, ends, sequences.__getitem__)
    assert rescored <= N
    for query, chosen in enumerate(ends):
        in_chosen = sorted(chosen, key=lambda index: float(exact[query, index]))[:BOTTOM]
        assert [entry.index for entry in result.bottom[query]] == in_chosen
        scores = [entry.score for entry in result.bottom[query]]
        assert scores == pytest.approx(exact[query, in_chosen].tolist(), rel=1e-4)

    result, rescored = two_stage(indexer.scorer, prepared, index_scores, [[] for _ in queries], sequences.__getitem__)
    assert rescored == 0 and [[e.index for e in q] for q in result.bottom] == lowest(index_scores, BOTTOM)
    assert all(entry.approximate for entries in result.bottom for entry in entries)
