"""Load test: N concurrent clients submit scoring jobs over loopback gRPC for a fixed time.

    .venv/bin/python bench/load.py [--clients 1,8,64] [--seconds 30] [--workers 2] [--max-queued 64]
                                   [--server HOST:PORT --model DIR]

Without --server it starts an embedded system (a real redis-server, a local store, the gRPC
services and `--workers` in-process workers) with INFLUENCE_MAX_QUEUED_TASKS = --max-queued, on
a tiny model it builds itself, registers a small dataset and fits factors once. Each client
then loops for --seconds: ComputeScores (one query, a fresh request_id), and on acceptance waits
for the job to end; a RESOURCE_EXHAUSTED refusal (queue full) is counted and retried after
100 ms. Afterwards every accepted operation is looked up: each must exist once and have
SUCCEEDED ("accounted"). Prints, per client count: accepted, refused, completed jobs/s, and
submit and end-to-end latency percentiles; writes bench/out/load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc

from services.client import InfluenceClient
from services.gen.influence.v1 import common_pb2, query_service_pb2

WORDS = [f"w{i}" for i in range(64)]


def build_inputs(directory: Path) -> tuple[Path, Path]:
    """A tiny GPT-2 and 64 training sequences, built here (nothing downloaded)."""
    from services.toy.models import build_tiny_model, save_model_dir
    from services.toy.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(WORDS)
    save_model_dir(build_tiny_model("gpt2", len(tokenizer), d_model=16, seed=0), tokenizer, directory / "model")
    lines = [{"text": " ".join(WORDS[(i * 5 + j * 3) % 64] for j in range(12))} for i in range(64)]
    (directory / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return directory / "model", directory / "train.jsonl"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def client_loop(target, model, factor_set, dataset, stop_at, record, lock):
    """One client: submit, wait, repeat until `stop_at`."""
    with InfluenceClient(target) as client:
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            request = query_service_pb2.ComputeScoresRequest(
                request_id=uuid.uuid4().hex,
                model=common_pb2.ModelSpec(path=str(model)),
                factor_set=factor_set,
                dataset=dataset,
                queries=[query_service_pb2.Query(id="q", prompt=f"{WORDS[n % 64]} w1", completion=WORDS[(n * 3) % 64])],
                top_k=3,
            )
            started = time.monotonic()
            try:
                operation = client.queries.ComputeScores(request, timeout=60)
            except grpc.RpcError as error:
                with lock:
                    key = "refused" if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "errors"
                    record[key] += 1
                    if key == "errors":
                        record["error_messages"].append(f"{error.code().name}: {error.details()}")
                time.sleep(0.1)
                continue
            submitted = time.monotonic()
            with lock:
                record["accepted"].append(operation.name)
                record["submit_seconds"].append(submitted - started)
            try:
                client.wait(operation)
                with lock:
                    record["end_to_end_seconds"].append(time.monotonic() - started)
            except Exception as error:  # a failed job is reported, not hidden
                with lock:
                    record["failed"].append(f"{operation.name}: {error}")


def run_load(target, model, factor_set, dataset, clients: int, seconds: float) -> dict:
    record = {
        "accepted": [],
        "refused": 0,
        "errors": 0,
        "error_messages": [],
        "failed": [],
        "submit_seconds": [],
        "end_to_end_seconds": [],
    }
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    started = time.monotonic()
    threads = [
        threading.Thread(target=client_loop, args=(target, model, factor_set, dataset, stop_at, record, lock))
        for _ in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    # account for every accepted request: each operation exists once and succeeded
    with InfluenceClient(target) as client:
        states = {}
        for name in record["accepted"]:
            operation = client.get_operation(name)
            states[name] = "SUCCEEDED" if operation.done and not operation.HasField("error") else "NOT SUCCEEDED"
    accounted = sum(state == "SUCCEEDED" for state in states.values())
    completed = len(record["end_to_end_seconds"])
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "accepted": len(record["accepted"]),
        "unique_operations": len(set(record["accepted"])),
        "accounted_succeeded": accounted,
        "refused_resource_exhausted": record["refused"],
        "other_errors": record["errors"],
        "error_samples": record["error_messages"][:3],
        "failed_jobs": record["failed"][:3],
        "jobs_per_second": round(completed / elapsed, 3),
        "submit_ms": {q: round(1000 * percentile(record["submit_seconds"], q), 1) for q in (50, 90, 99)},
        "end_to_end_ms": {q: round(1000 * percentile(record["end_to_end_seconds"], q), 1) for q in (50, 90, 99)},
        "end_to_end_mean_ms": round(1000 * statistics.fmean(record["end_to_end_seconds"]), 1) if completed else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,64", help="comma-separated client counts, run one after another")
    parser.add_argument("--seconds", type=float, default=30.0, help="submitting time per client count")
    parser.add_argument("--workers", type=int, default=2, help="embedded: in-process workers")
    parser.add_argument("--max-queued", type=int, default=64, help="embedded: INFLUENCE_MAX_QUEUED_TASKS")
    parser.add_argument("--server", default="", help="a running system instead of an embedded one")
    parser.add_argument("--model", default="", help="with --server: a model directory the server can read")
    parser.add_argument("--data", default="", help="with --server: TRAIN.jsonl")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "load.json"))
    args = parser.parse_args()
    counts = [int(count) for count in args.clients.split(",") if count.strip()]
    scratch = Path(tempfile.mkdtemp(prefix="influence-load-"))
    system = None
    if args.server:
        if not args.model or not args.data:
            parser.error("--server needs --model and --data")
        target, model, data = args.server, Path(args.model), Path(args.data)
    else:
        from services.embedded import EmbeddedSystem

        os.environ["INFLUENCE_MAX_QUEUED_TASKS"] = str(args.max_queued)
        model, data = build_inputs(scratch)
        system = EmbeddedSystem(scratch / "system", workers=args.workers).start()
        target = system.target
    try:
        with InfluenceClient(target) as client:
            dataset = client.register_dataset(model, data, shard_size=32)
            factors = client.fit_factors(model, dataset.name, batch_size=8)
        results = []
        for clients in counts:
            result = run_load(target, model, factors.name, dataset.name, clients, args.seconds)
            results.append(result)
            print(json.dumps(result), flush=True)
        print()
        print(
            "| clients | accepted | refused (queue full) | accounted | jobs/s "
            "| submit p50/p90/p99 ms | end-to-end p50/p90/p99 ms |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in results:
            submit, total = r["submit_ms"], r["end_to_end_ms"]
            print(
                f"| {r['clients']} | {r['accepted']} | {r['refused_resource_exhausted']} | "
                f"{r['accounted_succeeded']}/{r['accepted']} | {r['jobs_per_second']} | "
                f"{submit[50]}/{submit[90]}/{submit[99]} | {total[50]}/{total[90]}/{total[99]} |"
            )
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"workers": args.workers, "max_queued": args.max_queued, "runs": results}, indent=2))
        lost = [r for r in results if not r["accepted"] == r["accounted_succeeded"] == r["unique_operations"]]
        return 1 if lost else 0
    finally:
        if system is not None:
            system.stop()
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
