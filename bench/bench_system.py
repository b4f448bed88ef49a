"""Service-system benchmark: embedded-system overhead over the in-process engine on the demo
workload, a factor fit with 2 workers vs 1, and bytes moved through the store per stage.

    .venv/bin/python bench/bench_system.py [--work-dir .cache/demo] [--repeats 2]

Prints a markdown table and writes bench/out/system.json. Each configuration runs `--repeats`
times and the fastest is kept (the machine is shared; the minimum is the least disturbed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from services.client import InfluenceClient
from services.engine.data import read_queries_jsonl, read_training_jsonl
from services.engine.fit import FitConfig, fit_factors
from services.engine.model_io import load_model_and_tokenizer
from services.engine.score import ScoreConfig, compute_scores
from services.system.embedded import EmbeddedSystem
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
        "scores": result.scores,
    }


def embedded(paths, fit_config, score_config, workers: int) -> dict:
    queries = read_queries_jsonl(paths.queries_jsonl)
    model = str(Path(paths.model_dir).resolve())
    started = time.perf_counter()
    with EmbeddedSystem(workers=workers) as system, InfluenceClient(system.target) as client:
        counting = CountingStore(system.system.store)
        system.system.store = counting
        for worker in system.workers:
            worker.context.store = counting
        up = time.perf_counter()
        dataset = client.register_dataset(model, paths.train_jsonl, shard_size=128, max_length=fit_config.max_length)
        registered = time.perf_counter()
        factor_set = client.fit_factors(model, dataset.name, batch_size=fit_config.batch_size)
        fitted = time.perf_counter()
        result = client.compute_scores(
            model, factor_set.name, dataset.name, queries, batch_size=score_config.batch_size, top_k=score_config.top_k
        )
        done = time.perf_counter()
        out = Path("bench/out/embedded-scores")
        client.download_result(result.name, out)
    from safetensors.torch import load_file

    return {
        "startup_s": up - started,
        "register_s": registered - up,
        "fit_s": fitted - registered,
        "score_s": done - fitted,
        "total_s": done - started,
        "shards": dataset.num_shards,
        "bytes_written": dict(counting.written),
        "bytes_read": dict(counting.read),
        "scores": load_file(str(out / "scores.safetensors"))["scores"],
    }


def best(runs: list[dict]) -> dict:
    return min(runs, key=lambda run: run["total_s"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work-dir", default=".cache/demo")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    paths = prepare_demo(Path(args.work_dir), progress=False)
    fit_config = FitConfig(batch_size=16, max_length=128)
    score_config = ScoreConfig(batch_size=16, max_length=128, top_k=5)

    local = best([in_process(paths, fit_config, score_config) for _ in range(args.repeats)])
    one = best([embedded(paths, fit_config, score_config, workers=1) for _ in range(args.repeats)])
    two = best([embedded(paths, fit_config, score_config, workers=2) for _ in range(args.repeats)])
    agreement = float((one["scores"] - local["scores"]).abs().max() / local["scores"].abs().max())

    def row(name, run, keys):
        return f"| {name} | " + " | ".join(f"{run[k]:.2f}" if k in run else "-" for k in keys) + " |"

    keys = ["total_s", "fit_s", "score_s"]
    print("| configuration | total s | fit s | score s |\n|---|---|---|---|")
    print(row("in-process engine (model load included)", local, keys))
    print(row("embedded system, 1 worker", one, keys))
    print(row("embedded system, 2 workers", two, keys))
    overhead = one["total_s"] / local["total_s"] - 1
    print(
        f"\nembedded overhead: {overhead:+.1%} (total), fit {one['fit_s'] / local['fit_s'] - 1:+.1%}, "
        f"score {one['score_s'] / local['score_s'] - 1:+.1%}; max relative score difference {agreement:.1e}"
    )
    print(f"fit with 2 workers vs 1: {two['fit_s']:.2f} s vs {one['fit_s']:.2f} s ({one['fit_s'] / two['fit_s']:.2f}x)")
    print("\n| store prefix | bytes written | bytes read |\n|---|---|---|")
    for kind in sorted(set(one["bytes_written"]) | set(one["bytes_read"])):
        print(f"| {kind} | {one['bytes_written'].get(kind, 0):,} | {one['bytes_read'].get(kind, 0):,} |")
    Path("bench/out").mkdir(parents=True, exist_ok=True)
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "in_process": {k: v for k, v in local.items() if k != "scores"},
        "embedded_1": {k: v for k, v in one.items() if k != "scores"},
        "embedded_2": {k: v for k, v in two.items() if k != "scores"},
        "overhead": overhead,
        "max_relative_score_difference": agreement,
    }
    Path("bench/out/system.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
