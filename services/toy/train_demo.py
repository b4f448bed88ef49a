"""Train the demo model in a child process with pinned numerics: the same weight bytes on any x86-64 CPU.

    python -m services.toy.train_demo WORK_DIR --seed S --settings JSON [--quiet] [--numerics pinned|inherit]
                                      [--keep JSON]

reads nothing but its arguments, regenerates the corpus (pure Python, deterministic in the seed),
builds and trains the model, saves it with its tokenizer into WORK_DIR/model and prints the
training report as one JSON line on stdout (progress goes to stderr). `train_in_child` starts it.
With `--keep` (a JSON list of training positions) it trains on just those sequences, with the
same recipe, and saves nothing: the report is what bench/lds wants (`query_logprobs`).

Why a child process: what decides float32 rounding on a CPU is process-wide and mostly read once,
when torch and MKL load (the ATen kernel dispatch, MKL's code path and its thread pool); a child
gets them pinned without touching the settings of the process that runs the demo (its fit and
scoring keep the fast, CPU-dispatched kernels and all threads). What `PINNED_ENV` pins:

- `ATEN_CPU_CAPABILITY=default`: every ATen kernel (elementwise ops, softmax, layer norm,
  reductions, the optimizer's arithmetic, the random normal fill of the initialisation) runs its
  baseline x86-64 build instead of the AVX2 or AVX-512 build torch would pick for the CPU; those
  builds differ in vector width, FMA contraction and vectorised transcendental functions (Sleef),
  so they round differently.
- `MKL_CBWR=COMPATIBLE`: MKL's conditional numerical reproducibility (CNR) mode on its SSE2 branch
  without the rcpps/rsqrtps approximations. Intel documents CNR as bitwise reproducible for a fixed
  branch and a fixed number of threads (with MKL_DYNAMIC/OMP_DYNAMIC false), and COMPATIBLE (with
  AUTO) as the only branch available on non-Intel CPUs: `MKL_CBWR=AVX2` silently falls back to AUTO
  on AMD, and AUTO takes a different branch on an AVX2 and an AVX-512 CPU. Every matrix product of
  the training (float32 GEMMs, BLAS=MKL) goes through this path; oneDNN is not used by it.
- One thread (`OMP_NUM_THREADS=MKL_NUM_THREADS=1`, `torch.set_num_threads(1)`, dynamic
  adjustment off): no reduction is split across threads, whatever the machine's core count or the
  parent's thread setting.

The child checks that each pin took effect (the ATen capability in use, MKL's CNR branch read back
from MKL, the thread count) and refuses to train otherwise. Not pinned, and assumed equal on the
machines compared: the torch build (2.13.0 CPU wheel, which carries MKL 2024.2 and libgomp), the
transformers and tokenizers versions, and glibc's libm (whose exp/log/tanh the baseline kernels
call; glibc selects the FMA variants on every AVX2 or AVX-512 CPU). Measured cost: see BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

NUMERICS_VERSION = 1  # bump when PINNED_ENV changes: it changes the trained weights
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
}
_MKL_CBWR_BRANCH = 1  # mkl_cbwr_get's argument: ask for the branch
_MKL_CBWR_COMPATIBLE = 3
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding `services/`


def child_environment(numerics: str = "pinned", base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the training child: `base` (default os.environ) plus PINNED_ENV when pinned."""
    env = dict(os.environ if base is None else base)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    if numerics == "pinned":
        env.update(PINNED_ENV)
    elif numerics != "inherit":
        raise ValueError(f"numerics must be 'pinned' or 'inherit', got {numerics!r}")
    return env


def train_in_child(
    work_dir: Path,
    *,
    seed: int,
    settings: Mapping,
    progress: bool = True,
    numerics: str = "pinned",
    env: Mapping[str, str] | None = None,
    keep: Sequence[int] | None = None,
) -> dict:
    """Train and save the demo model into `work_dir`/model in a child process; returns its report.

    `env` is the child's base environment (default: this process's); `numerics="pinned"` overlays
    PINNED_ENV, "inherit" leaves it as is (for measuring what pinning changes). The child's stderr
    (progress) is this process's. `keep`: train on just these training positions and save nothing.
    """
    command = [
        sys.executable,
        "-m",
        "services.toy.train_demo",
        str(work_dir),
        "--seed",
        str(seed),
        "--settings",
        json.dumps(dict(settings)),
        "--numerics",
        numerics,
    ]
    if not progress:
        command.append("--quiet")
    if keep is not None:
        command += ["--keep", json.dumps(list(keep))]
    completed = subprocess.run(
        command, env=child_environment(numerics, env), stdout=subprocess.PIPE, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"training the demo model failed (exit code {completed.returncode}); see its errors above")
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1])


def numerics_in_effect() -> dict:
    """What this process's float32 arithmetic runs on: ATen's CPU capability, MKL's CNR branch, threads."""
    import ctypes

    import torch

    info = {"aten_cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    try:
        library = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        library.mkl_serv_cbwr_get.restype = ctypes.c_int
        info["mkl_cbwr_branch"] = int(library.mkl_serv_cbwr_get(ctypes.c_int(_MKL_CBWR_BRANCH)))
    except (OSError, AttributeError):
        info["mkl_cbwr_branch"] = None
    return info


def _check_pinned(info: dict) -> None:
    problems = []
    if info["aten_cpu_capability"] != "DEFAULT":
        problems.append(f"ATen CPU capability is {info['aten_cpu_capability']}, not DEFAULT")
    if info["threads"] != 1:
        problems.append(f"torch uses {info['threads']} threads, not 1")
    if info["mkl_cbwr_branch"] is None:  # a torch build without MKL (or without the symbol): nothing to pin there
        print("demo training: cannot read MKL's CNR branch; MKL_CBWR is set but unverified", file=sys.stderr)
    elif info["mkl_cbwr_branch"] != _MKL_CBWR_COMPATIBLE:
        problems.append(f"MKL's CNR branch is {info['mkl_cbwr_branch']}, not COMPATIBLE ({_MKL_CBWR_COMPATIBLE})")
    if problems:
        raise SystemExit("demo training: numerics not pinned: " + "; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.toy.train_demo", description=__doc__.splitlines()[0])
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", default="{}", help="DemoSettings fields as a JSON object")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--numerics", choices=("pinned", "inherit"), default="pinned")
    parser.add_argument("--keep", help="train on these training positions only (a JSON list) and save nothing")
    args = parser.parse_args(argv)
    if args.numerics == "pinned":
        if "torch" in sys.modules:
            raise SystemExit("demo training: torch was imported before the numerics could be pinned")
        os.environ.update(PINNED_ENV)  # read when torch, libgomp and MKL load: so before `import torch`

    import torch

    if args.numerics == "pinned":
        torch.set_num_threads(1)
        info = numerics_in_effect()
        _check_pinned(info)
    else:
        info = numerics_in_effect()

    from .recipe import DemoSettings, build_corpus, train_and_save

    config = DemoSettings(**json.loads(args.settings))
    corpus = build_corpus(config, args.seed)
    keep = None if args.keep is None else [int(position) for position in json.loads(args.keep)]
    model_dir = None if keep is not None else args.work_dir / "model"
    report = train_and_save(corpus, config, args.seed, model_dir, progress=not args.quiet, keep=keep)
    report["numerics"] = {"mode": args.numerics, **info}
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
