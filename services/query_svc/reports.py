"""The JSON reports written next to scores (results.json), shared by the CLI and the services."""

from __future__ import annotations

from collections.abc import Sequence

from ..engine.records import Query
from ..engine.score import TopEntry

SIGN = "positive = up-weighting the training sequence makes the completion more likely"


def pairwise_report(
    queries: Sequence[Query],
    top: list[list[TopEntry]],
    record_of,
    *,
    strategy: str,
    damping: str,
    query_rank: int | None,
    modules: list[str],
) -> dict:
    """results.json of a pairwise run; `record_of(index)` gives a training sequence's (id, text)."""
    return {
        "kind": "pairwise",
        "sign": SIGN,
        "strategy": strategy,
        "damping": damping,
        "query_rank": query_rank,
        "modules": modules,
        "queries": [
            {
                "id": query.id,
                "prompt": query.prompt,
                "completion": query.completion,
                "top": [_top_entry(rank, entry, record_of) for rank, entry in enumerate(top[position], start=1)],
            }
            for position, query in enumerate(queries)
        ],
    }


def self_report(scores, record_of, *, strategy: str, damping: str, top_k: int) -> dict:
    """results.json of a self-influence run. scores: [n_train]."""
    order = scores.argsort(descending=True)[:top_k].tolist()
    return {
        "kind": "self",
        "strategy": strategy,
        "damping": damping,
        "top": [
            {"rank": rank, "id": record_of(i)[0], "score": float(scores[i]), "text": record_of(i)[1]}
            for rank, i in enumerate(order, start=1)
        ],
    }


def _top_entry(rank: int, entry: TopEntry, record_of) -> dict:
    example_id, text = record_of(entry.index)
    record = {"rank": rank, "id": example_id, "score": entry.score, "text": text}
    if entry.per_module is not None:
        record["per_module"] = entry.per_module
    if entry.token_scores is not None:
        record["tokens"] = [{"token": t, "score": s} for t, s in zip(entry.tokens, entry.token_scores, strict=True)]
    return record
