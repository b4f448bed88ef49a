"""A grouped fit's finalize: every group's factors joined in memory, then published (what
run_finalize did), against the groups finalized and written one at a time
(factor_sets.publish_groups, what it does now). Peak RSS of each in a process of its own, and
whether the stored files are the same bytes.

    nice -n 19 python bench/bench_finalize.py [--layers 12] [--groups 6]

The modules: SmolLM2-135M's MLPs (576 wide, 1536 inner; the first `--layers` layers) on the meta
device. The inputs finalize reads (each group's eigenbases, float32, and reduced correction sums,
float64) are random, made when the stage would read them from the store: all groups up front in
the joined run, one group at a time in the streamed one. EK-FAC.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_one(args) -> dict:
    import dataclasses

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from services.catalog import factor_sets
    from services.engine.budget import module_groups, module_state_bytes
    from services.engine.capture import describe_all
    from services.engine.correction import CorrectionAccumulator
    from services.engine.covariance import Eigenbases
    from services.engine.factors import ModuleFactors
    from services.engine.fit import FitConfig, FittedModel, finalize
    from services.engine.modules import select_modules
    from services.storage import LocalStore

    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    tracked = describe_all(select_modules(model, "mlp"))
    state = sum(module_state_bytes(m) for m in tracked.values())
    groups = module_groups(tracked, state // args.groups)
    fitted = FittedModel(tracked, torch.float32, "bench")
    fit_config = FitConfig(strategy="ekfac", modules="mlp")

    def read_group(names):
        """One group's eigenbases and reduced correction sums, as finalize reads them."""
        generator = torch.Generator().manual_seed(list(tracked).index(names[0]))
        modules = {name: tracked[name] for name in names}
        factors = {}
        correction = CorrectionAccumulator(modules, None, None)
        for name, module in modules.items():
            d_in, d_out = module.d_in_full, module.d_out
            factors[name] = ModuleFactors(
                activation_eigenvectors=torch.randn(d_in, d_in, generator=generator),
                gradient_eigenvectors=torch.randn(d_out, d_out, generator=generator),
                activation_eigenvalues=torch.rand(d_in, generator=generator),
                gradient_eigenvalues=torch.rand(d_out, generator=generator),
            )
            correction.squared_sums[name] = torch.rand(d_out, d_in, generator=generator, dtype=torch.float64)
        correction.n_sequences, correction.n_tokens = 100, 1000
        return modules, Eigenbases(factors, 1000, {8}), correction

    store_dir = tempfile.mkdtemp()
    store = LocalStore(store_dir)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if args.streamed:
        def finalized(names):
            modules, eigen, correction = read_group(names)
            return finalize(dataclasses.replace(fitted, modules=modules), fit_config, eigen, [correction], 100)

        factor_sets.publish_groups(store, "bench", (finalized(names) for names in groups))
    else:  # what run_finalize did: every group read and joined, then finalized and published at once
        eigen, correction = None, None
        for names in groups:
            _, group_eigen, group_correction = read_group(names)
            eigen = group_eigen if eigen is None else eigen.merged(group_eigen)
            if correction is None:
                correction = group_correction
            else:
                correction.merge_modules(group_correction)
        factor_set = finalize(fitted, fit_config, eigen, [correction], 100)
        factor_sets.publish(store, "bench", factor_set)
        del factor_set, eigen, correction
    seconds = time.perf_counter() - started
    prefix = Path(store_dir) / factor_sets.FACTOR_SETS.prefix("bench")
    files = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(prefix.glob("*.safetensors"))}
    factors_mib = sum(path.stat().st_size for path in prefix.glob("*.safetensors")) / 2**20
    return {
        "streamed": args.streamed,
        "groups": len(groups),
        "modules": len(tracked),
        "factor_files_mib": round(factors_mib, 1),
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_mib": round(before / 1024, 1),
        "files": files,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--groups", type=int, default=6)
    parser.add_argument("--streamed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    runs = []
    for streamed in (False, True):
        command = [sys.executable, __file__, "--one", "--layers", str(args.layers), "--groups", str(args.groups)]
        command += ["--streamed"] if streamed else []
        output = subprocess.run(command, check=True, capture_output=True, text=True)
        runs.append(json.loads(output.stdout.strip().splitlines()[-1]))
    for run in runs:
        print(json.dumps({key: value for key, value in run.items() if key != "files"}))
    joined, streamed = runs
    print(
        json.dumps(
            {
                "same_bytes": joined["files"] == streamed["files"],
                "peak_rss_saved_mib": round(joined["peak_rss_mib"] - streamed["peak_rss_mib"], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
