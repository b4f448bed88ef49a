"""The HTML report's data model, read from a result artifact alone (results.json and
scores.safetensors, as `influence score` writes them and StreamResultFiles sends them), so a
server's result downloaded into a directory reports the same as a local one.

What each view needs, and where it comes from:
    tokens       results.json top (and bottom) entries' "tokens", the queries' own "tokens" (--per-token)
    bottom       results.json queries' "bottom" (--bottom-k): the most negative sequences
    layers       results.json top (and bottom) entries' "per_module" (--per-module), else
                 scores.safetensors' "top_per_module" [M, Q, k] (written for every recompute run)
                 and "bottom_per_module" [M, Q, b] (with --bottom-k)
    modules      results.json top entries' "per_module" (--per-module): a row per module
    distribution scores.safetensors' "scores" [Q, N] (and "scored" [Q, N] under TF-IDF)
    cross-query  "scores" [Q, N] and "top_index" [Q, k] (and "bottom_index" [Q, b], --bottom-k)
                 with the queries' "group"
A view whose data a result does not hold is reported as missing (older results lack
"top_index" and "top_per_module", and every result before them the bottom tensors), never guessed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, NotFoundError

RESULTS = "results.json"
SCORES = "scores.safetensors"
SIGN = "positive = up-weighting the training sequence makes the completion more likely"


@dataclass
class TopSequence:
    rank: int
    id: str
    score: float
    text: str
    tokens: list[str] | None = None
    token_scores: list[float] | None = None
    approximate: bool = False  # an index score that was not rescored exactly
    line: int | None = None  # its 1-based line in the user's TRAIN.jsonl (None: not recorded)


@dataclass
class LayerView:
    """Influence of a query's top sequences by layer (or by module). scores: [L, k] (rows bottom to top)."""

    layers: list[str]
    scores: np.ndarray


@dataclass
class QueryView:
    id: str
    prompt: str
    completion: str
    group: str
    top: list[TopSequence]
    layers: LayerView | None = None
    bottom: list[TopSequence] = field(default_factory=list)  # --bottom-k: most negative first
    modules: LayerView | None = None  # a row per module, in the model's order (--per-module)
    bottom_layers: LayerView | None = None  # the bottom sequences' layers (--bottom-k), [L, b]
    tokens: list[tuple[str, float | None]] | None = None  # as scored, with completion log-probabilities


@dataclass
class CrossQuery:
    """One group's table: cell [a, b] = mean score on query b of query a's top-k sequences (and,
    with --bottom-k, `bottom` the same for query a's bottom-k sequences)."""

    group: str
    query_ids: list[str]
    table: np.ndarray
    bottom: np.ndarray | None = None


@dataclass
class ReportData:
    kind: str  # "pairwise" or "self"
    report: dict  # results.json as written
    queries: list[QueryView]
    scores: np.ndarray  # [Q, N] (self-influence: [1, N])
    scored: np.ndarray | None = None  # [Q, N] bool: the TF-IDF candidates, when TF-IDF filtered
    self_top: list[TopSequence] = field(default_factory=list)
    cross: list[CrossQuery] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)  # view -> why it is not shown

    @property
    def lexical(self) -> tuple[str, dict] | None:
        """The lexical pre-filter: ("BM25" or "TF-IDF", {"k", "scored_sequences"}), or None."""
        for key, name in (("bm25", "BM25"), ("tfidf", "TF-IDF")):
            if self.report.get(key):
                return name, self.report[key]
        return None


