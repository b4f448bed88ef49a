"""How much the demo's headline (planted sequence at rank 1 / in the top 5) moves with the seed and the CPU kernels.

    .venv/bin/python bench/demo_robustness.py [--seeds 0,1,2,3,4] [--variants NAME,...] [--retrain]
    .venv/bin/python bench/demo_robustness.py --determinism [--seeds 0]

Each (seed, variant) runs the demo's pipeline in a fresh process whose environment is the
variant's: the demo model is built by `prepare_demo` (training in its child process) and
registered, fitted and scored through the embedded system exactly as `influence demo` does it.
Variants change what decides float32 rounding: ATen's CPU capability (ATEN_CPU_CAPABILITY), the
thread count, MKL's code path (MKL_ENABLE_INSTRUCTIONS, which stands in for an older CPU's), and
whether the training child pins its numerics (the demo's default) or inherits the variant's
environment ("unpinned": how the demo trained before, where the model itself moves with the CPU).
With pinned training the model is trained once per seed and shared by the variants (they differ
only in the fit and scoring), unless `--retrain`, which trains it again in every variant's own
process and reports whether the weight bytes (sha256) agree.

`--determinism` trains the model for each seed under several parent environments, pinned (and
repeated) and unpinned, and prints the sha256 of each model.safetensors: the pinned ones must
agree (and match REFERENCE_SHA256, measured on the machine of BENCHMARKS.md), the unpinned ones
show that the knobs the pins fix do change the weights.

Not run in CI (it takes ~1 minute per (seed, variant)); results go in ../BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (environment overrides of the whole pipeline, training numerics)
VARIANTS: dict[str, tuple[dict[str, str], str]] = {
    "native": ({}, "pinned"),
    "aten-default": ({"ATEN_CPU_CAPABILITY": "default"}, "pinned"),
    "1-thread": ({"OMP_NUM_THREADS": "1"}, "pinned"),
    "mkl-avx": ({"MKL_ENABLE_INSTRUCTIONS": "AVX"}, "pinned"),
    "unpinned": ({}, "inherit"),
    "unpinned-aten-default-1t": ({"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}, "inherit"),
    "unpinned-mkl-sse42": ({"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}, "inherit"),
}
# --determinism: (parent environment, training numerics). The pinned trainings must agree; the
# unpinned ones show that the knobs matter here (without the pins they change the weights).
DETERMINISM_RUNS: dict[str, tuple[dict[str, str], str]] = {
    "pinned/plain": ({}, "pinned"),
    "pinned/plain-again": ({}, "pinned"),
    "pinned/parent-1-thread": ({"OMP_NUM_THREADS": "1"}, "pinned"),
    "pinned/parent-aten-default": ({"ATEN_CPU_CAPABILITY": "default"}, "pinned"),
    "pinned/mkl-sse4_2": ({"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}, "pinned"),
    "pinned/mkl-avx": ({"MKL_ENABLE_INSTRUCTIONS": "AVX"}, "pinned"),
    "pinned/mkl-avx2": ({"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, "pinned"),
    "unpinned/1-thread": ({"OMP_NUM_THREADS": "1"}, "inherit"),
    "unpinned/1-thread-mkl-avx": (
        {"OMP_NUM_THREADS": "1", "MKL_ENABLE_INSTRUCTIONS": "AVX"},
        "inherit",
    ),
    "unpinned/1-thread-aten-default": (
        {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"},
        "inherit",
    ),
    "unpinned/2-threads": ({"OMP_NUM_THREADS": "2"}, "inherit"),
}
# sha256 of model.safetensors from pinned training with the default recipe, measured on an AVX2
# AMD EPYC (see BENCHMARKS.md). Another x86-64 machine (e.g. AVX-512) should print the same.
REFERENCE_SHA256 = {
    0: "9f3602f2deae1a535da3d95eb62678a9cc1304a31181ad2c07a8b5bfa93f7117",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_one(args) -> None:
    """In a variant's process: build (or reuse) the demo model, fit and score, print one JSON line."""
    import torch

    from services.cli.demo import fit_score_and_report
    from services.toy.demo_data import prepare_demo

    started = time.perf_counter()
    paths = prepare_demo(Path(args.work_dir), seed=args.seed, progress=False, numerics=args.numerics)
    trained = time.perf_counter()
    summary = {} if args.train_only else fit_score_and_report(paths, Path(args.out), quiet=True, show_queries=False)
    stamp = json.loads((Path(args.work_dir) / "demo.json").read_text())
    record = {
        **summary,
        "model_sha256": sha256(Path(paths.model_dir) / "model.safetensors"),
        "training": {key: stamp["training"].get(key) for key in ("seconds", "final_loss", "query_accuracy")},
        "training_numerics": stamp["training"].get("numerics"),
        "parent": {"aten_cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()},
        "prepare_s": round(trained - started, 1),
        "total_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(record), flush=True)


def spawn(overrides: dict[str, str], arguments: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **overrides}
    command = [sys.executable, str(Path(__file__).resolve()), "--one", *arguments]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-3000:])
        raise SystemExit(f"variant run failed: {' '.join(arguments)}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
    )


