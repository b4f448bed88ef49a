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
from ..errors import InputError, NotFoundError, PreconditionError
from ..gen.influence.v1 import factor_service_pb2
from ..options import (
    BM25,
    BOTTOM_K,
    FISHER,
    LEXICAL,
    MAX_EXAMPLES,
    MODULES,
    QUERY_RANK,
    RESCORE,
    SEED,
    STRATEGY,
    TFIDF,
    TOP_K,
)
from .flags import CORPUS, DATA, FACTORS, JSON, QUIET, Flag, add, add_damping_flags, add_model_job_flags
from .inputs import (
    check_data,
    check_factors,
    factor_set_name,
    index_name,
    model_of,
    record_inputs,
    register,
    score_config,
)
from .progress import fit_passes
from .running import done, out_dir, out_file, progress_for, through_system

RESULT_OUT = Flag("--out", required=True, help="output directory: scores.safetensors, results.json")


def add_fit_flags(parser) -> None:
    add_model_job_flags(parser)
    add(
        parser,
        DATA.replace(required=False),
        *CORPUS,
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
        DATA.replace(
            required=False, help="the training data, as fit takes it (not with --index: the index holds its data)"
        ),
        *CORPUS,
        Flag(
            "--queries",
            required=True,
            help='QUERIES.jsonl: {"id", "prompt", "completion"} or {"id", "messages": [...]} (the last, '
            "assistant, turn the completion) per line",
        ),
        RESULT_OUT,
        TOP_K,
        BOTTOM_K,
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
        LEXICAL,
        TFIDF,
        BM25,
        Flag(
            "--damping-check",
            action="store_true",
            help="also rank at 0.1x and 10x the damping (same pass) and report each query's top-k overlap",
        ),
        Flag("--report", default=None, metavar="REPORT.html", help="also write the HTML report here"),
    )


def add_self_flags(parser) -> None:
    add_model_job_flags(parser)
    add(parser, FACTORS, DATA.replace(required=False), *CORPUS, RESULT_OUT, TOP_K)
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
    check_data(args)
    out = out_dir(args.out, args)
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
    provenance = json.loads((out / "manifest.json").read_text())["metadata"].get("provenance", {})
    coverage = provenance.get("coverage") or {}
    steps = fit_passes(out)
    strategy = enum_word(factor_service_pb2.Strategy, factor_set.strategy)
    seconds = time.perf_counter() - started
    done(
        args,
        f"fitted {strategy} factors for {len(factor_set.modules)} modules on {factor_set.num_sequences} "
        f"sequences ({factor_set.num_tokens} tokens) in {seconds:.1f}s"
        + (f" ({steps})" if steps else "")
        + f" -> {out}"
        + (f"\n{coverage['summary']}" if coverage else ""),
        factor_set=factor_set.name,
        strategy=strategy,
        modules=len(factor_set.modules),
        sequences=factor_set.num_sequences,
        tokens=factor_set.num_tokens,
        seconds=round(seconds, 3),
        out=str(out),
        coverage=coverage,
    )
    return 0


