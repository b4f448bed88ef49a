"""Side-by-side benchmark of our EK-FAC engine and Kronfluence 1.0.1 on one CPU workload.

    bash bench/setup.sh                                   # once: .venv-bench with Kronfluence
    .venv-bench/bin/python bench/bench_vs_kronfluence.py  # full workload (~15-25 min on 2 cores)
    .venv-bench/bin/python bench/bench_vs_kronfluence.py --n-train 64 --quick   # smoke run (~1 min)

Every side runs in its own subprocess (`--worker ...`), so peak memory is per side and the two
libraries' imports never meet. Runs, in order:
    reference            plain forward+backward throughput (all parameter grads): the physical limit
    kronfluence sampled  fit_all_factors + compute_pairwise_scores (full, and low-rank queries)
    ours sampled         fit_factors + compute_scores (full, and each --query-ranks)
    ours sampled nocache fit only, with the capture cache off (cache_gib=0): the low-memory mode
    kronfluence empirical, ours empirical   the agreement runs (true labels; identical math)
Results: a markdown table on stdout and in OUT/results.md, everything in OUT/results.json, logs of
each subprocess in OUT/logs/. See bench/README.md for what is compared and how.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    RssSampler,
    Stage,
    Workload,
    build_workload,
    ekfac_apply,
    ids_to_text,
    load_workload,
    peak_rss_mib,
    relative_error,
    score_agreement,
    thread_info,
)

COMPARE_MODULE = "transformer.h.0.mlp.c_fc"


# ================================================================================================
# Workers (each runs in its own subprocess)


def load_hf_model(work: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(
        str(work / "model"), local_files_only=True, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def worker_reference(args, work: Path, workload: Workload, data: dict) -> dict:
    """Tokens/s of a plain forward+backward (summed token NLL, gradients of every parameter)."""
    model = load_hf_model(work)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    ids = data["train_ids"]
    bs = args.batch_size
    n_batches = max(1, min(args.reference_batches, ids.shape[0] // bs - 1))  # plus one warm-up batch
    batches = [ids[i * bs : (i + 1) * bs] for i in range(n_batches + 1)]

    def step(batch, backward: bool):
        with torch.set_grad_enabled(backward):
            logits = model(input_ids=batch, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
        if backward:
            model.zero_grad(set_to_none=True)
            loss.backward()

    record = {}
    for name, backward in (("forward_backward", True), ("forward_only", False)):
        step(batches[0], backward)  # warm-up
        start = time.perf_counter()
        for batch in batches[1:]:
            step(batch, backward)
        seconds = time.perf_counter() - start
        tokens = n_batches * bs * ids.shape[1]
        record[name] = {"seconds": seconds, "batches": n_batches, "tokens": tokens, "tokens_per_s": tokens / seconds}
    return record


# ------------------------------------------------------------------------------------------------
# Kronfluence


def kronfluence_model(work: Path, tracked: list[str]):
    """The HF model with the tracked GPT-2 Conv1D modules swapped for equivalent nn.Linear.

    Kronfluence tracks only nn.Linear and nn.Conv2d; GPT-2's Conv1D computes x @ W + b with W
    stored [d_in, d_out], i.e. the same map as Linear with weight Wᵀ.
    """
    model = load_hf_model(work)
    for name in tracked:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        conv = getattr(parent, child)
        d_in, d_out = conv.weight.shape
        linear = torch.nn.Linear(d_in, d_out, bias=conv.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        setattr(parent, child, linear)
    return model.eval()


class _Sequences(torch.utils.data.Dataset):
    """Token-id rows as {"input_ids", "attention_mask", "labels"}; labels are -100 before `first_target`."""

    def __init__(self, ids: torch.Tensor, first_target: int = 1):
        self.ids = ids
        self.first_target = first_target

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict:
        ids = self.ids[index]
        labels = ids.clone()
        labels[: self.first_target] = -100  # position 0 is never a target; a query's prompt is masked
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _make_task(tracked: list[str]):
    from kronfluence.task import Task

    class LanguageModelingTask(Task):
        """Train loss: summed token NLL; measurement: summed NLL of the completion tokens.

        Kronfluence's pairwise score is ∇measurementᵀ H⁻¹ ∇train_loss with both as losses, which is
        ∇log p(completion)ᵀ H⁻¹ ∇log p(z): the same sign as ours, no negation needed.
        """

        def _logits_and_labels(self, batch, model):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            return logits[:, :-1].float(), batch["labels"][:, 1:]

        def compute_train_loss(self, batch, model, sample: bool = False):
            logits, labels = self._logits_and_labels(batch, model)
            flat_logits = logits.reshape(-1, logits.shape[-1])
            if sample:
                with torch.no_grad():
                    probabilities = torch.softmax(flat_logits.detach(), dim=-1)
                    sampled = torch.multinomial(probabilities, num_samples=1).flatten()
                    labels = torch.where(labels.reshape(-1) == -100, -100, sampled)
            return torch.nn.functional.cross_entropy(
                flat_logits, labels.reshape(-1), ignore_index=-100, reduction="sum"
            )

        def compute_measurement(self, batch, model):
            logits, labels = self._logits_and_labels(batch, model)
            return torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )

        def get_influence_tracked_modules(self):
            return list(tracked)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return LanguageModelingTask()


def _profile_delta(before: dict, after: dict) -> dict:
    return {
        action: sum(durations) - sum(before.get(action, []))
        for action, durations in after.items()
        if sum(durations) - sum(before.get(action, [])) > 0
    }


def worker_kronfluence(args, work: Path, workload: Workload, data: dict, sampler: RssSampler) -> dict:
    import logging

    import kronfluence
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    torch.manual_seed(args.seed)
    tracked = workload.tracked_modules()
    task = _make_task(tracked)
    model = prepare_model(kronfluence_model(work, tracked), task)
    output_dir = Path(args.out) / "kronfluence" / args.fisher
    analyzer = Analyzer(
        analysis_name="bench",
        model=model,
        task=task,
        cpu=True,
        profile=True,
        disable_tqdm=not args.verbose,
        log_level=logging.INFO if args.verbose else logging.WARNING,
        output_dir=str(output_dir),
    )
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
    train = _Sequences(data["train_ids"])
    queries = _Sequences(data["query_ids"], first_target=data["prompt_len"])
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=args.fisher == "empirical")

    record: dict = {"kronfluence_version": kronfluence.__version__, "stages": {}, "profiler": {}}
    profiler = analyzer.profiler.recorded_durations
    before = {k: list(v) for k, v in profiler.items()}
    with Stage(record["stages"], "fit", sampler):
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=train,
            per_device_batch_size=args.batch_size,
            factor_args=factor_args,
            overwrite_output_dir=True,
        )
    record["profiler"]["fit"] = _profile_delta(before, profiler)

    ranks = [None] + (args.kf_query_ranks if args.fisher == "sampled" or args.all_ranks else [])
    scores = {}
    for rank in ranks:
        label = "score_full" if rank is None else f"score_rank{rank}"
        score_args = ScoreArguments(damping_factor=None, query_gradient_low_rank=rank)  # None: 0.1 × mean(Λ)
        before = {k: list(v) for k, v in profiler.items()}
        with Stage(record["stages"], label, sampler):
            # All queries in one batch, so the training set is streamed once.
            analyzer.compute_pairwise_scores(
                scores_name=label,
                factors_name="ekfac",
                query_dataset=queries,
                train_dataset=train,
                per_device_query_batch_size=len(queries),
                per_device_train_batch_size=args.batch_size,
                score_args=score_args,
                overwrite_output_dir=True,
            )
        record["profiler"][label] = _profile_delta(before, profiler)
        scores[label] = analyzer.load_pairwise_scores(label)["all_modules"].float().clone()

    # Factors, normalised as Kronfluence uses them (see README: A and S both per token, Λ per sequence).
    covariance = analyzer.load_covariance_matrices("ekfac")
    eigen = analyzer.load_eigendecomposition("ekfac")
    lambdas = analyzer.load_lambda_matrices("ekfac")
    factors = {}
    for name in tracked:
        factors[name] = {
            "activation_covariance": covariance["activation_covariance"][name].double()
            / covariance["num_activation_covariance_processed"][name].double(),
            "gradient_covariance": covariance["gradient_covariance"][name].double()
            / covariance["num_gradient_covariance_processed"][name].double(),
            "activation_eigenvectors": eigen["activation_eigenvectors"][name],
            "gradient_eigenvectors": eigen["gradient_eigenvectors"][name],
            "lambda": lambdas["lambda_matrix"][name].double() / lambdas["num_lambda_processed"][name].double(),
        }
    name = tracked[0]
    record["counts"] = {
        "activation_covariance": int(covariance["num_activation_covariance_processed"][name]),
        "gradient_covariance": int(covariance["num_gradient_covariance_processed"][name]),
        "lambda": int(lambdas["num_lambda_processed"][name]),
    }
    record["artifacts"] = _save_artifacts(args, scores, factors)
    return record


# ------------------------------------------------------------------------------------------------
# Ours


def worker_ours(args, work: Path, workload: Workload, data: dict, sampler: RssSampler) -> dict:
    from services.engine.fit import FitConfig, FitModel, fit_factors
    from services.engine.model_io import load_model_and_tokenizer
    from services.engine.progress import Progress
    from services.engine.records import Query, TrainingExample
    from services.engine.score import ScoreConfig, compute_scores

    class StageTimes(Progress):
        """Seconds from each engine stage's start to its last batch (gaps = eigendecomposition etc.)."""

        def __init__(self):
            self.times: dict[str, dict] = {}
            self.current = None

        def stage(self, name, total, unit="batch"):
            self.current = name
            now = time.perf_counter()
            self.times[name] = {"start": now, "last": now, "batches": 0, "tokens": 0}

        def advance(self, units=1, tokens=0):
            entry = self.times[self.current]
            entry["last"] = time.perf_counter()
            entry["batches"] += units
            entry["tokens"] += tokens

        def summary(self, origin: float) -> dict:
            return {
                name: {"start": t["start"] - origin, "seconds": t["last"] - t["start"], "tokens": t["tokens"]}
                for name, t in self.times.items()
            }

    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(work / "model", device="cpu", dtype="float32")
    train_ids, query_ids, prompt_len = data["train_ids"], data["query_ids"], data["prompt_len"]
    examples = [TrainingExample(id=str(i), text=ids_to_text(row)) for i, row in enumerate(train_ids)]
    queries = [
        Query(id=f"q{i}", prompt=ids_to_text(row[:prompt_len]), completion=ids_to_text(row[prompt_len:]))
        for i, row in enumerate(query_ids)
    ]
    max_length = max(train_ids.shape[1], query_ids.shape[1])
    fit_config = FitConfig(
        strategy="ekfac",
        fisher=args.fisher,
        modules="mlp",
        batch_size=args.batch_size,
        max_length=max_length,
        seed=args.seed,
        cache_gib=args.ours_cache_gib,
    )
    record: dict = {"stages": {}, "engine_stages": {}, "fit_config": asdict(fit_config)}
    progress = StageTimes()
    with Stage(record["stages"], "fit", sampler) as stage:
        factors = fit_factors(model, tokenizer, examples, fit_config, progress=progress)
    record["engine_stages"]["fit"] = progress.summary(stage.start)
    tracked = list(factors.modules)
    if tracked != workload.tracked_modules():
        raise SystemExit(f"ours tracks {tracked}, expected {workload.tracked_modules()}")
    record["counts"] = {"n_sequences": factors.n_sequences, "n_tokens": factors.n_tokens}
    if args.fit_only:
        return record

    ranks = [None] + (args.query_ranks if args.fisher == "sampled" or args.all_ranks else [])
    scores = {}
    for rank in ranks:
        label = "score_full" if rank is None else f"score_rank{rank}"
        config = ScoreConfig(damping_factor=0.1, query_rank=rank, batch_size=args.batch_size, max_length=max_length)
        progress = StageTimes()
        with Stage(record["stages"], label, sampler) as stage:
            result = compute_scores(model, tokenizer, factors, examples, queries, config, progress=progress)
        record["engine_stages"][label] = progress.summary(stage.start)
        record.setdefault("kernels", {})[label] = sorted(set(result.kernels.values()))
        scores[label] = result.scores.float().clone()

    # The factor set keeps only what preconditioning reads; A and S, for the comparison with
    # Kronfluence's, come from a covariance pass run again here (outside every timed stage).
    covariance = FitModel(model, tokenizer, fit_config).covariance(
        FitModel(model, tokenizer, fit_config).tokenize(examples)
    )
    exported = {}
    for name in tracked:
        f = factors.factors[name]
        exported[name] = {
            "activation_covariance": covariance.activation_sums[name] / covariance.token_counts[name],
            "gradient_covariance": covariance.gradient_sums[name] / covariance.n_sequences,
            "activation_eigenvectors": f.activation_eigenvectors,
            "gradient_eigenvectors": f.gradient_eigenvectors,
            "lambda": f.eigenvalues,
        }
    record["artifacts"] = _save_artifacts(args, scores, exported)
    return record


