"""Scoring kernels: ⟨P_q, DW_b⟩ for every query q and training sequence b of a batch, per module.

Two exact ways to take the inner product with DW_b = Σ_n s_n a_nᵀ (s: [B, N, d_out], a: [B, N, d_in]):
    materialise:  DW = sᵀ a per sequence, then one matmul with all P's.
                  cost ≈ B·d_out·d_in·(N + Q) multiply-adds
    contract:     with P_q ≈ U_q V_qᵀ (rank r):  Σ_n (s_n U_q)·(a_n V_q)
                  cost ≈ B·N·Q·r·(d_out + d_in)
The plan picks the cheaper per module from the expected token count. A full-rank query uses
`materialise` (contracting a full-rank P costs Q·N·d_out·d_in, never cheaper for Q > 1).

Per-token attribution of sequence b to query q at position n: s_nᵀ P_q a_n; these sum over n
to the sequence's score exactly. A shared module contributes at every call; token scores are
summed over calls.

A full-rank P may also be kept in the factors' eigenbasis, P̃ = Q_Sᵀ P Q_A (`eigenbasis`): then
each training sequence's gradient is rotated instead (⟨P, DW⟩ = ⟨P̃, Q_Sᵀ DW Q_A⟩, rotated in the
cheapest order, rotation.py), which is cheaper than rotating Q queries back when few sequences
are scored (two-stage rescoring: `Scorer.settle` decides per module).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .capture import ModuleCapture
from .rotation import rotated_per_sequence_gradients


@dataclass
class ModuleQueries:
    """The preconditioned queries of one module, in the representation its kernel needs.

    full:  [Q, d_out·d_in] flattened P (materialise kernel), or None
    left:  [d_out, Q·r] U of all queries side by side (contract kernel), or None
    right: [d_in, Q·r]  V likewise
    eigenbasis: `full` holds P̃ = Q_Sᵀ P Q_A (the training side is rotated to meet it)
    """

    n_queries: int
    rank: int | None
    full: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    eigenbasis: bool = False

    @property
    def kernel(self) -> str:
        return "materialise" if self.full is not None else "contract"

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat tensors for storage under `prefix/...` (rank -1 means full rank)."""
        tensors = {f"{prefix}/shape": torch.tensor([self.n_queries, self.rank or -1, int(self.eigenbasis)])}
        for field in ("full", "left", "right"):
            value = getattr(self, field)
            if value is not None:
                tensors[f"{prefix}/{field}"] = value.contiguous()
        return tensors

    @classmethod
    def from_tensors(cls, prefix: str, tensors: dict[str, torch.Tensor]) -> ModuleQueries:
        n_queries, rank, eigenbasis = tensors[f"{prefix}/shape"].tolist()
        return cls(
            int(n_queries),
            None if rank < 0 else int(rank),
            full=tensors.get(f"{prefix}/full"),
            left=tensors.get(f"{prefix}/left"),
            right=tensors.get(f"{prefix}/right"),
            eigenbasis=bool(eigenbasis),
        )


def materialise_cost(batch: int, tokens: int, d_out: int, d_in: int, n_queries: int) -> float:
    return batch * d_out * d_in * (tokens + n_queries)


def contract_cost(batch: int, tokens: int, d_out: int, d_in: int, n_queries: int, rank: int) -> float:
    return batch * tokens * n_queries * rank * (d_out + d_in)


def plan_module_queries(
    preconditioned: torch.Tensor,
    low_rank_factors: tuple[torch.Tensor, torch.Tensor] | None,
    expected_tokens: float,
    dtype: torch.dtype,
) -> ModuleQueries:
    """Choose the kernel and keep only the representation it needs.

    preconditioned: [Q, d_out, d_in] full P (used when no low-rank factors are given, or when
    materialising is cheaper; then P is rebuilt as U Vᵀ so both kernels score the same P).
    """
    n_queries, d_out, d_in = preconditioned.shape
    if low_rank_factors is None:
        return ModuleQueries(n_queries, None, full=preconditioned.reshape(n_queries, -1).to(dtype))
    left, right = low_rank_factors  # [Q, d_out, r], [Q, d_in, r]
    rank = left.shape[-1]
    tokens = max(1.0, expected_tokens)
    if contract_cost(1, tokens, d_out, d_in, n_queries, rank) < materialise_cost(1, tokens, d_out, d_in, n_queries):
        return ModuleQueries(
            n_queries,
            rank,
            left=left.permute(1, 0, 2).reshape(d_out, n_queries * rank).to(dtype).contiguous(),
            right=right.permute(1, 0, 2).reshape(d_in, n_queries * rank).to(dtype).contiguous(),
        )
    rebuilt = left @ right.transpose(-1, -2)
    return ModuleQueries(n_queries, rank, full=rebuilt.reshape(n_queries, -1).to(dtype))


def module_scores(
    capture: ModuleCapture, queries: ModuleQueries, basis: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """Scores of every query against every sequence of the batch for one module: [Q, B].
    `basis` (Q_S, Q_A) on the capture's device: needed when the queries are in the eigenbasis."""
    batch = capture.a.shape[0]
    if queries.full is not None:
        if queries.eigenbasis:
            gradients = rotated_per_sequence_gradients(capture, *basis).reshape(batch, -1)  # [B, d_out·d_in]
        else:
            gradients = capture.per_sequence_gradients().reshape(batch, -1)
        return queries.full @ gradients.T
    rank = queries.rank
    projected_s = capture.s @ queries.left  # [B, N, Q·r]
    projected_a = capture.a @ queries.right  # [B, N, Q·r]
    products = (projected_s * projected_a).sum(1)  # [B, Q·r]
    return products.reshape(batch, queries.n_queries, rank).sum(-1).T


def module_token_scores(
    capture: ModuleCapture,
    row: int,
    queries: ModuleQueries,
    query: int,
    basis: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """s_nᵀ P_q a_n for every position n of sequence `row`, summed over calls: [T]. `basis` as
    for `module_scores` (a query in the eigenbasis meets the rotated tokens s_n Q_S, a_n Q_A)."""
    s, a = capture.s[row], capture.a[row]  # [N, d_out], [N, d_in]
    if queries.full is not None and queries.eigenbasis:
        s, a = s @ basis[0], a @ basis[1]
    if queries.full is not None:
        d_out, d_in = s.shape[-1], a.shape[-1]
        preconditioned = queries.full[query].reshape(d_out, d_in)
        per_position = ((s @ preconditioned) * a).sum(-1)
    else:
        columns = slice(query * queries.rank, (query + 1) * queries.rank)
        per_position = ((s @ queries.left[:, columns]) * (a @ queries.right[:, columns])).sum(-1)
    return per_position.reshape(capture.calls, -1).sum(0)
