"""The JSON reports written next to scores (results.json), shared by the CLI and the services.

results.json's schema (SCHEMA_VERSION; a result without "schema_version" is version 1):
    kind, sign, strategy, damping, query_rank, modules
    queries[]: id, prompt, completion, group?, tokens? (--per-token: the query's tokens, each with the
               log-probability of a completion token given those before it, null on prompt tokens),
               top[]: rank, id, score, text, line? (the sequence's 1-based line in the TRAIN.jsonl it
               was registered from; a corpus' row in reading order, 1-based; absent for datasets
               registered before lines were kept), per_module?, tokens? (each position's score is that of
               predicting the next token), approximate? (true: an index score not rescored exactly)
               bottom[]? (--bottom-k: the most negative sequences, most negative first, rank 1 the
               most negative): entries as top's
    settings: model, dtype, factor_set, dataset, top_k, bottom_k?, per_module, per_token, max_length, fisher,
              model_fingerprint, tool_version, created (UTC, ISO 8601)
    tfidf?, bm25?, index?: what filtered or ranked the candidates; index.lexical? and index.sources?
              (--lexical K): per candidate source ("index", "lexical", "union") its "candidates",
              the final top-k entries among them ("in_top_k") and their mean share per query ("recall")
    inputs?: {"model" | "data" | "factors" | "queries": {"path", "sha256"}}, added by the CLI (cli/inputs.py)
Version 2 added schema_version, approximate, the queries' tokens, the settings' fisher, fingerprint,
version and date, and inputs. Version 3 added the queries' "bottom" and the settings' bottom_k
(present with --bottom-k only). Version 4 added the entries' "line" (a self-influence result's too).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from .. import version
from ..catalog.datasets import TrainingRecord, dataset_path
from ..catalog.factor_sets import factor_set_path
from ..engine.records import Query
from ..engine.score import TopEntry
from .report_data import SIGN

SCHEMA_VERSION = 4


def pairwise_report(
    queries: Sequence[Query],
    top: list[list[TopEntry]],
    record_of,
    *,
    strategy: str,
    damping: str,
    query_rank: int | None,
    modules: list[str],
    settings: dict | None = None,
    query_tokens: list[list[tuple[str, float | None]]] | None = None,
    bottom: list[list[TopEntry]] | None = None,
) -> dict:
    """results.json of a pairwise run; `record_of(index)` gives a training sequence's
    TrainingRecord (catalog/datasets.py: id, text, line).
    `settings` (model, factor set, dataset, top_k, ...) are recorded as given, for the report;
    `query_tokens` (Scorer.query_tokens, --per-token) as each query's "tokens"; `bottom`
    (ScoreResult.bottom, --bottom-k; None or [] when off) as each query's "bottom"."""
    report = {
        "schema_version": SCHEMA_VERSION,
        "kind": "pairwise",
        "sign": SIGN,
        "strategy": strategy,
        "damping": damping,
        "query_rank": query_rank,
        "modules": modules,
        "queries": [
            _query(
                query,
                top[position],
                record_of,
                query_tokens[position] if query_tokens else None,
                bottom[position] if bottom else None,
            )
            for position, query in enumerate(queries)
        ],
    }
    if settings:
        report["settings"] = settings
    return report


def _query(
    query: Query,
    top: list[TopEntry],
    record_of,
    tokens: list[tuple[str, float | None]] | None,
    bottom: list[TopEntry] | None,
) -> dict:
    record = {"id": query.id, "prompt": query.prompt, "completion": query.completion}
    if query.messages:  # a chat: shown as its turns before the completion, then the completion
        turns = [{"role": message.role, "content": message.content} for message in query.messages]
        shown = "\n".join(f"{turn['role']}: {turn['content']}" for turn in turns[:-1])
        record.update(prompt=shown, completion=turns[-1]["content"], messages=turns)
    if query.group:
        record["group"] = query.group
    if tokens is not None:
        record["tokens"] = [{"token": token, "logprob": logprob} for token, logprob in tokens]
    record["top"] = [_top_entry(rank, entry, record_of) for rank, entry in enumerate(top, start=1)]
    if bottom is not None:
        record["bottom"] = [_top_entry(rank, entry, record_of) for rank, entry in enumerate(bottom, start=1)]
    return record