def load_result(directory: str | Path) -> ReportData:
    """The report's data from a result directory (InputError / NotFoundError naming the file)."""
    directory = Path(directory)
    results, scores_path = directory / RESULTS, directory / SCORES
    for path in (results, scores_path):
        if not path.is_file():
            raise NotFoundError(f"no result at {directory} (missing {path.name})")
    try:
        report = json.loads(results.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{results}: not a results.json ({error})") from None
    return from_artifact(report, _read_tensors(scores_path))


def from_artifact(report: dict, tensors: dict[str, np.ndarray]) -> ReportData:
    """The report's data from a result's two files as read: results.json's dict and
    scores.safetensors' arrays."""
    if report.get("kind") == "self":
        return _self_data(report, tensors)
    if report.get("kind") != "pairwise":
        raise InputError(f"{RESULTS}: unknown result kind {report.get('kind')!r}")
    return _pairwise_data(report, tensors)


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{path}: unreadable ({error})") from None


def _top(entries: list[dict]) -> list[TopSequence]:
    return [
        TopSequence(
            rank=entry["rank"],
            id=str(entry["id"]),
            score=float(entry["score"]),
            text=entry.get("text", ""),
            tokens=[token["token"] for token in entry["tokens"]] if "tokens" in entry else None,
            token_scores=[float(token["score"]) for token in entry["tokens"]] if "tokens" in entry else None,
            approximate=bool(entry.get("approximate", False)),
            line=entry.get("line"),
        )
        for entry in entries
    ]


def _self_data(report: dict, tensors: dict[str, np.ndarray]) -> ReportData:
    data = ReportData("self", report, [], np.asarray(tensors["scores"], dtype=np.float64).reshape(1, -1))
    data.self_top = _top(report.get("top", []))
    reason = "a self-influence result has no queries"
    data.missing.update({"tokens": reason, "layers": reason, "cross": reason})
    return data


def _pairwise_data(report: dict, tensors: dict[str, np.ndarray]) -> ReportData:
    scores = np.asarray(tensors["scores"], dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != len(report["queries"]):
        raise InputError(f"{SCORES}: scores of shape {scores.shape} do not match {len(report['queries'])} queries")
    if not np.isfinite(scores).all():
        raise InputError(f"{SCORES}: scores hold NaN or Inf")
    queries = [
        QueryView(
            id=str(query["id"]),
            prompt=query["prompt"],
            completion=query["completion"],
            group=query.get("group", ""),
            top=_top(query["top"]),
            bottom=_top(query.get("bottom", [])),
            tokens=[(t["token"], t["logprob"]) for t in query["tokens"]] if "tokens" in query else None,
        )
        for query in report["queries"]
    ]
    data = ReportData("pairwise", report, queries, scores)
    if "scored" in tensors:
        data.scored = np.asarray(tensors["scored"], dtype=bool)
    if not any(sequence.tokens for query in queries for sequence in query.top):
        data.missing["tokens"] = "no token-wise scores in this result (score with --per-token)"
    _attach_layers(data, report, tensors)
    _attach_cross(data, tensors.get("top_index"), tensors.get("bottom_index"))
    return data


def layer_number(module: str) -> int | None:
    """The block index in a module's dotted name ("model.layers.3.mlp.up_proj" -> 3), or None."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module)
    return int(match.group(1)) if match else None


def layer_rows(modules: list[str]) -> tuple[list[str], np.ndarray]:
    """Row labels (bottom to top) and an [L, M] 0/1 matrix summing modules into their layers.
    Modules with no block index (embeddings, the head) each get a row of their own, below."""
    numbered = sorted({n for n in map(layer_number, modules) if n is not None})
    loose = [module for module in modules if layer_number(module) is None]
    labels = [*loose, *(f"layer {n}" for n in numbered)]
    row_of = {module: labels.index(module) for module in loose}
    row_of.update({m: len(loose) + numbered.index(layer_number(m)) for m in modules if layer_number(m) is not None})
    sums = np.zeros((len(labels), len(modules)))
    for column, module in enumerate(modules):
        sums[row_of[module], column] = 1.0
    return labels, sums


def _attach_layers(data: ReportData, report: dict, tensors: dict[str, np.ndarray]) -> None:
    modules = list(report.get("modules") or [])
    entries_have_breakdown = all("per_module" in e for q in report["queries"] for e in q["top"])
    top_per_module = tensors.get("top_per_module")
    if not modules or not (entries_have_breakdown or top_per_module is not None):
        data.missing["layers"] = "no layer-wise scores in this result (score with --per-module)"
        return
    labels, sums = layer_rows(modules)
    bottom_per_module = tensors.get("bottom_per_module")
    for position, (query, raw) in enumerate(zip(data.queries, report["queries"], strict=True)):
        k = len(query.top)
        if entries_have_breakdown:
            per_module = np.array([[entry["per_module"][m] for entry in raw["top"]] for m in modules]).reshape(-1, k)
        else:
            per_module = np.asarray(top_per_module[:, position, :k], dtype=np.float64)
        query.layers = LayerView(labels, sums @ per_module)
        if entries_have_breakdown:
            query.modules = LayerView(modules, per_module)
        bottom = raw.get("bottom", [])
        if bottom and all("per_module" in entry for entry in bottom):
            tail = np.array([[entry["per_module"][m] for entry in bottom] for m in modules]).reshape(-1, len(bottom))
            query.bottom_layers = LayerView(labels, sums @ tail)
        elif bottom and bottom_per_module is not None:
            tail = np.asarray(bottom_per_module[:, position, : len(bottom)], dtype=np.float64)
            query.bottom_layers = LayerView(labels, sums @ tail)


def _attach_cross(data: ReportData, top_index: np.ndarray | None, bottom_index: np.ndarray | None) -> None:
    groups: dict[str, list[int]] = {}
    for position, query in enumerate(data.queries):
        if query.group:
            groups.setdefault(query.group, []).append(position)
    groups = {name: members for name, members in groups.items() if len(members) > 1}
    if not groups:
        data.missing["cross"] = 'no group of related queries (give queries a shared "group" in QUERIES.jsonl)'
        return
    if top_index is None:
        data.missing["cross"] = "this result does not record its top-k's indices (written by newer versions)"
        return
    for name, members in groups.items():
        bottom = _cross_table(data.scores, members, bottom_index) if bottom_index is not None else None
        ids = [data.queries[m].id for m in members]
        data.cross.append(CrossQuery(name, ids, _cross_table(data.scores, members, top_index), bottom))


def _cross_table(scores: np.ndarray, members: list[int], chosen_index: np.ndarray) -> np.ndarray:
    """[a, b] = mean score on query members[b] of the sequences chosen_index [Q, k] lists for
    members[a] (-1: none; NaN where a query lists none)."""
    table = np.zeros((len(members), len(members)))
    for row, source in enumerate(members):
        chosen = [int(i) for i in chosen_index[source] if i >= 0]
        for column, target in enumerate(members):
            table[row, column] = scores[target, chosen].mean() if chosen else math.nan
    return table
