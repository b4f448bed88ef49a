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

    .venv/bin/python bench/load.py --burst 20 [--rounds 3] [--tenants 2] [--queries 2] [--workers 2]
                                   [--coalesce-ms 0,200] [--sequences 2000] [--out FILE]

With --burst: index requests instead (`index_burst`): for each --coalesce-ms setting a fresh
`influence serve` with tokens for --tenants tenants, each with its own index; rounds of --burst
concurrent requests released together; p50/p99 latency, throughput, coalesced scans (BENCHMARKS.md,
"Coalescing: concurrent index requests").
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


def build_inputs(directory: Path, sequences: int = 64, d_model: int = 16) -> tuple[Path, Path]:
    """A tiny GPT-2 and `sequences` training sequences, built here (nothing downloaded)."""
    from services.toy.models import build_tiny_model, save_model_dir
    from services.toy.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(WORDS)
    save_model_dir(build_tiny_model("gpt2", len(tokenizer), d_model=d_model, seed=0), tokenizer, directory / "model")
    lines = [{"text": " ".join(WORDS[(i * 5 + j * 3 + i // 64) % 64] for j in range(12))} for i in range(sequences)]
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


def task_seconds(metrics_port: int) -> dict[str, list[float]]:
    """{kind: [seconds, tasks]} of the succeeded tasks so far (the server's influence_task_seconds)."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    totals: dict[str, list[float]] = {}
    for suffix, position in (("_sum", 0), ("_count", 1)):
        pattern = rf'influence_task_seconds{suffix}{{kind="(\w+)",outcome="succeeded"}} ([0-9.e+]+)'
        for kind, value in re.findall(pattern, text):
            totals.setdefault(kind, [0.0, 0.0])[position] = float(value)
    return totals


def serve_process(
    state: Path, port: int, tokens: Path, roots: Path, workers: int, coalesce_ms: float, metrics_port: int
):
    """`influence serve` (all roles, embedded Redis and store in `state`, `workers` in-process
    workers, tenants from `tokens`) as a child process, its log in state/serve.log."""
    import subprocess

    state.mkdir(parents=True, exist_ok=True)
    log = (state / "serve.log").open("w")
    command = [sys.executable, "-m", "services.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--state-dir", str(state), "--workers", str(workers), "--auth-tokens", str(tokens)]
    command += ["--model-roots", str(roots), "--coalesce-ms", f"{coalesce_ms:g}", "--log-level", "info"]
    command += ["--metrics-port", str(metrics_port)]
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)


def wait_for_server(target: str, process, log: Path, seconds: float = 300) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + seconds
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("influence serve exited: " + log.read_text()[-2000:])
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise RuntimeError("influence serve did not start")


def index_request(target, token, model, factors, index, queries, barrier, latencies: list) -> None:
    """One request of a burst: released with the others (`barrier`), its end-to-end seconds appended."""
    with InfluenceClient(target, token=token, timeout=600) as client:
        barrier.wait()
        started = time.monotonic()
        client.compute_scores(model, factors, "", queries, index=index, top_k=5)
        latencies.append(time.monotonic() - started)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def index_burst(args, scratch: Path) -> dict:
    """Each --coalesce-ms setting on a fresh `influence serve` (--workers workers, --tenants
    tenants with tokens): every tenant uploads the same data, fits factors and builds the default
    index; one warm-up burst; then --rounds bursts of --burst concurrent ComputeScores requests
    (--queries queries each, scored against the tenant's index, requests alternating between tenants,
    released together). End-to-end latency per request, throughput per round (requests / the
    round's wall time), and how many index_score tasks ran coalesced (the server's log)."""
    from services.engine.records import Query

    model, data = build_inputs(scratch, sequences=args.sequences, d_model=args.d_model)
    tokens = scratch / "tokens.txt"
    tenants = [f"tenant{n}" for n in range(args.tenants)]
    tokens.write_text("".join(f"token-of-the-{tenant} {tenant}\n" for tenant in tenants))
    settings = {}
    for coalesce_ms in [float(value) for value in args.coalesce_ms.split(",")]:
        port = free_port()
        target = f"127.0.0.1:{port}"
        state = scratch / f"serve-{coalesce_ms:g}"
        metrics_port = free_port()
        process = serve_process(state, port, tokens, scratch, args.workers, coalesce_ms, metrics_port)
        try:
            wait_for_server(target, process, state / "serve.log")
            indexes = {}
            for tenant in tenants:
                with InfluenceClient(target, token=f"token-of-the-{tenant}", timeout=600) as client:
                    dataset = client.register_dataset(model, data, shard_size=args.sequences)
                    factors = client.fit_factors(model, dataset.name, batch_size=16)
                    indexes[tenant] = (factors.name, client.build_index(model, factors.name, dataset.name).name)

            rounds = []
            for round_number in range(args.rounds + 1):  # round 0 warms the workers up
                latencies: list[float] = []
                barrier = threading.Barrier(args.burst)
                threads = []
                for n in range(args.burst):
                    tenant = tenants[n % len(tenants)]
                    queries = [
                        Query(f"q{j}", f"{WORDS[(n + 7 * j + round_number) % 64]} w1", WORDS[(3 * n + j) % 64])
                        for j in range(args.queries)
                    ]
                    call = (target, f"token-of-the-{tenant}", model, *indexes[tenant], queries, barrier, latencies)
                    threads.append(threading.Thread(target=index_request, args=call))
                started = time.monotonic()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                wall = time.monotonic() - started
                if len(latencies) != args.burst:
                    raise RuntimeError(f"{args.burst - len(latencies)} requests failed")
                if round_number:
                    rounds.append({"wall_seconds": round(wall, 2), "latencies": latencies})
                else:
                    warm = task_seconds(metrics_port)
                print(f"coalesce {coalesce_ms:g} ms, round {round_number}: {wall:.1f} s", flush=True)
            measured = task_seconds(metrics_port)
        finally:
            process.terminate()
            process.wait(60)
        log = (state / "serve.log").read_text()
        batches = [int(match) for match in re.findall(r"(\d+) index_score tasks coalesced", log)]
        latencies = [value for entry in rounds for value in entry["latencies"]]
        requests = len(latencies)
        settings[f"{coalesce_ms:g}"] = {
            "requests": requests,
            "p50_seconds": round(percentile(latencies, 50), 2),
            "p99_seconds": round(percentile(latencies, 99), 2),
            "mean_seconds": round(statistics.fmean(latencies), 2),
            "requests_per_second": round(requests / sum(entry["wall_seconds"] for entry in rounds), 3),
            "round_walls": [entry["wall_seconds"] for entry in rounds],
            "coalesced_batches": len(batches),
            "coalesced_tasks": sum(batches),
            # the measured rounds' tasks per kind: [wall seconds summed (a batch's once per member), tasks]
            "task_seconds": {
                kind: [round(total[0] - warm.get(kind, [0, 0])[0], 2), int(total[1] - warm.get(kind, [0, 0])[1])]
                for kind, total in measured.items()
                if kind.startswith("index_") and kind != "index_shard" and kind != "index_publish"
            },
        }
        print(json.dumps({"coalesce_ms": coalesce_ms, **settings[f"{coalesce_ms:g}"]}), flush=True)
    return settings


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
    burst = parser.add_argument_group("index bursts (coalescing): instead of the timed load")
    burst.add_argument("--burst", type=int, default=0, help="concurrent index requests per round (0: the timed load)")
    burst.add_argument("--rounds", type=int, default=3, help="measured bursts per setting (after one warm-up)")
    burst.add_argument("--tenants", type=int, default=2, help="tenants the requests alternate between")
    burst.add_argument("--queries", type=int, default=2, help="queries per request")
    burst.add_argument("--coalesce-ms", default="0,200", help="the servers' --coalesce-ms settings, one run each")
    burst.add_argument("--sequences", type=int, default=2000, help="training sequences in each tenant's index")
    burst.add_argument("--d-model", type=int, default=16, help="the tiny model's width")
    args = parser.parse_args()
    if args.burst:
        scratch = Path(tempfile.mkdtemp(prefix="influence-burst-"))
        try:
            settings = index_burst(args, scratch)
        finally:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
        print()
        print(
            "| --coalesce-ms | requests | p50 s | p99 s | mean s | requests/s | rounds' wall s "
            "| coalesced tasks (batches) | task wall s summed per kind (tasks) |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for setting, r in settings.items():
            print(
                f"| {setting} | {r['requests']} | {r['p50_seconds']} | {r['p99_seconds']} | {r['mean_seconds']} | "
                f"{r['requests_per_second']} | {', '.join(map(str, r['round_walls']))} | "
                f"{r['coalesced_tasks']} ({r['coalesced_batches']}) | "
                + ", ".join(f"{kind} {seconds} ({tasks})" for kind, (seconds, tasks) in r["task_seconds"].items())
                + " |"
            )
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"arguments": vars(args), "settings": settings}, indent=2))
        return 0
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