def _save_artifacts(args, scores: dict, factors: dict) -> dict:
    directory = Path(args.out) / "artifacts"
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{args.worker}-{args.fisher}"
    paths = {"scores": str(directory / f"{stem}-scores.pt"), "factors": str(directory / f"{stem}-factors.pt")}
    torch.save(scores, paths["scores"])
    torch.save(factors, paths["factors"])
    return paths


def run_worker(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    workload, data = load_workload(work)
    sampler = RssSampler()
    record = {"worker": args.worker, "fisher": args.fisher, "threads": thread_info()}
    start = time.perf_counter()
    if args.worker == "reference":
        record.update(worker_reference(args, work, workload, data))
    elif args.worker == "kronfluence":
        record.update(worker_kronfluence(args, work, workload, data, sampler))
    elif args.worker == "ours":
        record.update(worker_ours(args, work, workload, data, sampler))
    sampler.stop()
    record["wall_seconds"] = time.perf_counter() - start
    record["peak_rss_mib"] = peak_rss_mib()
    Path(args.result).write_text(json.dumps(record, indent=1))


# ================================================================================================
# Driver


def spawn(args, worker: str, fisher: str, name: str, extra: list[str] | None = None) -> dict | None:
    out = Path(args.out)
    result = out / "runs" / f"{name}.json"
    log = out / "logs" / f"{name}.log"
    result.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        worker,
        "--fisher",
        fisher,
        "--work",
        str(args.work),
        "--out",
        str(out),
        "--result",
        str(result),
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
        "--reference-batches",
        str(args.reference_batches),
        "--query-ranks",
        ",".join(map(str, args.query_ranks)),
        "--kf-query-ranks",
        ",".join(map(str, args.kf_query_ranks)),
        *(["--threads", str(args.threads)] if args.threads else []),
        *(["--ours-cache-gib", str(args.ours_cache_gib)] if args.ours_cache_gib is not None else []),
        *(["--verbose"] if args.verbose else []),
        *(["--all-ranks"] if args.all_ranks else []),
        *(extra or []),
    ]
    print(f"[bench] {name} ...", end=" ", flush=True, file=sys.stderr)
    start = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, cwd=str(ROOT))
    seconds = time.perf_counter() - start
    if code != 0 or not result.is_file():
        print(f"FAILED (exit {code}, {seconds:.0f} s); see {log}", file=sys.stderr)
        tail = log.read_text().splitlines()[-15:]
        print("\n".join("    " + line for line in tail), file=sys.stderr)
        return None
    print(f"done in {seconds:.0f} s", file=sys.stderr)
    return json.loads(result.read_text())


