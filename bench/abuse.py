"""Abuse bench: a legitimate tenant's calls beside hostile callers, against `influence serve`.

    .venv/bin/python bench/abuse.py [--seconds 20] [--attackers 6] [--size-mib 64] [--holders 64]
                                    [--out bench/out/abuse.json]

Starts `influence serve --auth-tokens` (embedded Redis, a local store, no workers) on loopback as
its own process, with tenants alice and bob. Two phases of --seconds each: quiet, then under
attack. Throughout, bob (the legitimate tenant, in a process of his own, so the attackers' threads
do not slow his client) loops ListDatasets and GetOperation and their latencies are recorded. Under
attack: --attackers threads per kind send --size-mib requests (built once) without a token, with a
wrong token and with alice's valid token (over the message limit), unary and as UploadDataset
streams; --holders threads of alice hold WaitOperation calls open, and --holders threads hold health
Watch streams open without a token (more than --max-unauthenticated-streams allows). Reports bob's
latency percentiles per phase, the server's RSS (start, peak, end), and the attackers' answers by
status code. Attackers and server share the machine's cores: on a small machine bob's latency under
attack mostly measures that.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
import psutil
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gen.influence.v1 import common_pb2, gradient_service_pb2, gradient_service_pb2_grpc

MiB = 2**20
TOKENS = {"alice": secrets.token_hex(16), "bob": secrets.token_hex(16)}


def auth(tenant: str | None) -> tuple:
    if tenant is None:
        return ()
    return (("authorization", f"Bearer {TOKENS.get(tenant, 'not-a-valid-token-at-all')}"),)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


def start_server(scratch: Path, port: int) -> subprocess.Popen:
    tokens = scratch / "tokens.txt"
    tokens.write_text("".join(f"{token} {tenant}\n" for tenant, token in TOKENS.items()))
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "0",
         "--auth-tokens", str(tokens), "--state-dir", str(scratch / "state"), "--log-level", "error"],
        stdout=(scratch / "serve.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if (
                health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                == health_pb2.HealthCheckResponse.SERVING
            ):
                return process
        except grpc.RpcError:
            time.sleep(0.5)
    raise RuntimeError((scratch / "serve.log").read_text())


def legitimate(target: str, token: str, seconds: float, results) -> None:
    """bob, in a process of his own: ListDatasets and GetOperation, one after the other, as fast as
    they answer, for `seconds`; (latencies, failures) put on `results`."""
    TOKENS["bob"] = token
    latencies, failures = [], []
    channel = grpc.insecure_channel(target)
    datasets = gradient_service_pb2_grpc.GradientServiceStub(channel)
    operations = operations_pb2_grpc.OperationsStub(channel)
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        started = time.monotonic()
        try:
            datasets.ListDatasets(gradient_service_pb2.ListDatasetsRequest(), metadata=auth("bob"), timeout=30)
            try:
                operations.GetOperation(
                    operations_pb2.GetOperationRequest(name="operations/none"), metadata=auth("bob"), timeout=30
                )
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            latencies.append(time.monotonic() - started)
        except grpc.RpcError as error:
            failures.append(f"{error.code().name}: {error.details()}")
    channel.close()
    results.put((latencies, failures))


def attacker(target: str, stop: threading.Event, size: int, model: str, answers: collections.Counter, who) -> None:
    """Oversized requests, unary and streamed, as `who` (None: no token; "mallory": a wrong one)."""
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)])
    register = channel.unary_unary("/influence.v1.GradientService/RegisterDataset")  # bytes in, bytes out
    upload = channel.stream_unary("/influence.v1.GradientService/UploadDataset")
    spec = common_pb2.ModelSpec(path=model)
    jsonl = b'{"text": "w1"}\n' * (size // 15)
    big = gradient_service_pb2.RegisterDatasetRequest(model=spec, jsonl=jsonl).SerializeToString()  # built once
    settings = gradient_service_pb2.UploadDatasetRequest(
        request=gradient_service_pb2.RegisterDatasetRequest(model=spec)
    )
    chunks = [settings.SerializeToString(), gradient_service_pb2.UploadDatasetRequest(data=jsonl).SerializeToString()]
    n = 0
    while not stop.is_set():
        n += 1
        try:
            if n % 2:
                register(big, metadata=auth(who), timeout=60)
            else:
                upload(iter(chunks), metadata=auth(who), timeout=60)
            answers["OK"] += 1
        except grpc.RpcError as error:
            answers[error.code().name] += 1
    channel.close()


def holder(target: str, stop: threading.Event, operation: str, answers: collections.Counter, tenant) -> None:
    """Keeps a call open: alice's WaitOperation on a queued job, or a health Watch without a token."""
    channel = grpc.insecure_channel(target)
    while not stop.is_set():
        try:
            if tenant is None:
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
                for _ in watch:
                    pass
            else:
                request = operations_pb2.WaitOperationRequest(name=operation, timeout=duration_pb2.Duration(seconds=4))
                operations_pb2_grpc.OperationsStub(channel).WaitOperation(request, metadata=auth(tenant), timeout=30)
            answers["OK"] += 1
        except grpc.RpcError as error:
            answers[error.code().name] += 1
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                time.sleep(0.05)
    channel.close()


