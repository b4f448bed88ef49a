"""Lexical candidates (engine/lexical.py): BM25 scores against the formula by hand, candidates'
order and ties, and the pre-filter's choice of method. No servers."""

import math

import pytest
import torch

from services.engine.data import TokenizedSequence
from services.engine.lexical import bm25_scores, lexical_candidates
from services.engine.score import ScoreConfig
from services.errors import InputError


def sequences(*rows):
    return [
        TokenizedSequence(i, torch.tensor(row, dtype=torch.long), torch.ones(len(row), dtype=torch.bool))
        for i, row in enumerate(rows)
    ]


def bm25_by_hand(query, documents, k1=1.5, b=0.75):
    """Lucene's BM25 (no (k1 + 1) factor): idf = ln(1 + (N - df + 0.5) / (df + 0.5)), tf saturating with length."""
    average = sum(len(d) for d in documents) / len(documents)
    out = []
    for document in documents:
        score = 0.0
        for token in set(query):
            df = sum(token in d for d in documents)
            tf = document.count(token)
            if tf:
                idf = math.log(1 + (len(documents) - df + 0.5) / (df + 0.5))
                score += idf * tf / (tf + k1 * (1 - b + b * len(document) / average))
        out.append(score)
    return out


def test_bm25_scores_are_lucenes_formula():
    documents = [[5, 6, 7], [6, 6, 9, 10], [11, 12], [5, 9, 9, 9, 13]]
    queries = [[6, 9], [5, 99], [42]]
    scores = bm25_scores(sequences(*queries), sequences(*documents))
    assert scores.shape == (3, 4) and scores.dtype == torch.float64
    for row, query in zip(scores, queries, strict=True):
        assert row.tolist() == pytest.approx(bm25_by_hand(query, documents), rel=1e-5)
    assert (scores[2] == 0).all()  # shares no token


def test_candidates_are_the_best_k_in_index_order_ties_to_the_lower_index():
    documents = sequences([1, 2], [3, 4], [1, 2], [1, 5], [7, 8])
    query = sequences([1, 2])
    assert lexical_candidates("bm25", query, documents, 2) == [[0, 2]]  # two equal best: both
    assert lexical_candidates("bm25", query, documents, 3) == [[0, 2, 3]]
    assert lexical_candidates("bm25", sequences([42]), documents, 2) == [[0, 1]]  # all tie at 0
    assert lexical_candidates("bm25", query, documents, 99) == [[0, 1, 2, 3, 4]]
    assert lexical_candidates("tfidf", query, documents, 2) == [[0, 2]]
    with pytest.raises(ValueError, match="lexical method"):
        lexical_candidates("grep", query, documents, 2)


def test_the_pre_filter_is_one_method_at_a_time():
    assert ScoreConfig().lexical is None
    assert ScoreConfig(bm25=7).lexical == ("bm25", 7)
    assert ScoreConfig(tfidf=5).lexical == ("tfidf", 5)
    with pytest.raises(InputError, match="--bm25 or --tfidf, not both"):
        ScoreConfig(bm25=3, tfidf=3).validate()
    with pytest.raises(InputError, match="--bm25 must be >= 0"):
        ScoreConfig(bm25=-1).validate()