def compare_factors(kf_path: str, ours_path: str, tokens_per_sequence: float, seed: int = 0) -> dict:
    kf, ours = torch.load(kf_path), torch.load(ours_path)
    generator = torch.Generator().manual_seed(seed)
    per_module = {}
    for name in ours:
        k, o = kf[name], ours[name]
        a_k, a_o = k["activation_covariance"], o["activation_covariance"]
        # Kronfluence divides S by tokens, we by sequences: rescale before comparing.
        s_k = k["gradient_covariance"] * tokens_per_sequence
        probes = torch.randn((4, *o["lambda"].shape), generator=generator, dtype=torch.float64)
        per_module[name] = {
            "A_max_abs_diff": float((a_k - a_o).abs().max()),
            "A_max_abs": float(a_o.abs().max()),
            "A_rel_fro": relative_error(a_k, a_o),
            "S_rel_fro_after_rescale": relative_error(s_k, o["gradient_covariance"]),
            "lambda_rel_fro": relative_error(k["lambda"], o["lambda"]),
            "lambda_mean_ratio": float(k["lambda"].double().mean() / o["lambda"].double().mean()),
            "ihvp_rel_err": relative_error(ekfac_apply(k, probes), ekfac_apply(o, probes)),
        }
    worst = {key: max(m[key] for m in per_module.values()) for key in next(iter(per_module.values()))}
    return {
        "module": COMPARE_MODULE,
        COMPARE_MODULE: per_module.get(COMPARE_MODULE),
        "worst_over_modules": worst,
        "per_module": per_module,
    }


