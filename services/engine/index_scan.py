"""Scoring index blocks: a query batch in index space against a stream of blocks, no model.

    score_index_shards(batches, blocks) -> [ShardScores | CancelledError]          the one block loop
    score_index_shard(queries, blocks)  -> ShardScores([Q, n] float64, index [n])   one batch of it
    score_block(queries, block)         -> [Q, n] float32                            one block
    module_index_scores(queries, part)  -> [Q, n]                                    one module of one block

A block is what engine/index.py's Indexer.blocks makes (its docstring: the layout by format), as
read from the store or held in memory; the index-space queries are Indexer.queries'. A worker of
the index_score stage, a bench or a test all score through `score_index_shard`, or, for several
query batches at once (a worker's coalesced requests), `score_index_shards`: each block is read
once for all of them, each batch scored against it exactly as alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..errors import CancelledError, InputError
from .progress import Progress
from .quantize import loaded
from .score import ShardScores


def module_part(block: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Module `name`'s tensors of a block, keyed without the "{name}/" prefix; a format-1 svd block
    (u [n, d_out, R], v [n, d_in, R]) read as format 2's R pairs per sequence."""
    part = _prefixed(block, name)
    if "u" in part and part["u"].dim() == 3:
        n, _, rank = part["u"].shape
        part = {
            "u": part["u"].transpose(1, 2).reshape(n * rank, -1),
            "v": part["v"].transpose(1, 2).reshape(n * rank, -1),
            "count": torch.full((n,), rank, dtype=torch.int32),
        }
    return part


def module_index_scores(queries: dict[str, torch.Tensor], part: dict[str, torch.Tensor]) -> torch.Tensor:
    """Index scores of every query against every sequence of one module's block part: [Q, n]
    float32. Queries as ModuleIndexer.queries makes them; the part as `module_part` reads it."""
    if "w" in part:  # none, eigen, random: plain inner products of [a, b] matrices
        if "w" not in queries:
            raise InputError("index blocks and queries disagree")
        w = loaded(part, "w")
        return queries["w"].reshape(queries["w"].shape[0], -1) @ w.reshape(w.shape[0], -1).T
    u, v, count = loaded(part, "u"), loaded(part, "v"), part["count"].long()  # [K, d_out], [K, d_in], [n]
    if "u" in queries:  # ⟨U_q V_qᵀ, Σ_k u_k v_kᵀ⟩ = Σ_k (U_qᵀ u_k) · (V_qᵀ v_k)
        n_queries, d_out, query_rank = queries["u"].shape
        left = queries["u"].transpose(1, 2).reshape(-1, d_out) @ u.T  # [Q·R_q, K]
        right = queries["v"].transpose(1, 2).reshape(n_queries * query_rank, -1) @ v.T
        pairs = (left * right).reshape(n_queries, query_rank, -1).sum(1)  # [Q, K]
    else:  # full-rank queries W_q [Q, d_out, d_in]: Σ_k u_kᵀ W_q v_k
        pairs = ((queries["w"] @ v.T) * u.T).sum(1)
    ends = count.cumsum(0)  # [n]: pair k belongs to the first sequence whose end exceeds k
    owner = torch.searchsorted(ends, torch.arange(pairs.shape[1], device=ends.device), right=True)  # [K]
    scores = pairs.new_zeros(pairs.shape[0], count.numel())
    return scores.index_add_(1, owner.to(pairs.device), pairs)


def score_block(queries: dict[str, dict[str, torch.Tensor]], block: dict[str, torch.Tensor]) -> torch.Tensor:
    """[Q, n] index scores of a block: the sum over modules."""
    total = None
    for name, module_queries in queries.items():
        scores = module_index_scores(module_queries, module_part(block, name))
        total = scores if total is None else total + scores
    return total


def score_index_shards(
    batches: Sequence[tuple[dict[str, dict[str, torch.Tensor]], Progress | None]],
    blocks: Iterable[dict[str, torch.Tensor]],
) -> list[ShardScores | CancelledError]:
    """Index scores of several query batches (each with its progress, or None) over one stream of
    blocks (one at a time in memory, read once for all): per batch, float64 [Q_b, n] with the
    sequences' global indices [n], in the blocks' order, each equal bit for bit to the batch scored
    alone; or CancelledError for a batch whose progress said so between two blocks (its queries are
    dropped from the blocks after). Each live batch's progress advances by one per block."""
    scores: list[list[torch.Tensor]] = [[] for _ in batches]
    outcomes: list[ShardScores | CancelledError | None] = [None] * len(batches)
    indices = []
    for block in blocks:
        for member, (_, progress) in enumerate(batches):
            if outcomes[member] is None and progress is not None and progress.cancelled():
                outcomes[member] = CancelledError("cancelled")
        live = [member for member, outcome in enumerate(outcomes) if outcome is None]
        if not live:
            break
        for member in live:
            queries, progress = batches[member]
            scores[member].append(score_block(queries, block).to(torch.float64))
            if progress is not None:
                progress.advance(1, 0)
        indices.append(block["index"])
    if all(outcome is not None for outcome in outcomes):  # every batch cancelled
        return outcomes
    if not indices:
        raise InputError("no index blocks to score")
    return [
        outcome if outcome is not None else ShardScores(torch.cat(scores[member], dim=-1), torch.cat(indices))
        for member, outcome in enumerate(outcomes)
    ]


def score_index_shard(
    queries: dict[str, dict[str, torch.Tensor]],
    blocks: Iterable[dict[str, torch.Tensor]],
    progress: Progress | None = None,
) -> ShardScores:
    """Index scores of a stream of blocks (one at a time in memory): float64 [Q, n] with the
    sequences' global indices [n], in the blocks' order. `progress` is checked for cancellation
    (CancelledError) and advanced by one per block."""
    (outcome,) = score_index_shards([(queries, progress)], blocks)
    if isinstance(outcome, CancelledError):
        raise outcome
    return outcome


def queries_to_tensors(queries: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Flat tensors "{module}/{key}" for storage (index-space queries)."""
    return {f"{name}/{key}": value.contiguous() for name, parts in queries.items() for key, value in parts.items()}


def queries_from_tensors(tensors: dict[str, torch.Tensor], modules) -> dict[str, dict[str, torch.Tensor]]:
    return {name: _prefixed(tensors, name) for name in modules}


def _prefixed(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    prefix = name + "/"
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
