"""The index against exact EK-FAC scoring, side by side in one run (engine level, float32, CPU).

    .venv/bin/python bench/bench_index.py --out bench/out/index [--models llama,gpt2] [--queries 200]

For each model (a small Llama and a GPT-2, each trained here on a planted-facts corpus of ~1,150
sequences of ~32 tokens by the repo's recipe, services.toy.recipe.RECIPES["toy-llama"/"toy-gpt2"];
cached under OUT):
1. exact EK-FAC scores of every query against every sequence (the reference);
2. for each compression setting: bytes per sequence (and x smaller than the exact, float32 `none`
   index), Spearman and top-10 overlap against exact per query (averaged), the share of the exact
   top-10 inside the index's top-K for K = 2, 5, 10, 20% of the corpus (= the top-10 overlap after
   two-stage rescoring of those K, which makes candidates exact), and `none`'s relative error;
3. latency of a 16-query batch: recompute scoring vs index scoring alone (the block contraction,
   warm blocks in memory) vs two-stage (index + exact rescoring of the default K), at N = 1,000 and
   10,000 sequences; the build's throughput against one plain forward+backward; the scoring
   process's peak RSS streaming blocks from disk at both sizes;
4. a projection of the default setting to a 7B model over 1B training tokens.
Results: OUT/results.json and a Markdown table on stdout (copied into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from services.engine.fit import FitConfig, fit_factors  # noqa: E402
from services.engine.index import Indexer, IndexSpec, block_bytes  # noqa: E402
from services.engine.index_scan import score_index_shard  # noqa: E402
from services.engine.model_io import load_model_and_tokenizer  # noqa: E402
from services.engine.records import Query, TrainingExample  # noqa: E402
from services.engine.score import ScoreConfig, compute_scores  # noqa: E402
from services.engine.two_stage import top_candidates, two_stage  # noqa: E402
from services.options import ENERGY, RESCORE  # noqa: E402

SETTINGS = [
    IndexSpec("none", storage_dtype="float32"),
    IndexSpec("svd", rank=2),
    IndexSpec("svd", rank=4),
    IndexSpec("svd", rank=8),
    IndexSpec("svd", rank=16),
    IndexSpec("svd", rank=8, query_rank=None),
    IndexSpec("svd", rank=8, storage_dtype="float32"),
    IndexSpec("eigen", dim=8),
    IndexSpec("eigen", dim=16),
    IndexSpec("eigen", dim=32),
    IndexSpec("random", dim=16),
    IndexSpec("random", dim=32),
    IndexSpec("random", dim=64),
]
FRACTIONS = (0.02, 0.05, 0.10, 0.20)


def label(spec: IndexSpec) -> str:
    size = {"svd": f"R={spec.rank}", "eigen": f"K={spec.dim}", "random": f"k={spec.dim}", "none": ""}[spec.projection]
    query = (
        f", query rank {spec.query_rank}"
        if spec.projection == "svd" and spec.query_rank
        else (", full-rank queries" if spec.projection == "svd" else "")
    )
    return f"{spec.projection} {size} {spec.storage_dtype}{query}".replace("  ", " ")


# ------------------------------------------------------------------------------------------------
# workloads


def build_workload(out: Path, family: str, seed: int = 0, epochs: int | None = None) -> dict:
    """The toy model of `family` trained on its planted-facts corpus (~1,150 sequences), with its
    training texts and planted queries (prompt + completion). The recipe is the repo's
    (services.toy.recipe.RECIPES["toy-" + family], trained in the pinned child that bench/lds
    retrains on subsets); `epochs` overrides its epochs. Cached under OUT/family (prepare_demo's
    layout, plus workload.json)."""
    from services.engine.records import read_queries_jsonl, read_training_jsonl
    from services.toy.demo_data import STAMP_NAME, prepare_demo
    from services.toy.recipe import RECIPES

    settings = RECIPES[f"toy-{family}"]
    if epochs is not None:
        settings = replace(settings, epochs=epochs)
    work = out / family
    paths = prepare_demo(work, seed=seed, progress=False, **asdict(settings))  # reused when built before
    workload = {
        "family": family,
        "texts": [example.text for example in read_training_jsonl(paths.train_jsonl)],
        "planted_queries": [
            {"prompt": query.prompt, "completion": " " + query.completion}
            for query in read_queries_jsonl(paths.queries_jsonl)
        ],
        "train_seconds": json.loads((work / STAMP_NAME).read_text())["training"]["seconds"],
    }
    (work / "workload.json").write_text(json.dumps(workload))  # what the plain forward+backward child reads
    return workload


def queries_of(workload: dict, count: int, seed: int = 0) -> list[Query]:
    """The planted-fact questions, then prompt/completion pairs cut from training sequences."""
    generator = torch.Generator().manual_seed(seed)
    queries = [Query(f"p{i}", q["prompt"], q["completion"]) for i, q in enumerate(workload["planted_queries"])]
    texts = workload["texts"]
    while len(queries) < count:
        words = texts[int(torch.randint(len(texts), (1,), generator=generator))].split()
        if len(words) < 6:
            continue
        cut = len(words) // 2
        queries.append(Query(f"c{len(queries)}", " ".join(words[:cut]), " " + " ".join(words[cut : cut + 4])))
    return queries[:count]


def examples_of(workload: dict, copies: int = 1) -> list[TrainingExample]:
    texts = workload["texts"]
    return [TrainingExample(f"t{copy}-{i}", text) for copy in range(copies) for i, text in enumerate(texts)]


# ------------------------------------------------------------------------------------------------
# metrics


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks_a, ranks_b = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ranks_a, ranks_b]))[0, 1])


def agreement(index: torch.Tensor, exact: torch.Tensor) -> dict:
    n_queries, n_train = exact.shape
    rows = []
    for query in range(n_queries):
        truth = set(torch.topk(exact[query], 10).indices.tolist())
        entry = {
            "spearman": spearman(index[query], exact[query]),
            "top10_overlap": len(truth & set(torch.topk(index[query], 10).indices.tolist())) / 10,
        }
        for fraction in FRACTIONS:
            k = max(10, math.ceil(fraction * n_train))
            found = set(torch.topk(index[query], k).indices.tolist())
            entry[f"recall_at_{int(fraction * 100)}pct"] = len(truth & found) / 10
        rows.append(entry)
    return {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}


def index_scores(indexer: Indexer, sequences, index_queries, block_sequences=None) -> tuple[torch.Tensor, list, float]:
    """(scores [Q, N], the blocks, build seconds)."""
    started = time.perf_counter()
    blocks = list(indexer.blocks(sequences, block_sequences=block_sequences))
    build = time.perf_counter() - started
    shard = score_index_shard(index_queries, blocks)
    scores = torch.zeros(shard.scores.shape[0], len(sequences))
    scores[:, shard.index] = shard.scores.float()
    return scores, blocks, build


# ------------------------------------------------------------------------------------------------


def quality(workload: dict, model_dir: Path, n_queries: int) -> dict:
    model, tokenizer = load_model_and_tokenizer(model_dir)
    examples = examples_of(workload)
    queries = queries_of(workload, n_queries)
    factors = fit_factors(model, tokenizer, examples, FitConfig(batch_size=16))
    config = ScoreConfig(batch_size=16)
    started = time.perf_counter()
    exact = compute_scores(model, tokenizer, factors, examples, queries, config).scores
    exact_seconds = time.perf_counter() - started
    rows = []
    none_bytes = None
    for spec in SETTINGS:
        indexer = Indexer(model, tokenizer, factors, spec, config)
        sequences = indexer.scorer.tokenize_training(examples)
        index_queries = indexer.queries(queries)
        scores, blocks, build = index_scores(indexer, sequences, index_queries)
        per_sequence = round(sum(block_bytes(block) for block in blocks) / len(sequences))
        none_bytes = none_bytes or per_sequence
        row = {"setting": label(spec), "bytes_per_sequence": per_sequence, "smaller": none_bytes / per_sequence}
        row.update(agreement(scores, exact))
        row["build_seconds"] = round(build, 2)
        if spec.projection == "none":
            row["relative_error_vs_exact"] = float((scores - exact).norm() / exact.norm())
        rows.append(row)
        print(
            f"  {row['setting']:<36} {per_sequence:>9,} B  x{row['smaller']:.1f}  "
            f"spearman {row['spearman']:.3f}  top10 {row['top10_overlap']:.2f}  "
            f"recall@2% {row['recall_at_2pct']:.2f} @5% {row['recall_at_5pct']:.2f}",
            file=sys.stderr,
        )
    return {"n_train": len(examples), "n_queries": len(queries), "exact_seconds": exact_seconds, "settings": rows}


PLAIN = """
import json, sys, time, torch
from services.engine.model_io import load_model_and_tokenizer
model, tokenizer = load_model_and_tokenizer(sys.argv[1])
texts = json.loads(open(sys.argv[2]).read())["texts"] * int(sys.argv[3])
started, tokens = time.perf_counter(), 0
for start in range(0, len(texts), 16):
    enc = tokenizer(texts[start:start + 16], return_tensors="pt", padding=True)
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, :-1]
    target = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).backward()
    model.zero_grad(set_to_none=True)
    tokens += int(enc["attention_mask"].sum())
