"""TF-IDF over token ids: the paper's cheap first stage, which scores only the training sequences
that share the most (rare) tokens with a query.

    weight(t, m) = tf(t, m) · idf(t),   tf = count of token t in sequence m,
                   idf(t) = log((1 + N) / (1 + df(t))) + 1   (N sequences, df = sequences holding t)
Each sequence and each query (prompt and completion) is a TF-IDF vector, L2-normalised; the
candidates of a query are the K sequences of highest cosine similarity (ties to the lower index).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .data import TokenizedSequence


def _sparse(indices: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """A coalesced sparse COO matrix (the indices are built here, in range by construction)."""
    return torch.sparse_coo_tensor(indices, values, shape, check_invariants=False).coalesce()


def _counts(sequences: Sequence[TokenizedSequence], vocabulary: int) -> torch.Tensor:
    """Sparse [len(sequences), vocabulary] token counts."""
    rows = torch.cat([torch.full((s.length,), row, dtype=torch.long) for row, s in enumerate(sequences)])
    columns = torch.cat([s.input_ids.long() for s in sequences])
    return _sparse(torch.stack([rows, columns]), torch.ones(rows.numel()), (len(sequences), vocabulary))


def _normalised(weights: torch.Tensor) -> torch.Tensor:
    """Rows of a sparse matrix scaled to unit L2 norm (all-zero rows stay zero)."""
    weights = weights.coalesce()
    norms = torch.zeros(weights.shape[0]).index_add_(0, weights.indices()[0], weights.values().square()).sqrt()
    values = weights.values() / norms[weights.indices()[0]].clamp_min(1e-12)
    return _sparse(weights.indices(), values, weights.shape)


def tfidf_candidates(
    queries: Sequence[TokenizedSequence], training: Sequence[TokenizedSequence], k: int
) -> list[list[int]]:
    """For each query, the positions (in `training`) of its k nearest sequences by TF-IDF cosine."""
    vocabulary = 1 + max(int(s.input_ids.max()) for s in [*training, *queries] if s.length)
    train_counts = _counts(training, vocabulary)
    present = _sparse(train_counts.indices(), torch.ones_like(train_counts.values()), train_counts.shape)
    document_frequency = torch.sparse.sum(present, 0).to_dense()  # [V]
    idf = torch.log((1 + len(training)) / (1 + document_frequency)) + 1

    def weighted(counts: torch.Tensor) -> torch.Tensor:
        return _normalised(_sparse(counts.indices(), counts.values() * idf[counts.indices()[1]], counts.shape))

    train = weighted(train_counts)
    query = weighted(_counts(queries, vocabulary)).to_dense()  # [Q, V]
    similarity = torch.sparse.mm(train, query.T).T  # [Q, N]
    k = min(k, len(training))
    order = torch.argsort(-similarity, dim=1, stable=True)[:, :k]
    return [sorted(row.tolist()) for row in order]