def robustness(args) -> None:
    seeds = [int(seed) for seed in args.seeds.split(",")]
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    base = Path(args.work_dir)
    results: dict[str, dict[str, dict]] = {}
    for seed in seeds:
        for name in names:
            overrides, numerics = VARIANTS[name]
            shared = numerics == "pinned" and not args.retrain
            work = base / (f"seed{seed}-pinned" if shared else f"seed{seed}-{name}")
            out = base / f"out-seed{seed}-{name}"
            arguments = ["--seed", str(seed), "--numerics", numerics, "--work-dir", str(work), "--out", str(out)]
            record = spawn(overrides, arguments)
            results.setdefault(str(seed), {})[name] = record
            print(
                f"seed {seed} {name:26s} top1 {record['top1_is_planted']:2d}/{record['queries']} "
                f"top5 {record['planted_in_top5']:2d}/{record['queries']}  model {record['model_sha256'][:12]}  "
                f"train {record['training']['seconds']} s  total {record['total_s']} s",
                file=sys.stderr,
                flush=True,
            )
    print(f"\nmachine: {machine()}; {time.strftime('%Y-%m-%d')}\n")
    print("| seed | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for seed in seeds:
        cells = [
            f"{results[str(seed)][name]['top1_is_planted']}/{results[str(seed)][name]['planted_in_top5']}"
            for name in names
        ]
        print(f"| {seed} | " + " | ".join(cells) + " |")
    worst = [min(results[str(seed)][name]["top1_is_planted"] for seed in seeds) for name in names]
    worst5 = [min(results[str(seed)][name]["planted_in_top5"] for seed in seeds) for name in names]
    print("| worst | " + " | ".join(f"{a}/{b}" for a, b in zip(worst, worst5, strict=True)) + " |")
    print("\ncells: queries with a planted sequence at rank 1 / in the top 5, of 24")
    for seed in seeds if args.retrain else []:  # without --retrain the pinned variants share one model
        hashes = {results[str(seed)][name]["model_sha256"] for name in names if VARIANTS[name][1] == "pinned"}
        if hashes:
            print(
                f"seed {seed}: pinned-training model sha256 {'identical' if len(hashes) == 1 else 'DIFFERENT'} "
                f"across variants ({', '.join(sorted(h[:12] for h in hashes))})"
            )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


def determinism(args) -> None:
    seeds = [int(seed) for seed in args.seeds.split(",")]
    base = Path(args.work_dir) / "determinism"
    names = list(DETERMINISM_RUNS) if args.variants == "all" else args.variants.split(",")
    for seed in seeds:
        hashes: dict[str, str] = {}
        for n, name in enumerate(names):
            overrides, numerics = DETERMINISM_RUNS[name]
            work = base / f"seed{seed}-{n}"
            arguments = ["--seed", str(seed), "--numerics", numerics, "--work-dir", str(work), "--train-only"]
            arguments += ["--out", str(base / "unused"), "--force"]
            record = spawn(overrides, arguments)
            hashes[name] = record["model_sha256"]
            print(
                f"seed {seed} {name:32s} {record['model_sha256']}  train {record['training']['seconds']} s", flush=True
            )
        pinned = {hashes[name] for name in names if DETERMINISM_RUNS[name][1] == "pinned"}
        unpinned = {hashes[name] for name in names if DETERMINISM_RUNS[name][1] == "inherit"}
        if pinned:
            verdict = "bit-identical" if len(pinned) == 1 else "DIFFERENT"
            print(f"seed {seed}: pinned trainings {verdict}", flush=True)
            reference = REFERENCE_SHA256.get(seed)
            if reference and len(pinned) == 1:
                same = reference in pinned
                print(f"seed {seed}: {'matches' if same else 'DIFFERS from'} the reference hash {reference[:16]}")
        if unpinned:
            runs = sum(DETERMINISM_RUNS[name][1] == "inherit" for name in names)
            differ = " (none equal to the pinned one)" if not unpinned & pinned else ""
            print(f"seed {seed}: {len(unpinned)} distinct weight files from {runs} unpinned trainings{differ}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--variants", default="all", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--work-dir", default=str(ROOT / "bench" / "out" / "demo-robustness"))
    parser.add_argument("--retrain", action="store_true", help="train the pinned model again in every variant")
    parser.add_argument("--determinism", action="store_true", help="only check bit-identical pinned training")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--numerics", default="pinned", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--force", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        if args.force:
            import shutil

            shutil.rmtree(args.work_dir, ignore_errors=True)
        run_one(args)
    elif args.determinism:
        determinism(args)
    else:
        robustness(args)


if __name__ == "__main__":
    main()
