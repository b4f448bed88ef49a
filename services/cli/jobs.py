"""The jobs of the command line: `influence fit`, `score`, `self` (each through the service
system: an embedded one started for the command, or a deployed one with --server) and `report`
(the HTML report of a result directory).

Inputs are read and validated locally first, so an error names the user's file and line; then
the data is uploaded, the job runs as an operation with progress bars, and the outputs are
downloaded into --out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..engine.records import read_queries_jsonl
from ..enums import enum_word
from ..errors import InputError, NotFoundError
from ..gen.influence.v1 import factor_service_pb2
from ..options import FISHER, MAX_EXAMPLES, MODULES, QUERY_RANK, RESCORE, SEED, STRATEGY, TFIDF, TOP_K
from .flags import DATA, FACTORS, JSON, QUIET, Flag, add, add_damping_flags, add_model_job_flags
from .inputs import check_data, check_factors, factor_set_name, index_name, model_of, register, score_config
from .running import done, out_dir, progress_for, through_system

RESULT_OUT = Flag("--out", required=True, help="output directory: scores.safetensors, results.json")


def add_fit_flags(parser) -> None:
    add_model_job_flags(parser)
    add(
        parser,
        DATA,
        Flag("--out", required=True, help="output directory for the factors"),
        STRATEGY,
        FISHER,
        MODULES,
        MAX_EXAMPLES,
        SEED,
        Flag(
            "--cache-gib",
            type=float,
            default=None,
            help="at most this much memory (GiB) kept of the covariance pass for the correction pass, within "
            "the worker's budget (default: the worker's budget, 1/4 of its memory limit; 0: recompute instead)",
        ),
    )


def add_score_flags(parser) -> None:
    add_model_job_flags(parser)
    add(
        parser,
        FACTORS,
        Flag("--data", default=None, help="TRAIN.jsonl (not with --index: the index holds its data)"),
        Flag("--queries", required=True, help='QUERIES.jsonl: {"id", "prompt", "completion"} per line'),
        RESULT_OUT,
        TOP_K,
    )
    add_damping_flags(parser)
    add(
        parser,
        QUERY_RANK,
        Flag("--per-module", action="store_true", help="layer-wise breakdown of every score"),
        Flag("--per-token", action="store_true", help="token-wise attribution of the top-k sequences"),
        Flag("--index", default=None, help="score against this index directory (influence index build)"),
        Flag(
            "--rescore",
            type=int,
            default=None,
            help=f"with --index: candidates per query rescored exactly (default {RESCORE.default}; 0: none)",
        ),
        TFIDF,
        Flag("--report", default=None, metavar="REPORT.html", help="also write the HTML report here"),
    )


def add_self_flags(parser) -> None:
    add_model_job_flags(parser)
    add(parser, FACTORS, DATA, RESULT_OUT, TOP_K)
    add_damping_flags(parser)


def add_report_flags(parser) -> None:
    add(
        parser,
        Flag("--results", required=True, help="a result directory (written by `influence score`)"),
        Flag("--out", required=True, help="the HTML file to write (self-contained)"),
        QUIET,
        JSON,
    )


def run_fit(args) -> int:
    from ..engine.fit import FitConfig

    config = FitConfig(
        strategy=args.strategy,
        fisher=args.fisher,
        modules=args.modules,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_examples=args.max_examples,
        seed=args.seed,
        cache_gib=args.cache_gib,
    )
    config.validate()
    check_data(args.data)
    out = out_dir(args.out)
    model = model_of(args)
    started = time.perf_counter()
    with progress_for(args) as bars:

        def fit(client):
            dataset = register(client, args, model, bars)
            factor_set = client.fit_factors(
                model,
                dataset,
                progress=bars,
                strategy=config.strategy,
                fisher=config.fisher,
                modules=config.modules,
                batch_size=config.batch_size,
                max_examples=config.max_examples or 0,
                seed=config.seed,
                cache_gib=config.cache_gib,
            )
            client.download_factors(factor_set.name, out)
            return factor_set

        factor_set = through_system(args, fit)
    timings = json.loads((out / "manifest.json").read_text())["metadata"].get("provenance", {}).get("timings") or {}
    steps = ", ".join(f"{step} {seconds:.1f}s" for step, seconds in timings.items())
    strategy = enum_word(factor_service_pb2.Strategy, factor_set.strategy)
    seconds = time.perf_counter() - started
    done(
        args,
        f"fitted {strategy} factors for {len(factor_set.modules)} modules on {factor_set.num_sequences} "
        f"sequences ({factor_set.num_tokens} tokens) in {seconds:.1f}s"
        + (f" ({steps})" if steps else "")
        + f" -> {out}",
        factor_set=factor_set.name,
        strategy=strategy,
        modules=len(factor_set.modules),
        sequences=factor_set.num_sequences,
        tokens=factor_set.num_tokens,
        seconds=round(seconds, 3),
        out=str(out),
    )
    return 0


def run_score(args) -> int:
    config = score_config(
        args, query_rank=args.query_rank, per_module=args.per_module, per_token=args.per_token, tfidf=args.tfidf
    )
    queries = read_queries_jsonl(args.queries)
    if args.index:
        if args.data or args.tfidf:
            raise InputError("--index holds its own data: give neither --data nor --tfidf with it")
        if not (Path(args.index) / "manifest.json").is_file():
            raise NotFoundError(f"no index at {args.index} (missing manifest.json)")
    elif not args.data:
        raise InputError("give --data TRAIN.jsonl (or --index INDEX_DIR)")
    else:
        check_data(args.data)
    if args.rescore is not None and (args.rescore < 0 or not args.index):
        raise InputError("--rescore takes a count >= 0, with --index")
    if args.report and Path(args.report).is_dir():
        raise InputError(f"--report {args.report} is a directory; give a file name such as report.html")
    check_factors(args)
    out = out_dir(args.out)
    model = model_of(args)
    started = time.perf_counter()
    with progress_for(args) as bars:

        def score(client):
            factor_set = factor_set_name(client, args)
            if args.index:
                dataset = ""
                options = {"index": index_name(client, args, Path(args.index)), "rescore": args.rescore}
            else:
                dataset = register(client, args, model, bars)
                options = {"tfidf": config.tfidf}
            result = client.compute_scores(
                model,
                factor_set,
                dataset,
                queries,
                progress=bars,
                damping=config.damping,
                damping_factor=config.damping_factor,
                query_rank=config.query_rank or 0,
                top_k=config.top_k,
                per_module=config.per_module,
                per_token=config.per_token,
                batch_size=config.batch_size,
                **options,
            )
            client.download_result(result.name, out)
            return result

        result = through_system(args, score)
    seconds = time.perf_counter() - started
    report = _write_report(args, out, Path(args.report)) if args.report else None
    done(
        args,
        f"scored {result.num_queries} queries x {result.num_train} sequences in {seconds:.1f}s -> {out}"
        + (f"; report -> {report}" if report else ""),
        result=result.name,
        queries=result.num_queries,
        sequences=result.num_train,
        seconds=round(seconds, 3),
        out=str(out),
        report=str(report) if report else None,
    )
    return 0


def _write_report(args, results: Path, path: Path) -> Path:
    from ..query_svc.report_html import build_report

    if path.is_dir():
        raise InputError(f"--report {path} is a directory; give a file name such as report.html")
    page = build_report(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def run_report(args) -> int:
    """`influence report`: the HTML report of a result directory (results.json + scores.safetensors)."""
    path = _write_report(args, Path(args.results), Path(args.out))
    done(args, f"report -> {path}", report=str(path), bytes=path.stat().st_size)
    return 0


def run_self(args) -> int:
    config = score_config(args)
    check_data(args.data)
    check_factors(args)
    out = out_dir(args.out)
    model = model_of(args)
    with progress_for(args) as bars:

        def self_influence(client):
            factor_set = factor_set_name(client, args)
            dataset = register(client, args, model, bars)
            result = client.compute_self_influence(
                model,
                factor_set,
                dataset,
                progress=bars,
                damping=config.damping,
                damping_factor=config.damping_factor,
                top_k=config.top_k,
                batch_size=config.batch_size,
            )
            client.download_result(result.name, out)
            return result

        result = through_system(args, self_influence)
    done(
        args,
        f"self-influence of {result.num_train} sequences -> {out}",
        result=result.name,
        sequences=result.num_train,
        out=str(out),
    )
    return 0
