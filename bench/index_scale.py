"""The index at 10^3-10^5 sequences: build, size, a 16-query two-stage batch, the cascade, recompute.

    nice -n 19 .venv/bin/python bench/index_scale.py --out bench/out/scale --sizes 1000,10000 [--scan-to 100000]

The demo model (GPT-2, 2 layers, d_model 96: the demo's recipe, trained once by bench/lds or
`influence demo`; --model-dir) scores a generated corpus: the demo corpus generated again with the
same seed, facts and vocabulary and more filler sequences (the demo's own texts among them). Per
size N, engine level, float32, CPU, the default index (svd, int8, rank 16, energy --energy):
- the build (seconds, tokens/s), index bytes (blocks as stored, safetensors);
- a 16-query batch, p50 over --batches repeats: the query side, the index stage over warm blocks
  (every pair, and through each --cascades setting), the exact rescoring of --rescore candidates
  per query (two_stage); process start and model load are reported apart;
- each stage's recall of the exact EK-FAC top-10 (recompute at the same N, where --recompute-to
  allows): the coarse stage's kept sequences, the index's top --rescore (full scan or cascade) and
  the final top-10 after exact rescoring;
- the scorer's peak RSS streaming the blocks from disk in its own process (full scan and cascade);
- recompute's time at N (measured up to --recompute-to, extrapolated per sequence above).
With --scan-to M, the index stage is also timed over M sequences: the largest size's blocks read
M / N times over (the scan's cost depends on the pairs stored, not on what they hold; recall at M
is not measured). Results: OUT/scale.json and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
IMPORTED = time.perf_counter()

from services.engine.fit import FitConfig, fit_factors  # noqa: E402
from services.engine.index import Indexer, IndexSpec, block_bytes  # noqa: E402
from services.engine.index_scan import Cascade, score_index_shard  # noqa: E402
from services.engine.model_io import load_model_and_tokenizer  # noqa: E402
from services.engine.records import Query, TrainingExample, read_queries_jsonl, read_training_jsonl  # noqa: E402
from services.engine.score import ScoreConfig, compute_scores  # noqa: E402
from services.engine.two_stage import recall, top_candidates, two_stage  # noqa: E402

DEMO = Path("/work/main/bench/out/lds/demo-seed0/demo")

STREAM = """
import json, sys, time, torch
from pathlib import Path
from safetensors.torch import load_file
sys.path.insert(0, "bench")
from common import peak_rss_mib
from services.engine.index_scan import Cascade, score_index_shard
queries = torch.load(sys.argv[1])
cascade = Cascade(**json.loads(sys.argv[3])) if sys.argv[3] != "null" else None
started, cpu = time.perf_counter(), time.process_time()
paths = sorted(Path(sys.argv[2]).glob("block-*.safetensors"))
score_index_shard(queries, (load_file(str(path)) for path in paths), cascade=cascade)
print(json.dumps({"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
                  "peak_rss_mib": peak_rss_mib()}))
