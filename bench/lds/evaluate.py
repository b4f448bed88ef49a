"""LDS (with a bootstrap CI) and fact tracing of score files against the ground truth.

    .venv/bin/python bench/lds/evaluate.py SCORES... [--truth DIR] [--expected FILE] [--draws 1000] [--json OUT]

Each SCORES is a safetensors file holding `scores` [Q, N] (queries and training sequences in the
demo's file order: what `influence score` writes as scores.safetensors, or bench/lds/settings.py's
files) or a directory holding scores.safetensors. Its name in the table is the file's stem (or
the directory's name); a `seconds` entry in its metadata is shown as its time.

Prints, per file: LDS [95% CI] (bootstrap over subsets and queries, metrics.py), recall@10 and
MRR of the sequences stating each query's fact (EXPECTED.json, the demo's), and, for every file
after the first, the paired difference from the first (same bootstrap draws) with its CI: a CI
that excludes zero is a difference these queries and subsets can tell apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))

from metrics import (
    DEFAULT_TRUTH,
    bootstrap_lds,
    bootstrap_means,
    fact_tracing_per_query,
    interval,
    lds_per_query,
    load_ground_truth,
)


def read_scores(path: Path) -> tuple[str, np.ndarray, float | None, np.ndarray | None]:
    """(name, scores [Q, N] float64, seconds or None, scored [Q, N] bool or None) from a score file
    or a result directory. `scored` (a lexical filter's candidates; None: every sequence scored):
    an unscored sequence counts 0 toward a subset's sum (LDS) and ranks after every scored one
    (fact tracing), as `influence score` ranks it."""
    path = Path(path)
    name = path.name if path.is_dir() else path.stem
    file = path / "scores.safetensors" if path.is_dir() else path
    with safe_open(str(file), "np") as handle:
        scores = handle.get_tensor("scores").astype(np.float64)
        names = handle.keys()
        scored = handle.get_tensor("scored").astype(bool) if "scored" in names else None
        seconds = (handle.metadata() or {}).get("seconds")
    return name, scores, None if seconds is None else float(seconds), scored


def ranked_scores(scores: np.ndarray, scored: np.ndarray | None) -> np.ndarray:
    """The scores fact tracing ranks: -inf where a query did not score a sequence."""
    return scores if scored is None else np.where(scored, scores, -np.inf)


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def evaluate(paths: list[Path], truth_dir: Path, expected_path: Path | None, draws: int, k: int = 10) -> dict:
    """The table's numbers. Without retrained subsets in `truth_dir` (a corpus measured by fact
    tracing only) the ids come from its demo directory and the LDS columns are left out."""
    truth = load_ground_truth(truth_dir) if any(Path(truth_dir).glob("subset-*.json")) else None
    if truth is not None:
        training_ids, query_ids = truth.training_ids, truth.query_ids
    else:
        training_ids = _ids(Path(truth_dir) / "demo" / "TRAIN.jsonl")
        query_ids = _ids(Path(truth_dir) / "demo" / "QUERIES.jsonl")
    expected = None
    if expected_path is not None and expected_path.exists():
        by_id = json.loads(expected_path.read_text())
        column = {training_id: position for position, training_id in enumerate(training_ids)}
        expected = [[column[i] for i in by_id.get(query_id, [])] for query_id in query_ids]
    files = [read_scores(path) for path in paths]
    for name, scores, _, _ in files:
        if scores.shape != (len(query_ids), len(training_ids)):
            raise SystemExit(
                f"{name}: scores of shape {tuple(scores.shape)}, the corpus has "
                f"{len(query_ids)} queries x {len(training_ids)} training sequences"
            )
    lds_draws = bootstrap_lds([s for _, s, _, _ in files], truth.masks, truth.measured, draws) if truth else None
    tracing = [fact_tracing_per_query(ranked_scores(s, m), expected, k) for _, s, _, m in files] if expected else None
    recall_key = f"recall@{k}"
    rows = []
    for position, (name, scores, seconds, _) in enumerate(files):
        row = {"name": name, "seconds": seconds}
        if truth:
            row["lds"] = interval(lds_per_query(scores, truth.masks, truth.measured).mean(), lds_draws[position])
        if tracing:
            recall_draws, rr_draws = bootstrap_means([tracing[position][recall_key], tracing[position]["rr"]], draws)
            row[recall_key] = interval(tracing[position][recall_key].mean(), recall_draws)
            row["mrr"] = interval(tracing[position]["rr"].mean(), rr_draws)
        if position and truth:
            base = lds_per_query(files[0][1], truth.masks, truth.measured).mean()
            row["lds_diff"] = interval(row["lds"].value - base, lds_draws[position] - lds_draws[0])
        if position and tracing:
            for key, source in ((recall_key, recall_key), ("mrr", "rr")):
                diff = tracing[position][source] - tracing[0][source]
                row[f"{key}_diff"] = interval(diff.mean(), bootstrap_means([diff], draws)[0])
        rows.append(row)
    return {"subsets": int(truth.masks.shape[0]) if truth else 0, "queries": len(query_ids), "rows": rows}


def print_table(summary: dict, k: int = 10) -> None:
    subsets = f"{summary['subsets']} retrained subsets" if summary["subsets"] else "no retrained subsets (no LDS)"
    print(f"{subsets}, {summary['queries']} queries; 95% bootstrap CIs\n")
    print(f"| setting | LDS [CI] | recall@{k} [CI] | MRR [CI] | time (s) | Δ LDS vs first | Δ recall | Δ MRR |")
    print("|---|---|---|---|---|---|---|---|")
    for row in summary["rows"]:
        cells = [
            row["name"],
            str(row.get("lds", "-")),
            str(row.get(f"recall@{k}", "-")),
            str(row.get("mrr", "-")),
            "-" if row["seconds"] is None else f"{row['seconds']:.1f}",
            str(row.get("lds_diff", "")),
            str(row.get(f"recall@{k}_diff", "")),
            str(row.get("mrr_diff", "")),
        ]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scores", nargs="+", type=Path)
    parser.add_argument("--truth", type=Path, default=DEFAULT_TRUTH, help="ground_truth.py's output directory")
    parser.add_argument("--expected", type=Path, help="EXPECTED.json (default: the truth's demo directory's)")
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    expected = args.expected or args.truth / "demo" / "EXPECTED.json"
    summary = evaluate(args.scores, args.truth, expected, args.draws)
    print_table(summary)
    if args.json:
        plain = {
            **summary,
            "rows": [{k: (v.__dict__ if hasattr(v, "__dict__") else v) for k, v in r.items()} for r in summary["rows"]],
        }
        args.json.write_text(json.dumps(plain, indent=2))


if __name__ == "__main__":
    main()
