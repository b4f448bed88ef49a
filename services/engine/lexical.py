"""Lexical candidates: the training sequences that share the most (rare) tokens with a query, by
BM25 (bm25s, Lucene's variant: k1 = 1.5, b = 0.75, no (k1 + 1) factor) or TF-IDF cosine (tfidf.py), built once here
for every user: the pre-filter of recompute scoring (`--bm25 K`, `--tfidf K`), the BM25 baseline
of bench/lds, and the candidates an index query may merge with its own.

Both work on token ids (any tokenizer, the one the model reads): a query is its prompt ⊕ completion
tokens, a training sequence its tokens as scored. Candidates are the K best-scoring sequences of
each query, ties to the lower index, returned in ascending index order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .data import TokenizedSequence
from .tfidf import tfidf_candidates

METHODS = ("bm25", "tfidf")


def _words(sequence: TokenizedSequence) -> list[str]:
    return [str(token) for token in sequence.input_ids.tolist()]


def bm25_scores(queries: Sequence[TokenizedSequence], training: Sequence[TokenizedSequence]) -> torch.Tensor:
    """BM25 score of every training sequence for every query: float64 [Q, N] (0: no token shared)."""
    import bm25s  # only the lexical paths need it

    retriever = bm25s.BM25()
    retriever.index([_words(sequence) for sequence in training], show_progress=False)
    rows = [np.asarray(retriever.get_scores(_words(query)), dtype=np.float64) for query in queries]
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, len(training), dtype=torch.float64)


def lexical_candidates(
    method: str, queries: Sequence[TokenizedSequence], training: Sequence[TokenizedSequence], k: int
) -> list[list[int]]:
    """For each query, the positions (in `training`, ascending) of its k best sequences by `method`."""
    if method == "tfidf":
        return tfidf_candidates(queries, training, k)
    if method != "bm25":
        raise ValueError(f"lexical method must be one of {METHODS}, got {method!r}")
    k = min(k, len(training))
    order = torch.argsort(-bm25_scores(queries, training), dim=1, stable=True)[:, :k]
    return [sorted(row.tolist()) for row in order]
