"""The index's Pareto frontier: bytes per sequence against recall@100 and Spearman, on one pass.

    .venv/bin/python bench/index_frontier.py --model llama --out bench/out/frontier
    .venv/bin/python bench/index_frontier.py --model smollm2 --out bench/out/frontier --sequences 256

One forward+backward pass over the corpus captures every batch once; each batch is compressed at
the largest rank of the grid (the randomized SVD of its whitened gradients, as the build does) and
then packed once per setting (rank selection by energy share and byte budget, storage dtype:
engine/index.py `pack_batch`), and scored against the setting's queries (index_scan). So every
setting of the frontier is exactly the index `influence index build` would write with it, without
one build per setting. Beside them, a TrackStar-style baseline: per module, k x k Gaussian
projections of the raw (unwhitened) gradient, fp16, the sequence's vector unit-normalised, and
the same for the raw query gradient (cosine scores), at k = 16 (as a peer ships it) and at the k
whose bytes match the compact default.

Reference: exact EK-FAC scores of every query against every sequence (compute_scores). Metrics per
setting: mean stored bytes per sequence, x smaller than the exact float32 whitened gradient,
Spearman and top-10 overlap against exact, recall@100 (the share of the exact top-10 inside the
index's top 100) and recall@1% of the corpus. Results: OUT/{model}/frontier.json and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_index import build_workload, examples_of, queries_of, spearman  # noqa: E402

from services.engine.device import exact_arithmetic  # noqa: E402
from services.engine.fit import FitConfig, fit_factors  # noqa: E402
from services.engine.index import (  # noqa: E402
    Indexer,
    IndexSpec,
    ModuleIndexer,
    SvdFactors,
    block_bytes,
    pack_batch,
    randomized_svd,
)
from services.engine.index_scan import score_block  # noqa: E402
from services.engine.model_io import load_model_and_tokenizer  # noqa: E402
from services.engine.passes import captured_batches  # noqa: E402
from services.engine.precondition import Preconditioner  # noqa: E402
from services.engine.rotation import rotated_per_sequence_gradients  # noqa: E402
from services.engine.score import ScoreConfig, compute_scores  # noqa: E402

ENERGIES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)


def grid(rank: int, reference_bytes: int) -> list[IndexSpec]:
    """Settings of at most `rank` pairs per module: fixed ranks (bf16 and int8), energy shares
    (int8), and byte budgets (int8, energy 1 and 0.9) at 1/4, 1/8 and 1/16 of `reference_bytes`
    (the rank-`rank` bf16 index, the default before issue 24)."""
    specs = [IndexSpec("svd", rank=r, storage_dtype=d) for r in (4, 8, rank) for d in ("bfloat16", "int8")]
    specs += [IndexSpec("svd", rank=rank, storage_dtype="int8", energy=e) for e in ENERGIES[1:]]
    return specs + [
        IndexSpec("svd", rank=rank, storage_dtype="int8", energy=energy, budget=reference_bytes // divisor)
        for divisor in (4, 8, 16)
        for energy in (1.0, 0.9)
    ]


def whitened_gradients(module: ModuleIndexer, capture) -> torch.Tensor:
    """The batch's whitened per-sequence gradients W [B, d_out, d_in], as ModuleIndexer.compress
    forms them before its randomized SVD (the exact `none` index: equal to recompute, BENCHMARKS)."""
    basis = (None, None)
    if module.has_basis:
        dtype = capture.a.dtype
        basis = (module.curvature.gradient_basis.to(dtype), module.curvature.activation_basis.to(dtype))
    return module._whitened(rotated_per_sequence_gradients(capture, *basis))


def label(spec: IndexSpec) -> str:
    text = f"svd R<={spec.rank} {spec.storage_dtype}"
    if spec.energy < 1:
        text += f" energy {spec.energy}"
    if spec.budget:
        text += f" budget {spec.budget:,} B"
    return text


def metrics(scores: torch.Tensor, exact: torch.Tensor) -> dict:
    n_queries, n_train = exact.shape
    one_percent = max(10, math.ceil(0.01 * n_train))
    rows = []
    for query in range(n_queries):
        truth = set(torch.topk(exact[query], 10).indices.tolist())
        ranked = torch.topk(scores[query], min(100, n_train)).indices.tolist()
        rows.append(
            {
                "spearman": spearman(scores[query], exact[query]),
                "top10_overlap": len(truth & set(ranked[:10])) / 10,
                "recall_at_100": len(truth & set(ranked)) / 10,
                "recall_at_1pct": len(truth & set(ranked[:one_percent])) / 10,
            }
        )
    return {key: round(sum(row[key] for row in rows) / len(rows), 4) for key in rows[0]}


def generated_examples(data: dict, count: int) -> list:
    """`count` training sequences for a toy model: the workload's planted-facts corpus generated
    again with the same seed, facts and vocabulary, with more filler sequences (the workload's own
    texts among them; the model was trained on those only). At least the workload's size."""
    from services.engine.records import TrainingExample
    from services.toy.corpus import generate_corpus

    extra = max(0, count - len(data["texts"]))
    corpus = generate_corpus(0, num_entities=60, num_queries=48, num_filler_sequences=300 + extra, mentions_per_fact=4)
    known = {word for text in data["texts"] for word in text.split()}
    texts = [sequence.text for sequence in corpus.training]
    unknown = {word for text in texts for word in text.split()} - known
    if unknown:
        raise SystemExit(f"the generated corpus has words the model's tokenizer lacks: {sorted(unknown)[:5]}")
    return [TrainingExample(f"g{i}", text) for i, text in enumerate(texts)]