def add_damping_check(report: dict, overlap: dict[str, list[float]]) -> None:
    """results.json's damping check (--damping-check): each query's top-k overlap with the ranking
    at each other damping ("0.1x", "10x": the share of its top-k kept), per query and summarised."""
    for position, query in enumerate(report["queries"]):
        query["damping_overlap"] = {scale: round(values[position], 4) for scale, values in overlap.items()}
    report["damping_check"] = {
        scale: {"mean": round(sum(values) / len(values), 4), "min": round(min(values), 4)}
        for scale, values in overlap.items()
        if values
    }


def rank_tensors(top: list[list[TopEntry]], bottom: list[list[TopEntry]] | None = None, per_module=None) -> dict:
    """scores.safetensors' view of the ranked sequences, for the report: "top_index" int64 [Q, k]
    (each query's top-k as global training indices, -1 where a query has fewer) and, given
    `bottom` (--bottom-k), "bottom_index" int64 [Q, b] alike (most negative first); given
    per_module [M, Q, N] (float, the merge's per-module scores, whether or not the full breakdown
    is kept), "top_per_module" float32 [M, Q, k] (and "bottom_per_module" [M, Q, b]; 0 where the
    index is -1): the layer-wise view of both tails at the cost of M x Q x (k + b) numbers. Readers
    of files without the bottom tensors (older results, runs without --bottom-k) see top-k only."""
    tensors = _rank_tensors("top", top, per_module)
    if bottom:
        tensors.update(_rank_tensors("bottom", bottom, per_module))
    return tensors


def _rank_tensors(tail: str, entries_of: list[list[TopEntry]], per_module) -> dict:
    import torch

    k = max((len(entries) for entries in entries_of), default=0)
    index = torch.full((len(entries_of), k), -1, dtype=torch.int64)
    for query, entries in enumerate(entries_of):
        index[query, : len(entries)] = torch.tensor([entry.index for entry in entries], dtype=torch.int64)
    tensors = {f"{tail}_index": index}
    if per_module is not None:
        gathered = per_module.gather(2, index.clamp(min=0).unsqueeze(0).expand(per_module.shape[0], -1, -1))
        masked = gathered.masked_fill(index.unsqueeze(0) < 0, 0)
        tensors[f"{tail}_per_module"] = masked.to(torch.float32).contiguous()
    return tensors


def self_report(scores, record_of, *, strategy: str, damping: str, top_k: int) -> dict:
    """results.json of a self-influence run. scores: [n_train]."""
    order = scores.argsort(descending=True)[:top_k].tolist()
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "self",
        "strategy": strategy,
        "damping": damping,
        "top": [_entry(rank, record_of(i), float(scores[i])) for rank, i in enumerate(order, start=1)],
    }


def _entry(rank: int, record: TrainingRecord, score: float) -> dict:
    """A ranked training sequence: rank, id, score, text and (when the dataset kept it) its line."""
    entry = {"rank": rank, "id": record.id, "score": score, "text": record.text}
    if record.line is not None:
        entry["line"] = record.line
    return entry


def _top_entry(rank: int, entry: TopEntry, record_of) -> dict:
    record = _entry(rank, record_of(entry.index), entry.score)
    if entry.approximate:
        record["approximate"] = True
    if entry.per_module is not None:
        record["per_module"] = entry.per_module
    if entry.token_scores is not None:
        record["tokens"] = [{"token": t, "score": s} for t, s in zip(entry.tokens, entry.token_scores, strict=True)]
    return record


def settings_of(job, factors, coverage: dict | None = None) -> dict:
    """The run's settings as the report shows them (a ScoreJob: model, factor set, data, options;
    the factor set's Fisher and model fingerprint; what its modules cover of the model when it
    recorded that; the tool's version and the date)."""
    config = job.config
    settings = {
        "model": job.model.path,
        "dtype": job.model.dtype,
        "factor_set": factor_set_path(job.factor_set_id),
        "dataset": dataset_path(job.dataset_id) if job.dataset_id else "",
        "top_k": config.top_k,
        **({"bottom_k": config.bottom_k} if config.bottom_k else {}),
        "per_module": config.per_module,
        "per_token": config.per_token,
        "max_length": config.max_length,
        "fisher": factors.fisher,
        "model_fingerprint": factors.model_fingerprint,
        "tool_version": version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if coverage:
        settings["coverage"] = coverage
    return settings
