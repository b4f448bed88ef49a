"""Lexical candidates: the training sequences that share the most (rare) tokens with a query, by
BM25 (bm25s, Lucene's variant: k1 = 1.5, b = 0.75, no (k1 + 1) factor) or TF-IDF cosine (tfidf.py), built once here
for every user: the pre-filter of recompute scoring (`--bm25 K`, `--tfidf K`), the BM25 baseline
of bench/lds, and the candidates an index query may merge with its own (`Bm25Index`, built once
per index on a worker and kept in its cache).

Both work on token ids (any tokenizer, the one the model reads): a query is its prompt ⊕ completion
tokens, a training sequence its tokens as scored. Candidates are the K best-scoring sequences of
each query, ties to the lower index, returned in ascending index order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data import TokenizedSequence
from .tfidf import tfidf_candidates

METHODS = ("bm25", "tfidf")


def _words(sequence: TokenizedSequence) -> list[str]:
    return [str(token) for token in sequence.input_ids.tolist()]


@dataclass
class Bm25Index:
    """BM25 over a fixed list of training sequences, built once (bm25s) and asked by any number of
    query batches: what a worker keeps per index for `--lexical` (query_svc/stages.py) instead of
    rebuilding it per job. `arrays` are the retriever's sparse score matrix as tensors (sharing its
    memory), so a cache that counts tensor bytes counts them."""

    retriever: object
    arrays: tuple[torch.Tensor, ...]
    num_training: int

    @classmethod
    def build(cls, training: Sequence[TokenizedSequence]) -> Bm25Index:
        import bm25s  # only the lexical paths need it

        retriever = bm25s.BM25()
        retriever.index([_words(sequence) for sequence in training], show_progress=False)
        arrays = tuple(torch.from_numpy(retriever.scores[name]) for name in ("data", "indices", "indptr"))
        return cls(retriever, arrays, len(training))

    def scores(self, queries: Sequence[TokenizedSequence]) -> torch.Tensor:
        """BM25 score of every training sequence for every query: float64 [Q, N] (0: no token shared)."""
        rows = [np.asarray(self.retriever.get_scores(_words(query)), dtype=np.float64) for query in queries]
        return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, self.num_training, dtype=torch.float64)

    def candidates(self, queries: Sequence[TokenizedSequence], k: int) -> list[list[int]]:
        """For each query, the positions of its k best training sequences, ascending (ties to the lower)."""
        k = min(k, self.num_training)
        order = torch.argsort(-self.scores(queries), dim=1, stable=True)[:, :k]
        return [sorted(row.tolist()) for row in order]


def bm25_scores(queries: Sequence[TokenizedSequence], training: Sequence[TokenizedSequence]) -> torch.Tensor:
    """BM25 score of every training sequence for every query: float64 [Q, N] (0: no token shared)."""
    return Bm25Index.build(training).scores(queries)


def lexical_candidates(
    method: str, queries: Sequence[TokenizedSequence], training: Sequence[TokenizedSequence], k: int
) -> list[list[int]]:
    """For each query, the positions (in `training`, ascending) of its k best sequences by `method`."""
    if method == "tfidf":
        return tfidf_candidates(queries, training, k)
    if method != "bm25":
        raise ValueError(f"lexical method must be one of {METHODS}, got {method!r}")
    return Bm25Index.build(training).candidates(queries, k)
