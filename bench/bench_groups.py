"""A fit in module groups against the same fit in one group, on the CPU: time and peak RSS (each
run in a process of its own, so its peak is its own), and whether the factor files are the same bytes.

    nice -n 19 python bench/bench_groups.py [--model /work/models/smollm2/model] [--layers 4]
        [--sequences 32] [--length 64] [--groups 4]

The model: the real SmolLM2-135M-Instruct directory when given (its first `--layers` layers kept),
else SmolLM2's configuration with random weights. The fit: EK-FAC on the MLPs, batch 8. The
grouped run takes the groups a worker with room for 1/`--groups` of the factors' state plans
(engine/budget.module_groups); one JSON line per run, then the comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_one(args) -> dict:
    import torch

    from services.engine.budget import module_groups, module_state_bytes
    from services.engine.factor_io import to_artifact
    from services.engine.fit import FitConfig, FitModel, fit_in_memory
    from services.engine.records import TrainingExample
    from services.engine.resources import MemoryBudget
    from services.storage.tensors import tensors_to_bytes

    torch.manual_seed(0)
    if args.model:
        from services.engine.model_io import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(args.model)
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from services.toy.tokenizer import build_word_tokenizer

        tokenizer = build_word_tokenizer([f"w{i}" for i in range(2000)])
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
            num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, attn_implementation="eager",
        )  # fmt: skip
        model = LlamaForCausalLM(config).eval()
    import random

    generator = random.Random(0)
    words = [f"w{i}" for i in range(2000)]
    examples = [
        TrainingExample(f"t{i}", " ".join(generator.choices(words, k=args.length))) for i in range(args.sequences)
    ]
    fit = FitModel(model, tokenizer, FitConfig(strategy="ekfac", modules="mlp", batch_size=8, max_length=args.length))
    sequences = fit.tokenize(examples)
    state = sum(module_state_bytes(m) for m in fit.tracked.values())
    groups = module_groups(fit.tracked, state // args.groups) if args.grouped else [list(fit.tracked)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    factors = fit_in_memory(fit, sequences, MemoryBudget(0), groups=groups)  # no capture cache: passes recompute
    seconds = time.perf_counter() - started
    files = {name: hashlib.sha256(tensors_to_bytes(t)).hexdigest() for name, t in to_artifact(factors)[1].items()}
    return {
        "grouped": args.grouped,
        "groups": len(groups),
        "modules": len(fit.tracked),
        "state_mib": round(state / 2**20, 1),
        "seconds": round(seconds, 2),
        "timings": factors.metadata["timings"],
        "peak_rss_mib_before": round(before / 1024, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "files_sha256": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--grouped", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    runs = []
    for grouped in (False, True):
        command = [sys.executable, __file__, "--one", *sys.argv[1:]] + (["--grouped"] if grouped else [])
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(output.splitlines()[-1]))
        print(json.dumps(runs[-1]))
    one, grouped = runs
    print(
        json.dumps(
            {
                "identical_factor_files": one["files_sha256"] == grouped["files_sha256"],
                "time_ratio": round(grouped["seconds"] / one["seconds"], 2),
                "peak_rss_delta_mib": round(grouped["peak_rss_mib"] - one["peak_rss_mib"], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