def run_score(args) -> int:
    config = score_config(
        args,
        query_rank=args.query_rank,
        per_module=args.per_module,
        per_token=args.per_token,
        tfidf=args.tfidf,
        bm25=args.bm25,
        damping_check=args.damping_check,
        bottom_k=args.bottom_k,
    )
    queries = read_queries_jsonl(args.queries)
    if args.index:
        if args.data or args.tokens or args.tfidf or args.bm25:
            raise InputError("--index holds its own data: give neither --data, --tokens nor --tfidf/--bm25 with it")
        if args.damping_check:
            raise InputError("--damping-check needs recompute scoring (--data): an index is whitened at one damping")
        if not (Path(args.index) / "manifest.json").is_file():
            raise NotFoundError(f"no index at {args.index} (missing manifest.json)")
    elif not (args.data or args.tokens):
        raise InputError("give --data TRAIN.jsonl (or --tokens DIR, or --index INDEX_DIR)")
    else:
        check_data(args)
    if args.rescore is not None and (args.rescore < 0 or not args.index):
        raise InputError("--rescore takes a count >= 0, with --index")
    LEXICAL.check(args.lexical)
    if args.lexical and not args.index:
        raise InputError("--lexical adds BM25 candidates to an index query's: give it with --index (--bm25 filters)")
    report_path = out_file(args.report, "--report") if args.report else None
    check_factors(args)
    out = out_dir(args.out, args)
    model = model_of(args)
    started = time.perf_counter()
    with progress_for(args) as bars:

        def score(client):
            factor_set = factor_set_name(client, args)
            if args.index:
                dataset = ""
                index = index_name(client, args, Path(args.index))
                options = {"index": index, "rescore": args.rescore, "lexical": args.lexical}
            else:
                dataset = register(client, args, model, bars)
                options = {"tfidf": config.tfidf, "bm25": config.bm25, "damping_check": config.damping_check}
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
                bottom_k=config.bottom_k,
                per_module=config.per_module,
                per_token=config.per_token,
                batch_size=config.batch_size,
                **options,
            )
            client.download_result(result.name, out)
            return result

        result = through_system(args, score)
    record_inputs(
        out / "results.json",
        model=args.model,
        data=args.data,
        index=args.index,
        factors=args.factors,
        queries=args.queries,
    )
    seconds = time.perf_counter() - started
    report = _write_report(out, report_path) if report_path else None
    check = json.loads((out / "results.json").read_text()).get("damping_check") if config.damping_check else None
    done(
        args,
        f"scored {result.num_queries} queries x {result.num_train} sequences in {seconds:.1f}s -> {out}"
        + _all_ranked(config.top_k, result.num_train)
        + (f"; report -> {report}" if report else "")
        + (f"; {damping_check_line(check)}" if check else ""),
        damping_check=check,
        result=result.name,
        queries=result.num_queries,
        sequences=result.num_train,
        seconds=round(seconds, 3),
        out=str(out),
        report=str(report) if report else None,
    )
    return 0


def damping_check_line(check: dict) -> str:
    """results.json's damping check in one line: each other damping's mean (and worst) top-k overlap."""
    parts = [
        f"{scale} the damping: mean {value['mean']:.2f} (min {value['min']:.2f})" for scale, value in check.items()
    ]
    return "top-k kept at " + ", at ".join(parts)


def _all_ranked(top_k: int, sequences: int) -> str:
    """The note that --top-k asked for more sequences than there are ("" when it did not)."""
    return f" (--top-k {top_k} > {sequences} sequences: all {sequences} ranked)" if top_k > sequences else ""


def _write_report(results: Path, path: Path) -> Path:
    """The HTML report of a result directory, written to `path` (checked by out_file). Needs numpy,
    safetensors and matplotlib (not torch): a client-only install is told in one line how to add them."""
    try:
        from ..query_svc.report_html import build_report

        page = build_report(results)
    except ModuleNotFoundError as missing:
        raise PreconditionError(
            f"the report needs {missing.name}: pip install 'influence-services[report]' (numpy, safetensors, "
            "matplotlib; no torch)"
        ) from None
    path.write_text(page, encoding="utf-8")
    return path


def run_report(args) -> int:
    """`influence report`: the HTML report of a result directory (results.json + scores.safetensors)."""
    path = _write_report(Path(args.results), out_file(args.out, "--out"))
    done(args, f"report -> {path}", report=str(path), bytes=path.stat().st_size)
    return 0


def run_self(args) -> int:
    config = score_config(args)
    check_data(args)
    check_factors(args)
    out = out_dir(args.out, args)
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
        f"self-influence of {result.num_train} sequences -> {out}" + _all_ranked(config.top_k, result.num_train),
        result=result.name,
        sequences=result.num_train,
        out=str(out),
    )
    return 0