def phase(target: str, seconds: float, hostile: list) -> dict:
    stop = threading.Event()
    threads = [threading.Thread(target=function, args=(target, stop, *arguments)) for function, arguments in hostile]
    for thread in threads:
        thread.start()
    time.sleep(1 if hostile else 0)  # the attack under way before bob's first call
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    bob = context.Process(target=legitimate, args=(target, TOKENS["bob"], seconds, results))
    bob.start()
    latencies, failures = results.get(timeout=seconds + 300)
    bob.join(30)
    stop.set()
    for thread in threads:
        thread.join(120)
    return {
        "legitimate_calls": len(latencies),
        "legitimate_failures": failures[:3],
        "legitimate_ms": {q: round(1000 * percentile(latencies, q), 1) for q in (50, 90, 99)},
        "legitimate_max_ms": round(1000 * max(latencies), 1) if latencies else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--attackers", type=int, default=6, help="threads per kind of oversized sender")
    parser.add_argument("--size-mib", type=int, default=64, help="size of each oversized request")
    parser.add_argument("--holders", type=int, default=64, help="threads per kind of held-open call")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "abuse.json"))
    args = parser.parse_args()
    from tests.servers.ports import free_ports

    from services.toy.models import build_tiny_model, save_model_dir
    from services.toy.tokenizer import build_word_tokenizer

    scratch = Path(tempfile.mkdtemp(prefix="influence-abuse-"))
    tokenizer = build_word_tokenizer([f"w{i}" for i in range(16)])
    save_model_dir(build_tiny_model("gpt2", len(tokenizer), d_model=16, seed=0), tokenizer, scratch / "model")
    port = free_ports(1)[0]
    target = f"127.0.0.1:{port}"
    process = start_server(scratch, port)
    server = psutil.Process(process.pid)
    try:
        channel = grpc.insecure_channel(target)
        queued = gradient_service_pb2_grpc.GradientServiceStub(channel).RegisterDataset(
            gradient_service_pb2.RegisterDatasetRequest(
                model=common_pb2.ModelSpec(path=str(scratch / "model")), jsonl=b'{"text": "w1 w2 w3"}\n'
            ),
            metadata=auth("alice"),
            timeout=60,
        )  # never done: no worker runs, so alice's WaitOperation calls stay open
        channel.close()
        quiet = phase(target, args.seconds, [])
        rss = {"start_mib": server.memory_info().rss / MiB}
        answers = {kind: collections.Counter() for kind in ("no token", "wrong token", "alice, oversized", "held")}
        hostile = [
            (attacker, (args.size_mib * MiB, str(scratch / "model"), answers[kind], who))
            for kind, who in (("no token", None), ("wrong token", "mallory"), ("alice, oversized", "alice"))
            for _ in range(args.attackers)
        ]
        hostile += [
            (holder, (queued.name, answers["held"], tenant)) for tenant in ("alice", None) for _ in range(args.holders)
        ]
        peak, sampling = [rss["start_mib"]], threading.Event()

        def sample() -> None:
            while not sampling.wait(0.02):
                peak[0] = max(peak[0], server.memory_info().rss / MiB)

        sampler = threading.Thread(target=sample)
        sampler.start()
        attacked = phase(target, args.seconds, hostile)
        sampling.set()
        sampler.join()
        time.sleep(1)
        rss.update(peak_mib=peak[0], end_mib=server.memory_info().rss / MiB)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    result = {
        "seconds_per_phase": args.seconds,
        "attackers_per_kind": args.attackers,
        "size_mib": args.size_mib,
        "holders_per_kind": args.holders,
        "quiet": quiet,
        "attacked": attacked,
        "server_rss_mib": {key: round(value, 1) for key, value in rss.items()},
        "attack_answers": {kind: dict(counter) for kind, counter in answers.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
