"""Service-system benchmark: embedded-system overhead over the in-process engine on the demo
workload, a factor fit with 2 workers vs 1, and bytes moved through the store per stage.

    .venv/bin/python bench/bench_system.py [--work-dir .cache/demo] [--repeats 5] [--scale 1]

`--scale K` repeats the demo's training corpus K times (ids made unique), to see the fixed
costs amortise. Prints a markdown table and writes bench/out/system-x{K}.json. Configurations
run interleaved, `--repeats` rounds, and each reports its median round (the machine is shared
and sub-second timings jitter by ±30%); the overhead is also given as the median of the
per-round ratios, which cancels slow stretches of the host that hit one round.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from services.embedded import EmbeddedSystem
from services.engine.fit import FitConfig, fit_factors
from services.engine.model_io import load_model_and_tokenizer
from services.engine.records import read_queries_jsonl, read_training_jsonl
from services.engine.score import ScoreConfig, compute_scores
from services.toy.demo_data import prepare_demo


class CountingStore:
    """Wraps a store and counts bytes read and written per artifact kind / job stage."""

    def __init__(self, inner):
        self.inner = inner
        self.written: dict[str, int] = defaultdict(int)
        self.read: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    @staticmethod
    def kind(key: str) -> str:
        parts = key.split("/")
        if parts[0] == "jobs" and len(parts) > 3:
            return f"jobs/{parts[2]}"
        if parts[0] == "jobs":
            return f"jobs/{parts[2].split('.')[0]}"
        return parts[0]

    def put_bytes(self, key, data):
        with self._lock:
            self.written[self.kind(key)] += len(data)
        return self.inner.put_bytes(key, data)

    def put_buffers(self, key, buffers):
        with self._lock:
            self.written[self.kind(key)] += sum(memoryview(buffer).nbytes for buffer in buffers)
        return self.inner.put_buffers(key, buffers)

    def get_bytes(self, key):
        data = self.inner.get_bytes(key)
        with self._lock:
            self.read[self.kind(key)] += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.inner, name)


def in_process(paths, fit_config, score_config) -> dict:
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(paths.model_dir)
    examples, queries = read_training_jsonl(paths.train_jsonl), read_queries_jsonl(paths.queries_jsonl)
    loaded = time.perf_counter()
    factors = fit_factors(model, tokenizer, examples, fit_config)
    fitted = time.perf_counter()
    result = compute_scores(model, tokenizer, factors, examples, queries, score_config)
    done = time.perf_counter()
    return {
        "load_s": loaded - started,
        "fit_s": fitted - loaded,
        "score_s": done - fitted,
        "total_s": done - started,
        "scores": result.scores.tolist(),
    }


def embedded(paths, fit_config, score_config, workers: int) -> dict:
    """The CLI's way: a foreground embedded system (worker 0 on this thread, the client on another)."""
    queries = read_queries_jsonl(paths.queries_jsonl)
    model = str(Path(paths.model_dir).resolve())
    times = {"started": time.perf_counter()}
    out = Path("bench/out/embedded-scores")

    def body(client) -> dict:
        times["up"] = time.perf_counter()
        dataset = client.register_dataset(model, paths.train_jsonl, max_length=fit_config.max_length)
        times["registered"] = time.perf_counter()
        factor_set = client.fit_factors(model, dataset.name, batch_size=fit_config.batch_size)
        times["fitted"] = time.perf_counter()
        result = client.compute_scores(
            model, factor_set.name, dataset.name, queries, batch_size=score_config.batch_size, top_k=score_config.top_k
        )
        times["done"] = time.perf_counter()
        client.download_result(result.name, out)
        return {"shards": dataset.num_shards}

    with EmbeddedSystem(workers=workers, foreground=True) as system:
        counting = CountingStore(system.system.store)
        system.system.store = counting
        for worker in system.workers:
            worker.context.store = counting
        info = system.run(body)
    from safetensors.torch import load_file

    return {
        "startup_s": times["up"] - times["started"],
        "register_s": times["registered"] - times["up"],
        "fit_s": times["fitted"] - times["registered"],
        "score_s": times["done"] - times["fitted"],
        "total_s": times["done"] - times["started"],
        "shards": info["shards"],
        "bytes_written": dict(counting.written),
        "bytes_read": dict(counting.read),
        "scores": load_file(str(out / "scores.safetensors"))["scores"].tolist(),
    }


CONFIGURATIONS = {
    "in_process": lambda paths, fit, score: in_process(paths, fit, score),
    "embedded_1": lambda paths, fit, score: embedded(paths, fit, score, workers=1),
    "embedded_2": lambda paths, fit, score: embedded(paths, fit, score, workers=2),
}


