"""Score files for every setting the tool offers (and the baselines beside it), on a ground truth's model.

    nice -n 19 .venv/bin/python bench/lds/settings.py [--truth DIR] [--only NAME,...] [--modules M]
        [--filter-k 20,50,100] [--threads 1]
    .venv/bin/python bench/lds/evaluate.py DIR/scores/ekfac-d0.1.safetensors DIR/scores/*.safetensors

Writes DIR/scores/NAME.safetensors (`scores` [Q, N], metadata `seconds`: the setting's scoring
time, plus its fit's for the settings that fit their own factors) for:

    ekfac-dF            EK-FAC, damping F x mean eigenvalue (today's default F = 0.1)
    kfac-d0.1, identity the other curvatures (identity: plain gradient dot products)
    bm25                BM25 over tokens alone (engine/lexical.py's scores; no model)
    tfidf-K-ekfac       TF-IDF pre-filter (--tfidf K) then EK-FAC at the default damping
    bm25-K-ekfac        BM25 pre-filter (--bm25 K) then EK-FAC at the default damping
    index-P-rescore-K   the index (projection P at the options' defaults), K candidates rescored
                        exactly (0: the index's own scores)
    index-P-rescore-K-bm25-L  the same, each query's L BM25 candidates merged with the index's K
                        before rescoring (--lexical L); prints what each source held of its final top-10
                        and, where ekfac-d0.1 was scored, of the exact top-10
    index-compact-rescore-K   the compact index of issue 24 named in full, whatever the options'
                        defaults are: svd rank <= 16, int8, energy 0.95
    index-svd16-bf16-rescore-K  the index before issue 24: svd rank 16, bfloat16, every pair (energy 1)

through the engine's in-process API, on the recipe's settings (batch 16, max length 128, MLP
modules unless --modules names others: `influence fit --modules`), exactly what `influence score`
computes for each flag. The ground truth and the model's directory are ground_truth.py's (DIR,
default bench/out/lds/demo-seed0; bench/out/lds/small-llama-seed0 for the second model), or
low_overlap.py's (a model and corpus, no retrained subsets).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from metrics import DEFAULT_TRUTH  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from services.engine.data import tokenize_queries  # noqa: E402
from services.engine.fit import FitConfig, fit_factors  # noqa: E402
from services.engine.index import Indexer, IndexSpec, block_bytes  # noqa: E402
from services.engine.index_scan import score_index_shard  # noqa: E402
from services.engine.lexical import bm25_scores  # noqa: E402
from services.engine.model_io import load_model_and_tokenizer  # noqa: E402
from services.engine.records import read_queries_jsonl, read_training_jsonl  # noqa: E402
from services.engine.score import ScoreConfig, Scorer, mean_length, score_in_memory  # noqa: E402
from services.engine.two_stage import contributions, merged, recall, top_candidates, two_stage  # noqa: E402

BATCH, MAX_LENGTH = 16, 128
DAMPINGS = (0.001, 0.01, 0.1, 1.0)
FILTER_K = (20, 50, 100)
COMPACT = IndexSpec("svd", rank=16, storage_dtype="int8", energy=0.95)  # issue 24's compact index
SVD16_BF16 = IndexSpec("svd", rank=16, storage_dtype="bfloat16", energy=1.0)  # the index before issue 24
# name prefix -> (spec, rescore, lexical): lexical > 0 merges each query's BM25 candidates (--lexical)
INDEX = (
    ("index-svd", IndexSpec("svd"), 0, 0),
    ("index-svd", IndexSpec("svd"), 20, 0),
    ("index-svd", IndexSpec("svd"), 100, 0),
    ("index-random", IndexSpec("random"), 20, 0),
    ("index-svd", IndexSpec("svd"), 20, 20),
    ("index-svd", IndexSpec("svd"), 20, 100),
    ("index-random", IndexSpec("random"), 20, 20),
    ("index-random", IndexSpec("random"), 20, 100),
    ("index-compact", COMPACT, 0, 0),
    ("index-compact", COMPACT, 20, 0),
    ("index-compact", COMPACT, 100, 0),
    ("index-svd16-bf16", SVD16_BF16, 0, 0),
    ("index-svd16-bf16", SVD16_BF16, 100, 0),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--truth", type=Path, default=DEFAULT_TRUTH)
    parser.add_argument("--only", help="comma-separated setting names (default: all)")
    parser.add_argument("--modules", default="mlp", help="the modules fitted and scored (influence fit --modules)")
    parser.add_argument("--filter-k", default=",".join(map(str, FILTER_K)), help="the K of the lexical filters")
    parser.add_argument("--threads", type=int, default=1, help="one: on a shared, busy host it wastes no waits")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    filter_k = [int(k) for k in args.filter_k.split(",")]
    demo = args.truth / "demo"
    out = args.truth / "scores"
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer(demo / "model")
    examples = read_training_jsonl(demo / "TRAIN.jsonl")
    queries = read_queries_jsonl(demo / "QUERIES.jsonl")
    only = set(args.only.split(",")) if args.only else None

    def save(name: str, scores: torch.Tensor, seconds: float, scored: torch.Tensor | None = None) -> None:
        tensors = {"scores": scores.to(torch.float32).contiguous()}
        if scored is not None:  # a lexical filter's candidates, as `influence score` writes them
            tensors["scored"] = scored.contiguous()
        save_file(
            tensors,
            str(out / f"{name}.safetensors"),
            metadata={"seconds": f"{seconds:.2f}"},
        )
        print(f"{name:24s} {seconds:7.1f} s", flush=True)

    fitted: dict[str, tuple[object, float]] = {}

    def factors(strategy: str):
        if strategy not in fitted:
            print(f"fitting {strategy} factors", flush=True)
            started = time.perf_counter()
            fitted[strategy] = (
                fit_factors(
                    model,
                    tokenizer,
                    examples,
                    FitConfig(strategy=strategy, modules=args.modules, batch_size=BATCH, max_length=MAX_LENGTH),
                ),
                time.perf_counter() - started,
            )
        return fitted[strategy]

    def scored(name: str, strategy: str, **config) -> None:
        if only and name not in only:
            return
        factor_set, fit_seconds = factors(strategy)
        started = time.perf_counter()
        scorer = Scorer(model, tokenizer, factor_set, ScoreConfig(batch_size=BATCH, max_length=MAX_LENGTH, **config))
        scored = score_in_memory(scorer, queries, scorer.tokenize_training(examples))
        save(name, scored.result.scores, fit_seconds + time.perf_counter() - started, scored.mask)

    for factor in DAMPINGS:
        scored(f"ekfac-d{factor:g}", "ekfac", damping_factor=factor)
    scored("kfac-d0.1", "kfac")
    scored("identity", "identity")
    for k in filter_k:
        scored(f"tfidf-{k}-ekfac", "ekfac", tfidf=k)
        scored(f"bm25-{k}-ekfac", "ekfac", bm25=k)
    if not only or "bm25" in only:
        started = time.perf_counter()
        training = Scorer(model, tokenizer, factors("ekfac")[0], ScoreConfig(max_length=MAX_LENGTH))
        sequences = training.tokenize_training(examples)
        save(
            "bm25",
            bm25_scores(tokenize_queries(tokenizer, queries, MAX_LENGTH), sequences),
            time.perf_counter() - started,
        )
    built: dict[IndexSpec, tuple] = {}

    def index_of(spec: IndexSpec) -> tuple:
        """(indexer, sequences, index scores [Q, N] float64, prepared queries, seconds), built once per
        spec: the settings that differ only in rescoring share one build (each is charged its time)."""
        if spec not in built:
            started = time.perf_counter()
            config = ScoreConfig(batch_size=BATCH, max_length=MAX_LENGTH)
            indexer = Indexer(model, tokenizer, factors("ekfac")[0], spec, config)
            sequences = indexer.scorer.tokenize_training(examples)
            index_queries, prepared = indexer.query_side(queries, mean_length(sequences))
            blocks = list(indexer.blocks(sequences))
            shard = score_index_shard(index_queries, blocks)
            index_scores = torch.zeros(len(queries), len(sequences), dtype=torch.float64)
            index_scores[:, shard.index.long()] = shard.scores
            seconds = time.perf_counter() - started
            stored = sum(block_bytes(block) for block in blocks) / len(sequences)
            print(f"index {spec}: {stored:,.0f} bytes per sequence, built and scanned in {seconds:.1f} s", flush=True)
            built[spec] = (indexer, sequences, index_scores, prepared, seconds)
        return built[spec]

    for prefix, spec, rescore, lexical in INDEX:
        name = f"{prefix}-rescore-{rescore}" + (f"-bm25-{lexical}" if lexical else "")
        if only and name not in only:
            continue
        fit_seconds = factors("ekfac")[1]
        indexer, sequences, index_scores, prepared, index_seconds = index_of(spec)
        started = time.perf_counter() - index_seconds
        sources = {"index": top_candidates(index_scores, rescore)}
        if lexical:
            sources["lexical"] = indexer.scorer.lexical_candidates("bm25", queries, sequences, lexical)
        candidates = merged(*sources.values())
        result, _ = two_stage(indexer.scorer, prepared, index_scores, candidates, sequences.__getitem__)
        save(name, result.scores, fit_seconds + time.perf_counter() - started)
        if lexical:
            exact = out / "ekfac-d0.1.safetensors"  # the exact top-10, where that setting was scored
            truth = torch.topk(load_file(str(exact))["scores"], 10).indices.tolist() if exact.exists() else None
            for source, share in contributions({**sources, "union": candidates}, result.top).items():
                found = sources.get(source, candidates)
                print(
                    f"    {source:8s} {share['candidates']:5d} candidates, {share['recall']:.3f} of the final top-10"
                    + (f", {recall(found, truth):.3f} of the exact top-10" if truth else ""),
                    flush=True,
                )


if __name__ == "__main__":
    main()
