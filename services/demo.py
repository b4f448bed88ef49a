"""`influence demo`: the main job on embedded defaults, end to end on one machine.

Builds (or reuses from its cache) a tiny GPT-2 trained on a generated corpus with planted facts,
then runs everything through the embedded service system (embedded Redis, local artifacts,
gRPC services and a worker in this process): registers the corpus, fits EK-FAC factors, scores
the demo queries, and prints each query's most influential training sequences, marking those
that state the queried fact. The share of queries whose top sequence is planted is the demo's
check that the answers are right.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .engine.records import read_queries_jsonl, read_training_jsonl
from .errors import InputError


def run_demo(args) -> int:
    from .progress_bars import StageBars
    from .embedded import EmbeddedSystem
    from .toy.demo_data import prepare_demo

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr))
    say(f"[1/4] demo model and corpus in {args.work_dir}")
    if args.epochs < 1:
        raise InputError(f"--epochs must be >= 1, got {args.epochs}")
    paths = prepare_demo(Path(args.work_dir), seed=args.seed, progress=not args.quiet, epochs=args.epochs)
    examples = read_training_jsonl(paths.train_jsonl)
    queries = read_queries_jsonl(paths.queries_jsonl)
    expected = json.loads(Path(paths.expected_json).read_text())
    model = str(Path(paths.model_dir).resolve())

    say("[2/4] starting the embedded system (Redis, local artifacts, gRPC services, a worker)")

    def fit_and_score(client) -> None:
        with StageBars(not args.quiet) as bars:
            dataset = client.register_dataset(model, paths.train_jsonl, max_length=128, progress=bars)
        shards = f"{dataset.num_shards} shard" + ("s" if dataset.num_shards != 1 else "")
        say(f"[3/4] fitting EK-FAC factors on {dataset.num_examples} training sequences ({shards})")
        with StageBars(not args.quiet) as bars:
            factor_set = client.fit_factors(model, dataset.name, batch_size=16, progress=bars)
        client.download_factors(factor_set.name, out / "factors")
        say(f"[4/4] scoring {len(queries)} queries against {dataset.num_examples} training sequences")
        with StageBars(not args.quiet) as bars:
            result = client.compute_scores(
                model,
                factor_set.name,
                dataset.name,
                queries,
                progress=bars,
                batch_size=16,
                top_k=5,
                per_module=True,
                per_token=True,
            )
        client.download_result(result.name, out / "scores")

    with EmbeddedSystem(foreground=True) as system:
        system.run(fit_and_score)
    report = json.loads((out / "scores" / "results.json").read_text())

    hits_at_1 = hits_in_top = 0
    summary_rows = []
    for query in report["queries"]:
        wanted = set(expected.get(query["id"], []))
        top = query["top"]
        hits_at_1 += bool(top) and top[0]["id"] in wanted
        hits_in_top += any(entry["id"] in wanted for entry in top)
        print(f"\nQuery {query['id']}: {query['prompt']!r} -> {query['completion']!r}")
        for entry in top[:3]:
            mark = "planted" if entry["id"] in wanted else "       "
            print(f"  {entry['rank']}. [{mark}] {entry['score']:+10.3f}  {entry['id']}: {entry['text'][:90]}")
        summary_rows.append({"id": query["id"], "expected": sorted(wanted), "top": [e["id"] for e in top]})
    summary = {
        "queries": len(report["queries"]),
        "training_sequences": len(examples),
        "top1_is_planted": hits_at_1,
        "planted_in_top5": hits_in_top,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "demo.json").write_text(json.dumps({"summary": summary, "queries": summary_rows}, indent=2))
    print(
        f"\n{hits_at_1}/{len(report['queries'])} queries have a planted training sequence (one stating the "
        f"queried fact) as their most influential one, {hits_in_top}/{len(report['queries'])} among their top "
        f"{len(report['queries'][0]['top']) if report['queries'] else 0} ({summary['seconds']} s). "
        f"Results in {out}/."
    )
    return 0
