"""The index on a real pretrained LLM: SmolLM2-135M-Instruct (Llama, 30 layers, MLP 576 -> 1536 -> 576,
90 tracked modules), against exact EK-FAC recompute scoring of the same queries, in one run.

    bash bench/setup.sh
    .venv-bench/bin/python bench/real_index.py --out bench/out/real-index [--sequences 256] [--ranks 8,16]

The model directory and the planted-facts corpus are bench/real_model.py's (built under OUT). Steps,
engine level, float32, CPU: factors fitted once; exact scores of the 16 queries against every
sequence (the reference, and the recompute latency); for each svd rank: the index build (timed, and
its throughput against one plain forward+backward over the corpus in its own process), the query
side, index scoring alone (warm blocks), two-stage scoring with the default rescoring, the index's
Spearman / top-10 overlap / recall of the exact top-10 against the reference, and bytes per
sequence. The exact `none` index is skipped: 318 MB per sequence at these widths. Results:
OUT/index-report-join{JOIN}.json, printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_index import agreement, timed_batch  # noqa: E402
from real_model import PLAIN_PASS, build_model, write_corpus  # noqa: E402

from services.engine.fit import FitConfig, fit_factors  # noqa: E402
from services.engine.index import Indexer, IndexSpec  # noqa: E402
from services.engine.model_io import load_model_and_tokenizer  # noqa: E402
from services.engine.records import TrainingExample, read_queries_jsonl, read_training_jsonl  # noqa: E402
from services.engine.score import ScoreConfig, compute_scores  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "out" / "real-index"))
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ranks", default="8,16")
    parser.add_argument(
        "--join", type=int, default=1, help="each training sequence: this many of the corpus's texts joined (longer)"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(out)
    write_corpus(out, args.sequences, args.queries)
    examples = read_training_jsonl(out / "train.jsonl")
    if args.join > 1:  # longer sequences: the ratio of recompute to index cost grows with tokens per sequence
        examples = [
            TrainingExample(examples[start].id, " ".join(e.text for e in examples[start : start + args.join]))
            for start in range(0, len(examples), args.join)
        ]
        train = out / f"train-joined-{args.join}.jsonl"
        train.write_text("".join(json.dumps({"id": e.id, "text": e.text}) + "\n" for e in examples))
    else:
        train = out / "train.jsonl"
    queries = read_queries_jsonl(out / "queries.jsonl")
    model, tokenizer = load_model_and_tokenizer(model_dir)
    report: dict = {"model": "SmolLM2-135M-Instruct", "sequences": len(examples), "queries": len(queries)}
    report["mean_tokens"] = round(
        sum(min(len(tokenizer(e.text)["input_ids"]), args.max_length) for e in examples) / len(examples), 1
    )

    started = time.perf_counter()
    factors = fit_factors(model, tokenizer, examples, FitConfig(batch_size=args.batch_size, max_length=args.max_length))
    report["fit_seconds"] = round(time.perf_counter() - started, 1)
    config = ScoreConfig(batch_size=args.batch_size, max_length=args.max_length, top_k=10)
    started = time.perf_counter()
    exact = compute_scores(model, tokenizer, factors, examples, queries, config).scores  # [Q, N]
    report["recompute_seconds"] = round(time.perf_counter() - started, 2)
    print(f"fit {report['fit_seconds']} s, recompute scoring {report['recompute_seconds']} s", file=sys.stderr)

    plain = subprocess.run(
        [
            sys.executable,
            "-c",
            PLAIN_PASS,
            str(model_dir),
            str(train),
            str(args.batch_size),
            str(args.max_length),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    plain = json.loads(plain.stdout.strip().splitlines()[-1])
    report["plain_forward_backward_tokens_per_s"] = round(plain["tokens"] / plain["seconds"])

    report["settings"] = []
    for rank in (int(r) for r in args.ranks.split(",")):
        spec = IndexSpec("svd", rank=rank)
        indexer = Indexer(model, tokenizer, factors, spec, config)
        sequences = indexer.scorer.tokenize_training(examples)
        timed = timed_batch(indexer, sequences, queries)
        query_side, index_alone, rescoring, k = (timed[key] for key in ("query_side", "index_alone", "rescoring", "k"))
        scores, build = timed["scores"], timed["build"]
        tokens = sum(s.length for s in sequences)
        row = {
            "setting": f"svd R={rank} {spec.storage_dtype}, query rank {spec.query_rank}",
            "bytes_per_sequence": spec.bytes_per_sequence(factors.modules),
            "full_gradient_bytes_per_sequence": IndexSpec("none", storage_dtype="float32").bytes_per_sequence(
                factors.modules
            ),
            **{key: round(value, 3) for key, value in agreement(scores, exact).items()},
            "build_seconds": round(build, 1),
            "build_throughput_vs_plain": round(tokens / build / report["plain_forward_backward_tokens_per_s"], 2),
            "query_side_seconds": round(query_side, 2),
            "index_scoring_seconds": round(index_alone, 4),
            "index_speedup": round(report["recompute_seconds"] / index_alone, 1),
            "two_stage_candidates": k,
            "two_stage_seconds": round(query_side + index_alone + rescoring, 2),
            "two_stage_speedup": round(report["recompute_seconds"] / (query_side + index_alone + rescoring), 1),
        }
        row["smaller"] = round(row["full_gradient_bytes_per_sequence"] / row["bytes_per_sequence"], 1)
        report["settings"].append(row)
        print(json.dumps(row), file=sys.stderr)
    (out / f"index-report-join{args.join}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
