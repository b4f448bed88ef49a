"""--damping-check (engine/score.py): the same pass also ranks at 0.1x and 10x the damping, from the
same factors; the chosen damping's result is unchanged, each other damping's totals are the scores
that damping gives on its own, and each query's top-k overlap is computed from them, alike in the
in-memory chain and across shards, with and without a lexical filter. No servers."""

from __future__ import annotations

import pytest
import torch

from services.engine.fit import FitConfig, fit_factors
from services.engine.score import (
    DAMPING_CHECK_SCALES,
    ScoreConfig,
    Scorer,
    compute_scores,
    damping_overlap,
    joined,
    mean_length,
    merge,
    score_in_memory,
)
from tests.support.reference import IntTokenizer
from tests.support.tiny import random_examples, random_queries, tiny_model


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("gpt2")
    tokenizer = IntTokenizer()
    examples, queries = random_examples(17, seed=41), random_queries(3, seed=42)
    factors = fit_factors(model, tokenizer, examples, FitConfig(batch_size=4))
    return model, tokenizer, factors, examples, queries


def overlap_by_hand(a: torch.Tensor, b: torch.Tensor, k: int) -> list[float]:
    top_a = torch.argsort(a, dim=1, descending=True, stable=True)[:, :k]
    top_b = torch.argsort(b, dim=1, descending=True, stable=True)[:, :k]
    return [len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(top_a, top_b, strict=True)]


@pytest.mark.parametrize("lexical", [{}, {"bm25": 9}])
def test_the_check_scores_each_damping_as_it_would_alone_in_the_same_pass(setup, lexical):
    model, tokenizer, factors, examples, queries = setup
    base = {"batch_size": 4, "top_k": 5, "damping_factor": 0.1, **lexical}
    checked = compute_scores(model, tokenizer, factors, examples, queries, ScoreConfig(**base, damping_check=True))
    plain = compute_scores(model, tokenizer, factors, examples, queries, ScoreConfig(**base))
    assert plain.damping_overlap is None
    torch.testing.assert_close(checked.scores, plain.scores, rtol=1e-5, atol=1e-6 * float(plain.scores.abs().max()))
    assert [[e.index for e in top] for top in checked.top] == [[e.index for e in top] for top in plain.top]
    assert sorted(checked.damping_overlap) == [f"{scale:g}x" for scale in DAMPING_CHECK_SCALES] == ["0.1x", "10x"]
    scored = plain.scores != 0  # without a filter: every sequence; with one, its candidates (the rest is 0)
    for scale in DAMPING_CHECK_SCALES:
        config = ScoreConfig(**{**base, "damping_factor": 0.1 * scale})
        alone = compute_scores(model, tokenizer, factors, examples, queries, config)
        expected = overlap_by_hand(
            plain.scores.masked_fill(~scored, float("-inf")), alone.scores.masked_fill(~scored, float("-inf")), 5
        )
        assert checked.damping_overlap[f"{scale:g}x"] == pytest.approx(expected)
    assert all(0 <= value <= 1 for values in checked.damping_overlap.values() for value in values)


def test_the_check_across_shards_equals_the_in_memory_chain(setup):
    model, tokenizer, factors, examples, queries = setup
    config = ScoreConfig(batch_size=4, top_k=4, damping_check=True, per_token=True)
    scorer = Scorer(model, tokenizer, factors, config)
    sequences = scorer.tokenize_training(examples)
    whole = score_in_memory(scorer, queries, sequences)
    prepared = scorer.prepare(queries, mean_length(sequences))
    assert prepared.n_queries == 3 * len(queries)
    rows = [scorer.score(prepared, part) for part in (sequences[:6], sequences[6:])]
    assert all(r.scores.shape[1] == 3 * len(queries) and r.alternates is None for r in rows)  # every damping's
    partials = [joined([r], damping_check=True) for r in rows]  # the other dampings' totals split off
    assert all(p.scores.shape[1] == len(queries) and p.alternates.shape[:2] == (2, len(queries)) for p in partials)
    merged = merge(partials, scorer.names, config)
    assert merged.damping_overlap == whole.result.damping_overlap
    assert torch.equal(merged.scores, whole.result.scores)
    assert all(entry.token_scores for top in whole.result.top for entry in top)  # the chosen damping's rows


def test_overlap_of_identical_rankings_is_one_and_of_reversed_ones_zero():
    ranked = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert damping_overlap(ranked, torch.stack([ranked, -ranked]), None, 2) == {"0.1x": [1.0], "10x": [0.0]}
