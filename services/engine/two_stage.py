"""Two-stage retrieval: candidates from cheap sources, then exact EK-FAC rescoring of their union.

    candidates = top_candidates(index_scores, k)                 # each query's k best by index score
    candidates = merged(candidates, top_candidates(index_scores, k, largest=False))  # --bottom-k: both ends
    candidates = merged(candidates, other)                       # another source's (e.g. lexical), per query
    result, n  = two_stage(scorer, prepared, index_scores, candidates, sequence_of)
    shares     = contributions({"index": ..., "lexical": ..., "union": candidates}, result.top)

The rescoring budget is a number of candidates per query (`--rescore`, RESCORE.default), not a
share of the corpus: its cost is the union's recompute (at most Q·k sequences), whatever N is.
`recall` measures a source: the share of a reference top-k (exact scores) inside its candidates;
`contributions` does so for each source against the final top-k (what each source brought to it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .score import PreparedQueries, Scorer, ScoreResult, TopEntry, mean_length, top_k_entries


def top_candidates(index_scores: torch.Tensor, k: int, largest: bool = True) -> list[list[int]]:
    """Each query's `k` best sequences by index score (index_scores [Q, N]), best first; with
    largest=False its `k` most negative, most negative first (the bottom-k's candidates)."""
    k = min(k, index_scores.shape[1])
    return [torch.topk(row, k, largest=largest).indices.tolist() if k else [] for row in index_scores]


def merged(*sources: Sequence[Sequence[int]]) -> list[list[int]]:
    """Per query, the union of the sources' candidates, each once, in the order first seen."""
    per_query = zip(*sources, strict=True)
    return [list(dict.fromkeys(index for source in lists for index in source)) for lists in per_query]


def recall(candidates: Sequence[Sequence[int]], truth: Sequence[Sequence[int]]) -> float:
    """The mean share of each query's `truth` (e.g. its exact top-10) inside its candidates."""
    shares = [
        len(set(found) & set(wanted)) / max(len(wanted), 1) for found, wanted in zip(candidates, truth, strict=True)
    ]
    return sum(shares) / max(len(shares), 1)


def contributions(sources: dict[str, Sequence[Sequence[int]]], top: Sequence[Sequence[TopEntry]]) -> dict[str, dict]:
    """What each candidate source (e.g. "index", "lexical" and their "union") holds of the final
    top-k: {name: {"candidates": its candidates over all queries, "in_top_k": the final top-k
    entries among them over all queries, "recall": the mean share of a query's final top-k inside
    its candidates}}. The final top-k comes from the union, so the union's recall is 1."""
    final = [[entry.index for entry in entries] for entries in top]
    return {
        name: {
            "candidates": sum(len(found) for found in candidates),
            "in_top_k": sum(len(set(found) & set(wanted)) for found, wanted in zip(candidates, final, strict=True)),
            "recall": recall(candidates, final),
        }
        for name, candidates in sources.items()
    }


def two_stage(
    scorer: Scorer,
    prepared: PreparedQueries,
    index_scores: torch.Tensor,
    candidates: Sequence[Sequence[int]],
    sequence_of,
    progress=None,
) -> tuple[ScoreResult, int]:
    """Rescore each query's candidates exactly (full EK-FAC, their sequences recomputed: the union
    over queries once) and rank its final top-k (and, with config.bottom_k, its bottom-k: give
    candidates from both ends of the index ranking then) among them; without candidates, the
    index's own ranking.

    index_scores: [Q, N]. Returns (a ScoreResult whose scores are the index scores with every
    rescored column exact, and whose top-k and bottom-k, with per-module and per-token breakdowns
    as configured, come from exact scores only; the number of sequences rescored). `prepared` is
    settled for the union (Scorer.settle: queries kept in the eigenbasis where that is cheaper)."""
    config = scorer.config
    union = sorted(set().union(*map(set, candidates)))
    if not union:  # no second stage: the index's own ranking
        result = ScoreResult(scores=index_scores.to(torch.float32), module_names=scorer.names)
        result.top = top_k_entries(index_scores, None, scorer.names, config.top_k)
        if config.bottom_k:
            result.bottom = top_k_entries(index_scores, None, scorer.names, config.bottom_k, largest=False)
        for entry in (entry for entries in result.ranked for entry in entries):
            entry.approximate = True  # an index score, not rescored exactly
        if config.per_token and config.top_k:
            scorer.attach_token_scores(prepared, result.ranked, sequence_of, progress)
        return result, 0
    sequences = [sequence_of(index) for index in union]
    prepared = scorer.settle(prepared, len(sequences), mean_length(sequences))
    exact = scorer.score(prepared, sequences, progress)  # [M, Q, U]
    column = {index: position for position, index in enumerate(union)}
    totals = exact.scores.sum(0)  # [Q, U]
    scores = index_scores.to(torch.float64).clone()
    scores[:, union] = totals

    def entries(query: int, chosen: Sequence[int], k: int, descending: bool) -> list[TopEntry]:
        """The query's k highest (descending) or lowest exact scores among its candidates `chosen`."""
        columns = torch.tensor([column[index] for index in chosen], dtype=torch.long)
        values = totals[query, columns]
        order = torch.argsort(values, descending=descending, stable=True)[:k]
        ranked = []
        for position in order.tolist():
            index, value = chosen[position], float(values[position])
            breakdown = None
            if config.per_module:
                breakdown = {name: float(exact.scores[m, query, column[index]]) for m, name in enumerate(scorer.names)}
            ranked.append(TopEntry(index=index, score=value, per_module=breakdown))
        return ranked

    top = [entries(query, chosen, config.top_k, True) for query, chosen in enumerate(candidates)]
    result = ScoreResult(scores=scores.to(torch.float32), module_names=scorer.names, top=top)
    if config.bottom_k:
        result.bottom = [entries(query, chosen, config.bottom_k, False) for query, chosen in enumerate(candidates)]
    if config.per_token and config.top_k:
        scorer.attach_token_scores(prepared, result.ranked, sequence_of, progress)
    return result, len(union)
