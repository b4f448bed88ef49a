"""`influence demo`: the main job on embedded defaults, end to end on one machine.

Builds (or reuses from its cache) a tiny GPT-2 trained on a generated corpus with planted facts,
then runs everything through the embedded service system (embedded Redis, local artifacts,
gRPC services and a worker in this process): registers the corpus, fits EK-FAC factors, scores
the demo queries, and prints each query's most influential training sequences, marking those
that state the queried fact. The share of queries whose top sequence is planted is the demo's
check that the answers are right. It ends by writing the HTML report of the scores
(`influence report`) and printing its path.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..engine.records import read_queries_jsonl, read_training_jsonl
from ..errors import InputError
from .flags import QUIET, Flag, add


def add_demo_flags(parser) -> None:
    add(
        parser,
        Flag("--work-dir", default=".cache/demo", help="where the demo's model and data are cached"),
        Flag("--out", default="demo-out", help="where factors and scores are written"),
        Flag("--seed", type=int, default=0, help="seed of the demo's corpus and model (default: 0)"),
        Flag("--epochs", type=int, default=None, help="training epochs of the demo model (default: the recipe's, 20)"),
        QUIET,
    )


def run_demo(args) -> int:
    from ..toy.demo_data import prepare_demo

    started = time.perf_counter()
    say = _say(args.quiet)
    say(f"[1/4] demo model and corpus in {args.work_dir}")
    settings = {}
    if getattr(args, "epochs", None) is not None:
        if args.epochs < 1:
            raise InputError(f"--epochs must be >= 1, got {args.epochs}")
        settings["epochs"] = args.epochs
    paths = prepare_demo(Path(args.work_dir), seed=args.seed, progress=not args.quiet, **settings)
    summary = fit_score_and_report(paths, Path(args.out), quiet=args.quiet, started=started)
    print(
        f"\n{summary['top1_is_planted']}/{summary['queries']} queries have a planted training sequence (one stating "
        f"the queried fact) as their most influential one, {summary['planted_in_top5']}/{summary['queries']} among "
        f"their top {summary['top_k']} ({summary['seconds']} s). Results in {args.out}/."
    )
    print(f"Report: {summary['report']}")
    return 0


def _say(quiet: bool):
    return (lambda message: None) if quiet else (lambda message: print(message, file=sys.stderr))


def fit_score_and_report(
    paths, out: Path, *, quiet: bool = False, show_queries: bool = True, started: float | None = None
) -> dict:
    """Register, fit and score the demo (`paths` from prepare_demo) through the embedded system.

    Prints each query's top sequences to stdout when `show_queries` (stage messages and bars go to
    stderr unless `quiet`), writes `out`/demo.json and `out`/report.html and returns its summary:
    queries, training_sequences, top1_is_planted, planted_in_top5, top_k, seconds, report (the
    HTML report's absolute path).
    """
    from ..embedded import EmbeddedSystem
    from ..query_svc.report_html import build_report
    from .progress import StageBars, fit_passes

    started = time.perf_counter() if started is None else started
    out.mkdir(parents=True, exist_ok=True)
    say = _say(quiet)
    examples = read_training_jsonl(paths.train_jsonl)
    queries = read_queries_jsonl(paths.queries_jsonl)
    expected = json.loads(Path(paths.expected_json).read_text())
    model = str(Path(paths.model_dir).resolve())

    say("[2/4] starting the embedded system (Redis, local artifacts, gRPC services, a worker)")

    def fit_and_score(client) -> None:
        with StageBars(not quiet) as bars:
            dataset = client.register_dataset(model, paths.train_jsonl, max_length=128, progress=bars)
        shards = f"{dataset.num_shards} shard" + ("s" if dataset.num_shards != 1 else "")
        say(f"[3/4] fitting EK-FAC factors on {dataset.num_examples} training sequences ({shards})")
        with StageBars(not quiet) as bars:
            factor_set = client.fit_factors(model, dataset.name, batch_size=16, progress=bars)
        client.download_factors(factor_set.name, out / "factors")
        say(f"      passes: {fit_passes(out / 'factors')}")
        say(f"[4/4] scoring {len(queries)} queries against {dataset.num_examples} training sequences")
        with StageBars(not quiet) as bars:
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
        if show_queries:
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
        "top_k": len(report["queries"][0]["top"]) if report["queries"] else 0,
        "seconds": round(time.perf_counter() - started, 1),
    }
    page = out / "report.html"
    page.write_text(build_report(out / "scores"), encoding="utf-8")
    summary["report"] = str(page.resolve())
    (out / "demo.json").write_text(json.dumps({"summary": summary, "queries": summary_rows}, indent=2))
    return summary
