"""Scoring index blocks: a query batch in index space against a stream of blocks, no model.

    score_index_shards(batches, blocks[, cascade]) -> [ShardScores | CancelledError]  the one block loop
    score_index_shard(queries, blocks[, cascade])  -> ShardScores([Q, n] float64, index [n])   one batch of it
    score_block(queries, block)                    -> [Q, n] float32     one block, every pair
    cascade_block(queries, block, cascade)         -> [Q, n] float32     one block, coarse scan then rescan
    module_index_scores(queries, part)             -> [Q, n]             one module of one block

A block is what engine/index.py's Indexer.blocks makes (its docstring: the layout by format), as
read from the store or held in memory; the index-space queries are Indexer.queries'. A worker of
the index_score stage, a bench or a test all score through `score_index_shard`, or, for several
query batches at once (a worker's coalesced requests), `score_index_shards`: each block is read
once for all of them, each batch scored against it exactly as alone.

**The cascade** (svd blocks and low-rank queries; `Cascade`). Per sequence, a full scan costs
2·Q·R_q·R̄·Σ_modules(d_out + d_in) (R̄ the pairs a sequence keeps per module). The coarse stage
scores every sequence with the first `pairs` factor pairs it keeps in each module (its largest
whitened singular directions: pairs are stored by descending σ) against each query's leading
`query_rank` factors: `pairs·query_rank / (R̄·R_q)` of the full cost. Each query's best `keep`
share of the block (at least `minimum` sequences, and its most negative as many when `bottom`)
by coarse score is rescanned at full index quality, that query alone against those sequences'
every pair. A block's scores are then the full index score of each query's rescanned sequences
and the coarse score of the rest (below that query's rescan cut in the block). Keeping every
sequence is the full scan itself (the same arithmetic).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..errors import CancelledError, InputError
from .progress import Progress
from .quantize import loaded
from .score import ShardScores


@dataclass(frozen=True)
class Cascade:
    """A coarse scan of every sequence, then each query's best rescanned (the module docstring)."""

    pairs: int = 4  # coarse: the first this many factor pairs of each sequence in each module (BENCHMARKS)
    query_rank: int = 4  # coarse: each query's leading this many factors
    keep: float = 0.03  # rescanned per query: this share of each block's sequences
    minimum: int = 100  # ... and at least this many of them (all of a smaller block)
    bottom: bool = False  # also each query's most negative as many (a --bottom-k job)

    def validate(self) -> None:
        if self.pairs < 1 or self.query_rank < 1 or self.minimum < 0 or not 0 <= self.keep <= 1:
            raise InputError(f"a cascade needs pairs, query rank >= 1, minimum >= 0 and keep in [0, 1]: {self}")

    def kept(self, sequences: int) -> int:
        """How many of a block's `sequences` each query rescans (from each end)."""
        return min(sequences, max(self.minimum, math.ceil(self.keep * sequences)))


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


def _pair_rows(count: torch.Tensor, sequences: torch.Tensor, pairs: int | None = None) -> torch.Tensor:
    """The rows (pairs) of a module part that belong to `sequences` [s] (positions in the block),
    in their order, the first `pairs` of each (None: all): [K'] int64."""
    count = count.long()
    starts = count.cumsum(0) - count  # [n]
    taken = count[sequences] if pairs is None else count[sequences].clamp(max=pairs)  # [s]
    first = torch.repeat_interleave(starts[sequences], taken)  # [K']: each row's sequence start
    offsets = torch.arange(int(taken.sum()), device=count.device) - torch.repeat_interleave(
        taken.cumsum(0) - taken, taken
    )
    return first + offsets


def sub_part(
    part: dict[str, torch.Tensor], sequences: torch.Tensor, pairs: int | None = None
) -> dict[str, torch.Tensor]:
    """An svd module part of only `sequences` [s] (positions in the block, in that order), each with
    its first `pairs` pairs (None: all): the rows gathered in their stored dtype (with their scales)."""
    rows = _pair_rows(part["count"], sequences, pairs)
    count = part["count"][sequences].long()
    sub = {"count": count if pairs is None else count.clamp(max=pairs)}
    for key, value in part.items():
        if key != "count":
            sub[key] = value[rows]
    return sub


def cascade_block(
    queries: dict[str, dict[str, torch.Tensor]], block: dict[str, torch.Tensor], cascade: Cascade
) -> torch.Tensor:
    """[Q, n] index scores of a block through the cascade (the module docstring): every sequence
    coarse, each query's kept ones (by coarse score) at full index quality. Blocks or queries the
    cascade does not apply to (dense parts, full-rank queries) are scanned in full."""
    n = block["index"].numel()
    kept = cascade.kept(n)
    parts = {name: module_part(block, name) for name in queries}
    low_rank = all("u" in module and "count" in parts[name] for name, module in queries.items())
    if kept * (2 if cascade.bottom else 1) >= n or not low_rank:
        return score_block(queries, block)
    everyone = torch.arange(n, device=block["index"].device)
    coarse = None
    for name, module in queries.items():
        leading = {key: value[..., : cascade.query_rank] for key, value in module.items()}  # u [Q, d_out, r_q], v
        scores = module_index_scores(leading, sub_part(parts[name], everyone, cascade.pairs))
        coarse = scores if coarse is None else coarse + scores
    chosen = torch.topk(coarse, kept, dim=1).indices  # [Q, kept]
    if cascade.bottom:
        chosen = torch.cat([chosen, torch.topk(coarse, kept, dim=1, largest=False).indices], 1)
    full = torch.zeros(chosen.shape, dtype=coarse.dtype, device=coarse.device)  # [Q, kept (x2)]
    for name, module in queries.items():
        for query in range(chosen.shape[0]):
            one = {key: value[query : query + 1] for key, value in module.items()}
            full[query] += module_index_scores(one, sub_part(parts[name], chosen[query]))[0]
    return coarse.scatter(1, chosen, full)


def score_index_shards(
    batches: Sequence[tuple[dict[str, dict[str, torch.Tensor]], Progress | None]],
    blocks: Iterable[dict[str, torch.Tensor]],
    cascade: Cascade | None = None,
) -> list[ShardScores | CancelledError]:
    """Index scores of several query batches (each with its progress, or None) over one stream of
    blocks (one at a time in memory, read once for all): per batch, float64 [Q_b, n] with the
    sequences' global indices [n], in the blocks' order, each equal bit for bit to the batch scored
    alone; or CancelledError for a batch whose progress said so between two blocks (its queries are
    dropped from the blocks after). Each live batch's progress advances by one per block. Every
    pair is scanned, or through `cascade` (cascade_block)."""
    if cascade is not None:
        cascade.validate()
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
            block_scores = score_block(queries, block) if cascade is None else cascade_block(queries, block, cascade)
            scores[member].append(block_scores.to(torch.float64))
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
    cascade: Cascade | None = None,
) -> ShardScores:
    """Index scores of a stream of blocks (one at a time in memory): float64 [Q, n] with the
    sequences' global indices [n], in the blocks' order; every pair scanned, or through `cascade`
    (cascade_block). `progress` is checked for cancellation (CancelledError) and advanced by one
    per block."""
    (outcome,) = score_index_shards([(queries, progress)], blocks, cascade)
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