"""


def generated_examples(demo: Path, count: int) -> list[TrainingExample]:
    """`count` sequences: the demo corpus generated again with more filler (same facts, words)."""
    from services.toy.corpus import generate_corpus

    settings = json.loads((demo / "demo.json").read_text())["settings"]
    own = read_training_jsonl(demo / "TRAIN.jsonl")
    extra = max(0, count - len(own))
    corpus = generate_corpus(
        0,
        num_entities=settings["num_entities"],
        num_queries=settings["num_queries"],
        mentions_per_fact=settings["mentions_per_fact"],
        num_filler_sequences=settings["num_filler_sequences"] + extra,
        extra_sentences=(0, settings["max_extra_sentences"]),
        qa_share=settings["qa_share"],
        distractor_share=settings["distractor_share"],
    )
    texts = [sequence.text for sequence in corpus.training][:count]
    known = {word for example in own for word in example.text.split()}
    unknown = {word for text in texts for word in text.split()} - known
    if unknown:
        raise SystemExit(f"the generated corpus has words the demo tokenizer lacks: {sorted(unknown)[:5]}")
    return [TrainingExample(f"g{i:06d}", text) for i, text in enumerate(texts)]


def cascade_of(text: str) -> Cascade:
    """ "pairs:query_rank:keep" -> Cascade."""
    pairs, query_rank, keep = text.split(":")
    return Cascade(pairs=int(pairs), query_rank=int(query_rank), keep=float(keep))


def label(cascade: Cascade | None) -> str:
    if cascade is None:
        return "full scan"
    return f"cascade {cascade.pairs} pairs x query rank {cascade.query_rank}, keep {cascade.keep:.0%}"


CPU: dict[str, float] = {}  # CPU seconds (this process, all threads) of each timed label's p50 call


def timed(function, repeats: int, name: str = "") -> tuple[float, object]:
    """(p50 wall seconds over `repeats` calls, the last result); with `name`, the CPU seconds of
    the call at the p50 in CPU[name] (on a shared host, the CPU time is the measure)."""
    seconds, cpu, result = [], [], None
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = function()
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    if name:
        CPU[name] = statistics.median(cpu)
    return statistics.median(seconds), result


def kept_by_coarse(coarse: torch.Tensor, blocks: list[dict], cascade: Cascade) -> list[list[int]]:
    """Each query's sequences the cascade rescans: per block, its best `cascade.kept(n)` by coarse
    score (coarse [Q, N] in global index order)."""
    kept: list[set[int]] = [set() for _ in range(coarse.shape[0])]
    for block in blocks:
        columns = block["index"]
        top = torch.topk(coarse[:, columns], cascade.kept(columns.numel()), dim=1).indices
        for query, row in enumerate(top.tolist()):
            kept[query].update(columns[row].tolist())
    return [sorted(found) for found in kept]


def global_scores(shard, n: int) -> torch.Tensor:
    scores = torch.zeros(shard.scores.shape[0], n, dtype=torch.float64)
    scores[:, shard.index] = shard.scores
    return scores


def streamed(out: Path, cascade: Cascade | None) -> dict:
    argument = "null" if cascade is None else json.dumps(cascade.__dict__)
    result = subprocess.run(
        [sys.executable, "-c", STREAM, str(out / "queries.pt"), str(out / "blocks"), argument],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def one_size(n: int, setup: dict, args, cascades: list[Cascade]) -> dict:
    from safetensors.torch import save_file

    model, tokenizer, factors, queries, config, spec = (
        setup[key] for key in ("model", "tokenizer", "factors", "queries", "config", "spec")
    )
    out = Path(args.out) / f"n{n}"
    (out / "blocks").mkdir(parents=True, exist_ok=True)
    examples = generated_examples(Path(args.demo), n)
    indexer = Indexer(model, tokenizer, factors, spec, config)
    sequences = indexer.scorer.tokenize_training(examples)
    tokens = sum(s.length for s in sequences)
    row: dict = {"sequences": n, "mean_tokens": round(tokens / n, 1)}
    started, started_cpu = time.perf_counter(), time.process_time()
    blocks = list(indexer.blocks(sequences, block_sequences=args.block_sequences))
    row["build_seconds"] = round(time.perf_counter() - started, 1)
    row["build_cpu_seconds"] = round(time.process_time() - started_cpu, 1)
    row["build_tokens_per_s"] = round(tokens / row["build_seconds"])
    for path in (out / "blocks").glob("block-*.safetensors"):
        path.unlink()
    for number, block in enumerate(blocks):
        save_file(block, str(out / "blocks" / f"block-{number:05d}.safetensors"))
    row["blocks"] = len(blocks)
    row["bytes_per_sequence"] = round(sum(block_bytes(block) for block in blocks) / n)
    row["index_mib"] = round(sum(p.stat().st_size for p in (out / "blocks").glob("block-*")) / 2**20, 2)
    print(f"  N={n}: built in {row['build_seconds']} s, {row['index_mib']} MiB", file=sys.stderr)

    mean_tokens = tokens / n
    row["query_side_seconds"], (index_queries, prepared) = timed(
        lambda: indexer.query_side(queries, mean_tokens), args.batches, "query side"
    )
    row["query_side_cpu_seconds"] = round(CPU["query side"], 3)
    torch.save(index_queries, out / "queries.pt")
    exact = None
    if n <= args.recompute_to:
        row["recompute_seconds"], result = timed(
            lambda: compute_scores(model, tokenizer, factors, examples, queries, config), 1, "recompute"
        )
        row["recompute_cpu_seconds"] = round(CPU["recompute"], 2)
        exact = result.scores.double()
        torch.save(exact, out / "exact.pt")  # [Q, N]: for other cascade settings over the stored blocks
    truth = None if exact is None else [torch.topk(r, 10).indices.tolist() for r in exact]

    row["scans"] = []
    for cascade in [None, *cascades]:
        seconds, shard = timed(
            lambda c=cascade: score_index_shard(index_queries, blocks, cascade=c), args.batches, "scan"
        )
        scores = global_scores(shard, n)
        candidates = top_candidates(scores, args.rescore)
        rescoring, (result, rescored) = timed(
            lambda s=scores, c=candidates: two_stage(indexer.scorer, prepared, s, c, sequences.__getitem__),
            1,
            "rescoring",
        )
        scan = {
            "setting": label(cascade),
            "index_stage_seconds": round(seconds, 4),
            "rescoring_seconds": round(rescoring, 3),
            "rescored_sequences": rescored,
            "two_stage_seconds": round(row["query_side_seconds"] + seconds + rescoring, 3),
            "index_stage_cpu_seconds": round(CPU["scan"], 4),
            "rescoring_cpu_seconds": round(CPU["rescoring"], 3),
            "two_stage_cpu_seconds": round(row["query_side_cpu_seconds"] + CPU["scan"] + CPU["rescoring"], 3),
        }
        if truth is not None:
            if cascade is not None:
                coarse = global_scores(
                    score_index_shard(index_queries, blocks, cascade=Cascade(cascade.pairs, cascade.query_rank, 0, 0)),
                    n,
                )
                scan["recall_coarse_kept"] = round(recall(kept_by_coarse(coarse, blocks, cascade), truth), 4)
            scan[f"recall_at_{args.rescore}"] = round(recall(candidates, truth), 4)
            final = [[entry.index for entry in entries] for entries in result.top]
            scan["final_top10_overlap"] = round(recall(final, truth), 4)
            scan["two_stage_speedup"] = round(row["recompute_seconds"] / scan["two_stage_seconds"], 1)
            scan["two_stage_cpu_speedup"] = round(row["recompute_cpu_seconds"] / scan["two_stage_cpu_seconds"], 1)
        scan.update({f"streamed_{k}": round(v, 3) for k, v in streamed(out, cascade).items()})
        row["scans"].append(scan)
        print(f"  N={n}: {scan}", file=sys.stderr)
    return row


def scan_only(n_to: int, source: Path, cascades: list[Cascade], repeats: int, full: bool = True) -> dict:
    """The index stage over `n_to` sequences: the blocks under `source` read over and over, warm
    (the full scan unless `full` is False, and each cascade)."""
    from safetensors.torch import load_file

    blocks = [load_file(str(path)) for path in sorted((source / "blocks").glob("block-*.safetensors"))]
    index_queries = torch.load(source / "queries.pt")
    n = sum(block["index"].numel() for block in blocks)
    times = math.ceil(n_to / n)
    stream = [blocks[i % len(blocks)] for i in range(times * len(blocks))]
    row = {"sequences": times * n, "from": f"{n} sequences' blocks x {times}", "scans": []}
    for cascade in [None, *cascades] if full else cascades:
        seconds, _ = timed(lambda c=cascade: score_index_shard(index_queries, stream, cascade=c), repeats, "scan")
        row["scans"].append(
            {"setting": label(cascade), "index_stage_seconds": round(seconds, 3), "cpu_seconds": round(CPU["scan"], 3)}
        )
        print(f"  scan {row['sequences']}: {row['scans'][-1]}", file=sys.stderr)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "out" / "scale"))
    parser.add_argument("--demo", default=str(DEMO), help="the demo directory (model/, TRAIN.jsonl, QUERIES.jsonl)")
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--scan-to", type=int, default=0)
    parser.add_argument("--recompute-to", type=int, default=10000)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--rescore", type=int, default=100)
    parser.add_argument("--energy", type=float, default=0.95)
    parser.add_argument("--block-sequences", type=int, default=4096)
    parser.add_argument("--cascades", default="4:4:0.03,2:4:0.03", help="pairs:query_rank:keep, comma-separated")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    demo = Path(args.demo)
    report: dict = {"date": time.strftime("%F"), "threads": torch.get_num_threads()}
    report["process_start_and_imports_seconds"] = round(IMPORTED - STARTED, 2)
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(demo / "model")
    report["model_load_seconds"] = round(time.perf_counter() - started, 2)
    queries = [Query(q.id, q.prompt, " " + q.completion.strip()) for q in read_queries_jsonl(demo / "QUERIES.jsonl")]
    config = ScoreConfig(batch_size=16, top_k=10)
    started = time.perf_counter()
    factors = fit_factors(model, tokenizer, read_training_jsonl(demo / "TRAIN.jsonl"), FitConfig(batch_size=16))
    report["fit_seconds"] = round(time.perf_counter() - started, 1)
    spec = IndexSpec(energy=args.energy)
    report["spec"] = spec.to_dict()
    setup = {
        "model": model,
        "tokenizer": tokenizer,
        "factors": factors,
        "queries": queries[: args.queries],
        "config": config,
        "spec": spec,
    }
    cascades = [cascade_of(text) for text in args.cascades.split(",") if text]
    report["sizes"] = []
    for n in (int(size) for size in args.sizes.split(",")):
        report["sizes"].append(one_size(n, setup, args, cascades))
        (out / "scale.json").write_text(json.dumps(report, indent=2))
    if args.scan_to:
        largest = max(int(size) for size in args.sizes.split(","))
        report["scan"] = scan_only(args.scan_to, out / f"n{largest}", cascades, args.batches)
        (out / "scale.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
