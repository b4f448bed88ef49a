"""The measures of an attribution: the linear datamodeling score (LDS) and fact tracing.

LDS (TRAK's protocol, Park et al. 2023): for S random training subsets, the attribution predicts
query q's output after retraining on subset s as the sum of q's scores over the subset's
sequences; LDS(q) is the Spearman correlation over the S subsets between that prediction and the
output measured (here the completion's log-probability), and the LDS is its mean over queries.

    predicted[s, q] = Σ_{m ∈ subset s} scores[q, m]       (masks [S, N] @ scores[Q, N]ᵀ)
    LDS = mean_q spearman_s(predicted[:, q], measured[:, q])

Confidence intervals are percentile bootstraps that resample the subsets and the queries together
(both are samples: the subsets from all halves, the queries from the questions one could ask), and
a paired difference resamples both settings with the same draws, so what the two share cancels.

Fact tracing: for each query the training sequences that state its fact (`expected`); recall@k
is the share of them among the k best-scored sequences, MRR the mean of 1 / (rank of the first).
numpy only: no torch, so a score file from anywhere can be evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_TRUTH = Path(__file__).resolve().parents[2] / "bench" / "out" / "lds" / "demo-seed0"


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks (0-based) along the last axis, ties given their average rank; any leading shape."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, axis=-1, kind="stable")
    ranks = np.empty_like(values)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(values.shape[-1], dtype=np.float64), values.shape), -1)
    flat_values, flat_ranks = values.reshape(-1, values.shape[-1]), ranks.reshape(-1, values.shape[-1])
    for row, rank_row in zip(flat_values, flat_ranks, strict=True):
        unique, inverse, counts = np.unique(row, return_inverse=True, return_counts=True)
        if len(unique) < len(row):  # ties: each member gets the mean of its group's ranks
            sums = np.zeros(len(unique))
            np.add.at(sums, inverse, rank_row)
            rank_row[:] = (sums / counts)[inverse]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation along the last axis of a and b (same shape [..., S]) -> [...]; 0 where
    either side is constant (no ranking to agree with)."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    denominator = np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(-1) / np.where(denominator > 0, denominator, 1), 0.0)


def lds_per_query(scores: np.ndarray, masks: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """scores [Q, N], masks [S, N] (bool: the subset's sequences), measured [S, Q] -> LDS per query [Q]."""
    predicted = masks.astype(np.float64) @ np.asarray(scores, dtype=np.float64).T  # [S, Q]
    return spearman(predicted.T, np.asarray(measured, dtype=np.float64).T)


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def bootstrap_lds(
    scores: Sequence[np.ndarray], masks: np.ndarray, measured: np.ndarray, draws: int = 1000, seed: int = 0
) -> list[np.ndarray]:
    """LDS of each score matrix in `scores` on `draws` bootstrap resamples (subsets and queries
    drawn with replacement, the same draws for every matrix): one array [draws] per matrix."""
    generator = np.random.default_rng(seed)
    n_subsets, n_queries = measured.shape
    predicted = [masks.astype(np.float64) @ np.asarray(s, dtype=np.float64).T for s in scores]  # [S, Q] each
    out = [np.empty(draws) for _ in scores]
    for draw in range(draws):
        rows = generator.integers(0, n_subsets, n_subsets)
        columns = generator.integers(0, n_queries, n_queries)
        truth = measured[np.ix_(rows, columns)].T  # [Q', S']
        for values, prediction in zip(out, predicted, strict=True):
            values[draw] = spearman(prediction[np.ix_(rows, columns)].T, truth).mean()
    return out


def interval(value: float, draws: np.ndarray, level: float = 0.95) -> Interval:
    tail = (1 - level) / 2
    return Interval(float(value), float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail)))


def fact_tracing_per_query(scores: np.ndarray, expected: Sequence[Sequence[int]], k: int = 10) -> dict[str, np.ndarray]:
    """Per query with expected sequences (positions in scores' columns): recall@k and the reciprocal
    rank of the first expected sequence. Ties rank in column order (a stable sort of -scores), as the
    tool's own top-k does. Returns {"recall@k": [Q'], "rr": [Q']}."""
    recalls, reciprocal = [], []
    order = np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")
    for row, wanted in zip(order, expected, strict=True):
        if not wanted:
            continue
        wanted = {int(position) for position in wanted}
        recalls.append(len(wanted & set(row[:k].tolist())) / len(wanted))
        hits = np.flatnonzero(np.isin(row, list(wanted)))
        reciprocal.append(1.0 / (hits[0] + 1))
    return {f"recall@{k}": np.array(recalls), "rr": np.array(reciprocal)}


def fact_tracing(scores: np.ndarray, expected: Sequence[Sequence[int]], k: int = 10) -> dict[str, float]:
    """Mean recall@k and MRR over the queries that have expected sequences."""
    per_query = fact_tracing_per_query(scores, expected, k)
    return {f"recall@{k}": float(per_query[f"recall@{k}"].mean()), "mrr": float(per_query["rr"].mean())}


def bootstrap_means(values: Sequence[np.ndarray], draws: int = 1000, seed: int = 0) -> list[np.ndarray]:
    """Means of per-query arrays (all [Q]) on `draws` resamples of the queries, the same draws for each."""
    generator = np.random.default_rng(seed)
    n = len(values[0])
    rows = generator.integers(0, n, (draws, n))
    return [np.asarray(v, dtype=np.float64)[rows].mean(1) for v in values]


@dataclass(frozen=True)
class GroundTruth:
    """What ground_truth.py wrote: masks [S, N] bool, measured [S, Q] float64, and the ids of both axes."""

    training_ids: list[str]
    query_ids: list[str]
    masks: np.ndarray
    measured: np.ndarray


def load_ground_truth(directory: Path) -> GroundTruth:
    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    files = sorted(directory.glob("subset-*.json"))
    if not files:
        raise SystemExit(f"no subset-*.json in {directory}: run bench/lds/ground_truth.py first")
    n_train = len(manifest["training_ids"])
    masks = np.zeros((len(files), n_train), dtype=bool)
    measured = np.zeros((len(files), len(manifest["query_ids"])))
    for row, path in enumerate(files):
        record = json.loads(path.read_text())
        masks[row, record["keep"]] = True
        measured[row] = record["query_logprobs"]
    return GroundTruth(manifest["training_ids"], manifest["query_ids"], masks, measured)