print(json.dumps({"seconds": time.perf_counter() - started, "tokens": tokens}))
"""

STREAM = """
import json, sys, time, torch
from pathlib import Path
from safetensors.torch import load_file
sys.path.insert(0, "bench")
from common import peak_rss_mib
from services.engine.index_scan import score_index_shard
queries = torch.load(sys.argv[1])
started = time.perf_counter()
score_index_shard(queries, (load_file(str(path)) for path in sorted(Path(sys.argv[2]).glob("block-*.safetensors"))))
print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mib": peak_rss_mib()}))
"""


def timed_batch(indexer: Indexer, sequences, queries, block_sequences=None) -> dict:
    """One 16-query batch against an index built here, timed in its parts (seconds): the query side
    (query gradients as per-token factors, index-space queries, preconditioned queries for
    rescoring), the build, index scoring alone over the warm blocks, and the exact rescoring of the
    default K candidates per query."""
    k = RESCORE.default
    started = time.perf_counter()
    mean_tokens = sum(s.length for s in sequences) / len(sequences)
    index_queries, prepared = indexer.query_side(queries, mean_tokens)
    query_side = time.perf_counter() - started
    scores, blocks, build = index_scores(indexer, sequences, index_queries, block_sequences=block_sequences)
    started = time.perf_counter()
    score_index_shard(index_queries, blocks)
    index_alone = time.perf_counter() - started
    started = time.perf_counter()
    two_stage(indexer.scorer, prepared, scores, top_candidates(scores, k), sequences.__getitem__)
    return {
        "query_side": query_side,
        "scores": scores,
        "blocks": blocks,
        "build": build,
        "index_queries": index_queries,
        "index_alone": index_alone,
        "k": k,
        "rescoring": time.perf_counter() - started,
    }


def speed(workload: dict, model_dir: Path, out: Path, spec: IndexSpec, copies_list=(1, 8)) -> dict:
    """Latency of a 16-query batch at N ≈ 1,150 x copies; build throughput; streamed peak RSS."""
    from safetensors.torch import save_file

    model, tokenizer = load_model_and_tokenizer(model_dir)
    queries = queries_of(workload, 16)
    factors = fit_factors(model, tokenizer, examples_of(workload), FitConfig(batch_size=16))
    config = ScoreConfig(batch_size=16, top_k=10)
    results = {}
    for copies in copies_list:
        examples = examples_of(workload, copies)
        started = time.perf_counter()
        compute_scores(model, tokenizer, factors, examples, queries, config)
        recompute = time.perf_counter() - started
        indexer = Indexer(model, tokenizer, factors, spec, config)
        sequences = indexer.scorer.tokenize_training(examples)
        timed = timed_batch(indexer, sequences, queries, block_sequences=256)
        query_side, index_alone, rescoring, k = (timed[key] for key in ("query_side", "index_alone", "rescoring", "k"))
        blocks, build, index_queries = timed["blocks"], timed["build"], timed["index_queries"]
        plain = json.loads(
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    PLAIN,
                    str(model_dir),
                    str(out / workload["family"] / "workload.json"),
                    str(copies),
                ],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            ).stdout
        )
        stream_dir = out / workload["family"] / f"blocks-{copies}"
        stream_dir.mkdir(parents=True, exist_ok=True)
        for number, block in enumerate(blocks):
            save_file(block, str(stream_dir / f"block-{number:05d}.safetensors"))
        torch.save(index_queries, stream_dir / "queries.pt")
        streamed = json.loads(
            subprocess.run(
                [sys.executable, "-c", STREAM, str(stream_dir / "queries.pt"), str(stream_dir)],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            ).stdout
        )
        tokens = sum(s.length for s in sequences)
        results[len(examples)] = {
            "recompute_seconds": round(recompute, 3),
            "query_side_seconds": round(query_side, 3),
            "index_scoring_seconds": round(index_alone, 4),
            "index_speedup": round(recompute / index_alone, 1),
            "two_stage_candidates": k,
            "two_stage_seconds": round(query_side + index_alone + rescoring, 3),
            "two_stage_speedup": round(recompute / (query_side + index_alone + rescoring), 1),
            "build_seconds": round(build, 2),
            "build_tokens_per_s": round(tokens / build),
            "plain_forward_backward_tokens_per_s": round(plain["tokens"] / plain["seconds"]),
            "build_throughput_vs_plain": round((tokens / build) / (plain["tokens"] / plain["seconds"]), 2),
            "streamed_scoring_seconds": round(streamed["seconds"], 3),
            "streamed_peak_rss_mib": round(streamed["peak_rss_mib"]),
            "index_mib": round(sum(p.stat().st_size for p in stream_dir.glob("block-*")) / 2**20, 1),
        }
        print(f"  N={len(examples)}: {results[len(examples)]}", file=sys.stderr)
    return results


def projection_7b(spec: IndexSpec, pairs_share: float = 1.0) -> dict:
    """A setting scaled to a 7B Llama (32 layers, MLP 4096 x 11008, three modules each) over 1B
    training tokens in 2,048-token sequences, from per-module arithmetic; `pairs_share`: the mean
    share of the R pairs per module a sequence keeps (1 for a fixed rank; measured for an energy
    share, bench/index_frontier.py)."""
    from services.engine.quantize import row_bytes

    modules = 32 * 3
    d_small, d_large = 4096, 11008
    pairs = pairs_share * min(spec.rank, d_small)  # per module and sequence, on average
    pair_bytes = row_bytes(d_small, spec.storage_dtype) + row_bytes(d_large, spec.storage_dtype)
    per_sequence = round(modules * (pairs * pair_bytes + 4))
    sequences = 10**9 // 2048
    forward_backward_flops = 6 * 6.7e9 * 1e9
    # randomized SVD: ~4 (R + 8) d_out d_in per module and sequence; rotations: T (d_out² + d_in²)
    svd_flops = sequences * modules * 4 * (spec.rank + 8) * d_small * d_large
    rotation_flops = 10**9 * modules * (d_small**2 + d_large**2)
    a100 = 312e12 * 0.4  # bf16 peak at 40% utilisation
    contraction = 16 * sequences * modules * (spec.query_rank or 16) * pairs * (d_small + d_large) * 2
    return {
        "sequences": sequences,
        "bytes_per_sequence": per_sequence,
        "index_tib": round(per_sequence * sequences / 2**40, 2),
        "build_gpu_hours_a100": round((forward_backward_flops * 0.67 + svd_flops + rotation_flops) / a100 / 3600),
        "plain_forward_backward_gpu_hours_a100": round(forward_backward_flops / a100 / 3600),
        "query_batch_flops_16q": contraction,
        "query_batch_seconds_one_a100": round(contraction / a100, 1),
        "query_batch_read_seconds_at_10_GBps": round(per_sequence * sequences / 10e9, 1),
        "query_batch_read_seconds_16_shards": round(per_sequence * sequences / 10e9 / 16, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "out" / "index"))
    parser.add_argument("--models", default="llama,gpt2")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--speed-copies", default="1,8", help="corpus copies for the latency runs (~1,150 each)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    report = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "models": {}}
    default = IndexSpec(energy=ENERGY.default)
    for family in args.models.split(","):
        print(f"[{family}] workload", file=sys.stderr)
        workload = build_workload(out, family)
        model_dir = out / family / "model"
        print(f"[{family}] quality ({args.queries} queries)", file=sys.stderr)
        entry = {"quality": quality(workload, model_dir, args.queries)}
        print(f"[{family}] speed", file=sys.stderr)
        copies = tuple(int(c) for c in args.speed_copies.split(","))
        entry["speed"] = speed(workload, model_dir, out, default, copies)
        report["models"][family] = entry
        (out / "results.json").write_text(json.dumps(report, indent=2))
    report["projection_7b"] = projection_7b(default)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["projection_7b"], indent=2))


if __name__ == "__main__":
    main()