def fmt(value, digits=1, unit=""):
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{unit}"


def summarize(args, workload: Workload, runs: dict) -> dict:
    summary: dict = {"workload": asdict(workload), "batch_size": args.batch_size, "runs": runs}
    n_tokens = workload.n_train * workload.train_len
    reference = runs.get("reference")
    fb_rate = reference["forward_backward"]["tokens_per_s"] if reference else None
    summary["one_fwd_bwd_pass_seconds"] = n_tokens / fb_rate if fb_rate else None

    agreement = {}
    for fisher in ("sampled", "empirical"):
        kf, ours = runs.get(f"kronfluence-{fisher}"), runs.get(f"ours-{fisher}")
        if not (kf and ours):
            continue
        kf_scores = torch.load(kf["artifacts"]["scores"])
        ours_scores = torch.load(ours["artifacts"]["scores"])
        entry = {"kronfluence_vs_ours": score_agreement(kf_scores["score_full"], ours_scores["score_full"])}
        for label, scores in ours_scores.items():
            if label != "score_full":
                entry[f"ours_{label}_vs_ours_full"] = score_agreement(scores, ours_scores["score_full"])
        for label, scores in kf_scores.items():
            if label != "score_full":
                entry[f"kronfluence_{label}_vs_kronfluence_full"] = score_agreement(scores, kf_scores["score_full"])
                if label in ours_scores:
                    entry[f"kronfluence_{label}_vs_ours_{label}"] = score_agreement(scores, ours_scores[label])
        sources = torch.load(Path(args.work) / "data.pt")["query_sources"]
        from_train = sources >= 0
        if bool(from_train.any()):
            entry["queries_cut_from_training_top1_is_source"] = {
                side: float((s["score_full"].argmax(1)[from_train] == sources[from_train]).double().mean())
                for side, s in (("kronfluence", kf_scores), ("ours", ours_scores))
            }
        tokens_per_sequence = kf["counts"]["gradient_covariance"] / kf["counts"]["lambda"]
        entry["factors"] = compare_factors(
            kf["artifacts"]["factors"], ours["artifacts"]["factors"], tokens_per_sequence
        )
        agreement[fisher] = entry
    summary["agreement"] = agreement
    return summary


