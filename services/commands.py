"""What each CLI command does, composed from the engine. Argument parsing lives in cli.py."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

from .engine.data import read_queries_jsonl, read_training_jsonl
from .engine.errors import InputError
from .engine.factor_io import load_factors, save_factors
from .engine.fit import FitConfig, fit_factors
from .engine.model_io import load_model_and_tokenizer
from .engine.progress import TqdmProgress
from .engine.score import ScoreConfig, compute_scores, compute_self_influence
from .reports import pairwise_report, self_report


def _log(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def _out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_fit(args) -> int:
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
    examples = read_training_jsonl(args.data)
    out = _out_dir(args.out)
    model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype)
    started = time.perf_counter()
    factors = fit_factors(model, tokenizer, examples, config, TqdmProgress(not args.quiet))
    save_factors(factors, out)
    _log(
        args,
        f"fitted {factors.strategy} factors for {len(factors.modules)} modules on {factors.n_sequences} sequences "
        f"({factors.n_tokens} tokens) in {time.perf_counter() - started:.1f}s -> {out}",
    )
    return 0


def _score_config(args, **extra) -> ScoreConfig:
    return ScoreConfig(
        damping_factor=args.damping_factor,
        damping=args.damping,
        batch_size=args.batch_size,
        max_length=args.max_length,
        top_k=args.top_k,
        **extra,
    )


def run_score(args) -> int:
    config = _score_config(args, query_rank=args.query_rank, per_module=args.per_module, per_token=args.per_token)
    config.validate()
    examples = read_training_jsonl(args.data)
    queries = read_queries_jsonl(args.queries)
    factors = load_factors(args.factors)
    out = _out_dir(args.out)
    model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype)
    started = time.perf_counter()
    result = compute_scores(model, tokenizer, factors, examples, queries, config, TqdmProgress(not args.quiet))
    tensors = {"scores": result.scores.contiguous()}
    if result.per_module is not None:
        tensors["per_module"] = result.per_module.contiguous()
    save_file(tensors, str(out / "scores.safetensors"))
    report = pairwise_report(
        queries,
        result.top,
        lambda i: (examples[i].id, examples[i].text),
        strategy=factors.strategy,
        damping=config.damping_policy.describe(),
        query_rank=config.query_rank,
        modules=result.module_names,
    )
    (out / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    _log(
        args,
        f"scored {len(queries)} queries x {len(examples)} sequences in {time.perf_counter() - started:.1f}s -> {out}",
    )
    return 0


def run_self(args) -> int:
    config = _score_config(args)
    config.validate()
    examples = read_training_jsonl(args.data)
    factors = load_factors(args.factors)
    out = _out_dir(args.out)
    model, tokenizer = load_model_and_tokenizer(args.model, args.device, args.dtype)
    scores = compute_self_influence(model, tokenizer, factors, examples, config, TqdmProgress(not args.quiet))
    save_file({"scores": scores.contiguous()}, str(out / "scores.safetensors"))
    report = self_report(
        scores,
        lambda i: (examples[i].id, examples[i].text),
        strategy=factors.strategy,
        damping=config.damping_policy.describe(),
        top_k=args.top_k,
    )
    (out / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    _log(args, f"self-influence of {len(examples)} sequences -> {out}")
    return 0


def run_demo(args) -> int:
    from .demo import run_demo as demo

    return demo(args)