def workload(args) -> tuple:
    """(model, tokenizer, factors, examples, queries, batch size, max length)."""
    from services.engine.factor_io import from_artifact, to_artifact
    from services.engine.records import read_queries_jsonl, read_training_jsonl

    out = Path(args.out) / args.model
    out.mkdir(parents=True, exist_ok=True)
    if args.model == "smollm2":
        from real_model import write_corpus

        write_corpus(out, args.sequences, args.queries)
        model, tokenizer = load_model_and_tokenizer(args.smollm2)
        examples, queries = read_training_jsonl(out / "train.jsonl"), read_queries_jsonl(out / "queries.jsonl")
        batch, max_length = 8, 128
    else:
        data = build_workload(Path(args.out), args.model, epochs=args.epochs)
        model, tokenizer = load_model_and_tokenizer(Path(args.out) / args.model / "model")
        examples, queries = examples_of(data), queries_of(data, args.queries)
        if args.train_sequences:
            examples = generated_examples(data, args.train_sequences)
        batch, max_length = 16, 512
    factor_dir = Path(args.factors) if args.factors else out / "factors"
    if not (factor_dir / "metadata.json").is_file():
        from safetensors.torch import save_file

        started = time.perf_counter()
        fit_on = examples[: args.fit_sequences] if args.fit_sequences else examples
        fitted = fit_factors(model, tokenizer, fit_on, FitConfig(batch_size=batch, max_length=max_length))
        print(f"fit {time.perf_counter() - started:.0f} s", file=sys.stderr)
        metadata, files = to_artifact(fitted)
        factor_dir.mkdir(parents=True, exist_ok=True)
        for name, tensors in files.items():
            save_file(tensors, str(factor_dir / name))
        (factor_dir / "metadata.json").write_text(json.dumps(metadata))
    from safetensors.torch import load_file

    metadata = json.loads((factor_dir / "metadata.json").read_text())
    factors = from_artifact(metadata, lambda name: load_file(str(factor_dir / name)))
    return model, tokenizer, factors, examples, queries, batch, max_length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama", choices=("llama", "gpt2", "smollm2"))
    parser.add_argument("--out", default=str(HERE / "out" / "frontier"))
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--sequences", type=int, default=256, help="smollm2: corpus size")
    parser.add_argument("--smollm2", default="/work/models/smollm2/model")
    parser.add_argument("--factors", default="", help="a factor directory to reuse (metadata.json + files)")
    parser.add_argument(
        "--train-sequences", type=int, default=0, help="toys: score a generated corpus of this many sequences"
    )
    parser.add_argument(
        "--fit-sequences", type=int, default=0, help="fit the factors on the first N sequences (0: all)"
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--exact-in-pass",
        action="store_true",
        help="exact scores from the pass's whitened gradients (the `none` index) instead of a recompute pass",
    )
    parser.add_argument("--energies", default="", help="only int8 settings at these energy shares, no baseline")
    parser.add_argument("--epochs", type=int, help="toys: training epochs (default: the recipe's, 30)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer, factors, examples, queries, batch, max_length = workload(args)
    config = ScoreConfig(batch_size=batch, max_length=max_length)
    report = {"model": args.model, "sequences": len(examples), "queries": len(queries), "date": time.strftime("%F")}
    exact = None
    if not args.exact_in_pass:
        started = time.perf_counter()
        exact = compute_scores(model, tokenizer, factors, examples, queries, config).scores.double()
        report["recompute_seconds"] = round(time.perf_counter() - started, 1)
        print(f"exact scores {report['recompute_seconds']} s", file=sys.stderr)

    cap = Indexer(model, tokenizer, factors, IndexSpec("svd", rank=args.rank, query_rank=16), config)
    full_bytes = IndexSpec("none", storage_dtype="float32").bytes_per_sequence(factors.modules)
    rank16_bf16 = IndexSpec("svd", rank=args.rank, storage_dtype="bfloat16").bytes_per_sequence(factors.modules)
    specs = grid(args.rank, rank16_bf16)
    if args.energies:  # only these energy shares (int8), without the baseline: the large-N checks
        specs = [
            IndexSpec("svd", rank=args.rank, storage_dtype="int8", energy=float(e)) for e in args.energies.split(",")
        ]
    started = time.perf_counter()
    index_queries = cap.queries(queries)
    if args.exact_in_pass:  # the exact whitened queries: ⟨W_q, W_m⟩ over modules is the exact EK-FAC score
        whole = Indexer(model, tokenizer, factors, IndexSpec("svd", rank=args.rank, query_rank=None), config)
        exact_queries = {name: parts["w"].flatten(1) for name, parts in whole.queries(queries).items()}
        exact = torch.zeros(len(queries), len(examples), dtype=torch.float64)
    report["query_side_seconds"] = round(time.perf_counter() - started, 1)
    # TrackStar-style: k x k projections of raw gradients, fp16, unit-normalised per sequence
    track_ks = sorted({16, max(1, round(math.sqrt(rank16_bf16 / 4 / 2 / len(factors.modules))))})  # 1/4: the target
    if args.energies:
        track_ks = []
    trackers = {
        k: {
            name: ModuleIndexer(
                factors.modules[name],
                factors.factors[name],
                Preconditioner(None),  # no curvature: the raw gradient
                IndexSpec("random", dim=k),
            )
            for name in cap.scorer.names
        }
        for k in track_ks
    }
    query_factors = cap.scorer.query_factors(queries)
    track_queries = {}
    for k, modules in trackers.items():
        parts = [
            (m.project_s @ query_factors[name].gradients().float() @ m.project_a.T).flatten(1)
            for name, m in modules.items()
        ]
        vectors = torch.cat(parts, 1)
        track_queries[k] = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-30)
    del query_factors

    n_queries, n_train = len(queries), len(examples)
    scores = {label(spec): torch.zeros(n_queries, n_train, dtype=torch.float64) for spec in specs}
    stored = dict.fromkeys(scores, 0)
    track_scores = {k: torch.zeros(n_queries, n_train, dtype=torch.float64) for k in track_ks}
    sequences = cap.scorer.tokenize_training(examples)
    started = time.perf_counter()
    with exact_arithmetic():
        for batch_data, captures in captured_batches(
            model, cap.scorer.modules, sequences, batch_size=batch, pad_token_id=cap.scorer.pad_token_id, stage="index"
        ):
            indices = batch_data.indices
            if args.exact_in_pass:
                parts = {}
                for name, module in cap.modules.items():
                    whitened = whitened_gradients(module, captures[name])  # [B, d_out, d_in]
                    exact[:, indices] += (exact_queries[name] @ whitened.flatten(1).T).double()
                    u, v = randomized_svd(whitened, args.rank, module.test_matrix)
                    parts[name] = SvdFactors(u, v, whitened.square().sum((1, 2)))
            else:
                parts = {name: module.compress(captures[name]) for name, module in cap.modules.items()}
            for spec in specs:
                block = pack_batch(parts, spec)
                scores[label(spec)][:, indices] = score_block(index_queries, block).double()
                stored[label(spec)] += block_bytes(block)
            for k, modules in trackers.items():
                vectors = (
                    torch.cat([m.compress(captures[name])["w"].flatten(1) for name, m in modules.items()], 1)
                    .half()
                    .float()
                )
                vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-30)
                track_scores[k][:, indices] = (track_queries[k] @ vectors.T).double()
    report["pass_seconds"] = round(time.perf_counter() - started, 1)
    rows = []
    for spec in specs:
        name = label(spec)
        per_sequence = stored[name] / n_train
        row = {
            "setting": name,
            "bytes_per_sequence": round(per_sequence),
            "smaller": round(full_bytes / per_sequence, 1),
        }
        row.update(metrics(scores[name], exact))
        rows.append(row)
    for k in track_ks:
        per_sequence = len(factors.modules) * k * k * 2
        row = {
            "setting": f"TrackStar-style {k}x{k} per module, fp16, unit-normalised raw gradients",
            "bytes_per_sequence": per_sequence,
            "smaller": round(full_bytes / per_sequence, 1),
        }
        row.update(metrics(track_scores[k], exact))
        rows.append(row)
    report["full_gradient_bytes"] = full_bytes
    report["rows"] = rows
    out = Path(args.out) / args.model
    (out / "frontier.json").write_text(json.dumps(report, indent=2))
    print("| setting | B/seq | x smaller | Spearman | top-10 | recall@100 | recall@1% |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['setting']} | {row['bytes_per_sequence']:,} | {row['smaller']} | {row['spearman']:.3f} | "
            f"{row['top10_overlap']:.2f} | {row['recall_at_100']:.3f} | {row['recall_at_1pct']:.3f} |"
        )
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))


if __name__ == "__main__":
    main()