def run_one(name: str, paths, fit_config, score_config) -> dict:
    """One configuration in a fresh process, as a CLI command would run it."""
    command = [sys.executable, __file__, "--configuration", name, "--train", str(paths.train_jsonl)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def median(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda run: run["total_s"])[len(runs) // 2]


def scaled_corpus(paths, scale: int) -> Path:
    """The demo training corpus repeated `scale` times, as a JSONL file under bench/out."""
    if scale == 1:
        return Path(paths.train_jsonl)
    lines = Path(paths.train_jsonl).read_text().splitlines()
    target = Path(f"bench/out/train-x{scale}.jsonl")
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w") as handle:
        for copy in range(scale):
            for line in lines:
                record = json.loads(line)
                record["id"] = f"{record['id']}-{copy}"
                handle.write(json.dumps(record) + "\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work-dir", default=".cache/demo")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--configuration", choices=sorted(CONFIGURATIONS), help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    args = parser.parse_args()
    paths = prepare_demo(Path(args.work_dir), progress=False)
    fit_config = FitConfig(batch_size=16, max_length=128)
    score_config = ScoreConfig(batch_size=16, max_length=128, top_k=5)
    if args.configuration:  # a child process: run one configuration, print its JSON
        paths = dataclasses.replace(paths, train_jsonl=Path(args.train))
        print(json.dumps(CONFIGURATIONS[args.configuration](paths, fit_config, score_config)))
        return
    paths = dataclasses.replace(paths, train_jsonl=scaled_corpus(paths, args.scale))

    rounds = {name: [] for name in CONFIGURATIONS}
    for _ in range(args.repeats):
        for name in CONFIGURATIONS:
            rounds[name].append(run_one(name, paths, fit_config, score_config))
    local, one, two = (median(rounds[name]) for name in CONFIGURATIONS)
    one_scores, local_scores = torch.tensor(one["scores"]), torch.tensor(local["scores"])
    agreement = float((one_scores - local_scores).abs().max() / local_scores.abs().max())

    def row(name, run, keys):
        return f"| {name} | " + " | ".join(f"{run[k]:.2f}" if k in run else "-" for k in keys) + " |"

    keys = ["total_s", "fit_s", "score_s"]
    print("| configuration | total s | fit s | score s |\n|---|---|---|---|")
    print(row("in-process engine (model load included)", local, keys))
    print(row("embedded system, 1 worker", one, keys))
    print(row("embedded system, 2 workers", two, keys))
    overhead = one["total_s"] / local["total_s"] - 1
    # Rounds run the configurations back to back, so a round's ratio cancels slow host periods
    # that the ratio of two medians does not.
    paired = sorted(
        e["total_s"] / i["total_s"] - 1 for e, i in zip(rounds["embedded_1"], rounds["in_process"], strict=True)
    )
    print(
        f"\nembedded overhead: {overhead:+.1%} (total), fit {one['fit_s'] / local['fit_s'] - 1:+.1%}, "
        f"score {one['score_s'] / local['score_s'] - 1:+.1%}; max relative score difference {agreement:.1e}"
    )
    print(
        f"paired by round: median {paired[len(paired) // 2]:+.1%}, "
        f"range {paired[0]:+.1%} .. {paired[-1]:+.1%} over {len(paired)} rounds"
    )
    print(f"fit with 2 workers vs 1: {two['fit_s']:.2f} s vs {one['fit_s']:.2f} s ({one['fit_s'] / two['fit_s']:.2f}x)")
    print("\n| store prefix | bytes written | bytes read |\n|---|---|---|")
    for kind in sorted(set(one["bytes_written"]) | set(one["bytes_read"])):
        print(f"| {kind} | {one['bytes_written'].get(kind, 0):,} | {one['bytes_read'].get(kind, 0):,} |")
    Path("bench/out").mkdir(parents=True, exist_ok=True)
    summary = {
        "scale": args.scale,
        "training_sequences": len(Path(paths.train_jsonl).read_text().splitlines()),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "in_process": {k: v for k, v in local.items() if k != "scores"},
        "embedded_1": {k: v for k, v in one.items() if k != "scores"},
        "embedded_2": {k: v for k, v in two.items() if k != "scores"},
        "overhead": overhead,
        "paired_overhead_median": paired[len(paired) // 2],
        "paired_overhead_range": [paired[0], paired[-1]],
        "max_relative_score_difference": agreement,
    }
    Path(f"bench/out/system-x{args.scale}.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