def markdown(summary: dict) -> str:
    runs, workload = summary["runs"], summary["workload"]
    n_tokens = workload["n_train"] * workload["train_len"]
    one_pass = summary["one_fwd_bwd_pass_seconds"]
    lines = [
        f"Workload: GPT-2 {workload['n_layer']} layers × {workload['n_embd']} wide, vocab {workload['vocab_size']}; "
        f"{workload['n_train']} training sequences × {workload['train_len']} tokens ({n_tokens:,} tokens); "
        f"{workload['n_queries']} queries ({workload['prompt_len']}+{workload['completion_len']} tokens); "
        f"batch {summary['batch_size']}; float32 CPU; tracked: mlp.c_fc + mlp.c_proj of every block.",
        "",
    ]
    reference = runs.get("reference")
    if reference:
        threads = reference["threads"]["torch_threads"]
        lines += [
            f"Reference ({threads} torch threads): forward+backward "
            f"{fmt(reference['forward_backward']['tokens_per_s'], 0)}"
            f" tok/s, forward only {fmt(reference['forward_only']['tokens_per_s'], 0)} tok/s; one fwd+bwd pass over "
            f"the training set ≈ {fmt(one_pass)} s.",
            "",
        ]

    def passes(seconds):
        return f"{seconds / one_pass:.1f}×" if (one_pass and seconds is not None) else "–"

    lines += [
        "| run | fit (s) | cov / λ stage (s) | score full (s) | score low-rank (s) | peak RSS (MiB) "
        "| fit in fwd+bwd passes | score in passes |",
        "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, run in runs.items():
        if name == "reference" or run is None:
            continue
        stages = run.get("stages", {})
        fit = stages.get("fit", {}).get("seconds")
        full = stages.get("score_full", {}).get("seconds")
        low = ", ".join(
            f"r{label.removeprefix('score_rank')}: {fmt(stage['seconds'])}"
            for label, stage in stages.items()
            if label.startswith("score_rank")
        )
        if run["worker"] == "kronfluence":
            profile = run["profiler"]["fit"]
            split = (
                f"{fmt(profile.get('Fit Covariance'))} / {fmt(profile.get('Fit Lambda'))}"
                f" (eig {fmt(profile.get('Perform Eigendecomposition'))})"
            )
        else:
            engine = run.get("engine_stages", {}).get("fit", {})
            cov, cor = engine.get("covariance", {}), engine.get("correction", {})
            eig = cor["start"] - (cov["start"] + cov["seconds"]) if cov and cor else None
            split = f"{fmt(cov.get('seconds'))} / {fmt(cor.get('seconds'))} (eig {fmt(eig)})"
        lines.append(
            f"| {name} | {fmt(fit)} | {split} | {fmt(full)} | {low or '–'} | {fmt(run['peak_rss_mib'], 0)} | "
            f"{passes(fit)} | {passes(full)} |"
        )
    lines.append("")
    for fisher, entry in summary["agreement"].items():
        main = entry["kronfluence_vs_ours"]
        lines.append(
            f"**{fisher} Fisher** — Kronfluence vs ours (full rank): Pearson {main['pearson']:.6f} "
            f"(per-query min {main['pearson_per_query_min']:.6f}), Spearman {main['spearman']:.6f}, "
            f"top-1 agreement {main['top1_agreement']:.2f}, top-10 overlap {main['top10_overlap']:.2f}, "
            f"relative error {main['relative_error']:.2e}."
        )
        for key, value in entry.items():
            if key.endswith(("_vs_ours_full", "_vs_kronfluence_full")) or key.startswith("kronfluence_score_rank"):
                lines.append(f"  - {key}: Pearson {value['pearson']:.6f}, top-10 overlap {value['top10_overlap']:.2f}")
        if "queries_cut_from_training_top1_is_source" in entry:
            hits = entry["queries_cut_from_training_top1_is_source"]
            lines.append(
                f"  - queries cut from a training sequence whose top-1 is that sequence: "
                f"Kronfluence {hits['kronfluence']:.2f}, ours {hits['ours']:.2f}"
            )
        factors = entry["factors"]
        module, worst = factors.get(COMPARE_MODULE), factors["worst_over_modules"]
        if module:
            lines.append(
                f"  - factors of {COMPARE_MODULE}: A max|Δ| {module['A_max_abs_diff']:.2e} (max|A| "
                f"{module['A_max_abs']:.2e}), A rel. Frobenius {module['A_rel_fro']:.2e}; "
                f"S rel. err (after ×tokens/seq) "
                f"{module['S_rel_fro_after_rescale']:.2e}; Λ rel. err {module['lambda_rel_fro']:.2e}; "
                f"EK-FAC IHVP rel. err {module['ihvp_rel_err']:.2e}"
            )
        lines.append(
            f"  - worst over all {len(factors['per_module'])} modules: A rel {worst['A_rel_fro']:.2e}, "
            f"Λ rel {worst['lambda_rel_fro']:.2e}, IHVP rel {worst['ihvp_rel_err']:.2e}"
        )
        lines.append("")
    return "\n".join(lines)


def parse_ranks(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_group = parser.add_argument_group("workload")
    defaults = Workload()
    for field_name in (
        "n_train",
        "train_len",
        "n_queries",
        "prompt_len",
        "completion_len",
        "vocab_size",
        "n_layer",
        "n_embd",
        "n_head",
        "n_positions",
        "seed",
    ):
        workload_group.add_argument(
            "--" + field_name.replace("_", "-"), type=int, default=getattr(defaults, field_name)
        )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--query-ranks", type=parse_ranks, default=[32, 8], help="ours: low-rank query runs")
    parser.add_argument("--kf-query-ranks", type=parse_ranks, default=[32], help="Kronfluence: low-rank query runs")
    parser.add_argument("--all-ranks", action="store_true", help="low-rank runs in the empirical runs too")
    parser.add_argument("--reference-batches", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--ours-cache-gib", type=float, default=None, help="FitConfig.cache_gib (None: engine default)")
    parser.add_argument(
        "--only",
        default="",
        help="comma list of runs to do (reference, kronfluence-sampled, ours-sampled, "
        "ours-sampled-nocache, kronfluence-empirical, ours-empirical); default all",
    )
    parser.add_argument("--quick", action="store_true", help="skip the no-cache run and low-rank runs")
    parser.add_argument("--out", default=str(HERE / "out"))
    parser.add_argument("--work", default=None, help="workload directory (default OUT/work-<n_train>x<train_len>)")
    parser.add_argument("--verbose", action="store_true", help="let the libraries print progress into the logs")
    # Worker-only arguments.
    parser.add_argument("--worker", choices=("reference", "kronfluence", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--fisher", default="sampled", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--fit-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        run_worker(args)
        return

    workload = Workload(**{f: getattr(args, f) for f in asdict(defaults) if hasattr(args, f)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.work is None:
        args.work = str(out / f"work-{workload.n_train}x{workload.train_len}")
    if args.quick:
        args.query_ranks, args.kf_query_ranks = [], []
    print(f"[bench] building workload in {args.work}", file=sys.stderr)
    build_workload(Path(args.work), workload)

    plan = [
        ("reference", "reference", "sampled", None),
        ("kronfluence-sampled", "kronfluence", "sampled", None),
        ("ours-sampled", "ours", "sampled", None),
        ("ours-sampled-nocache", "ours", "sampled", ["--fit-only", "--ours-cache-gib", "0"]),
        ("kronfluence-empirical", "kronfluence", "empirical", None),
        ("ours-empirical", "ours", "empirical", None),
    ]
    only = {name for name in args.only.split(",") if name}
    if args.quick:
        plan = [step for step in plan if step[0] != "ours-sampled-nocache"]
    runs = {}
    for name, worker, fisher, extra in plan:
        if only and name not in only:
            continue
        runs[name] = spawn(args, worker, fisher, name, extra)
    runs = {name: run for name, run in runs.items() if run is not None}

    summary = summarize(args, workload, runs)
    table = markdown(summary)
    print(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"[bench] wrote {out / 'results.json'} and {out / 'results.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
