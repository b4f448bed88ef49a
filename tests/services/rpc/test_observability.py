"""What an operator watches: Prometheus metrics (/metrics), health that follows Redis and the
store, JSON logs. Against `influence serve` as its own process on a Redis server of the test's
own, which the test stops and starts again."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest
import redis as redis_client
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli import main
from tests.support.servers.ports import free_ports, wait_until
from tests.support.servers.redis import RedisServer

pytestmark = [pytest.mark.needs_servers, pytest.mark.slow]  # a server of its own, stopped and restarted under it


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the series `name{labels}` in a Prometheus text exposition (None if absent)."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(match.group(3))
    return None


@pytest.fixture()
def observed_server(request, tmp_path):
    """`influence serve` with one in-process worker (or as many as the test's indirect parameter says)."""
    workers = getattr(request, "param", 1)
    redis = RedisServer().start()
    grpc_port, metrics_port = free_ports(2)
    log_path = tmp_path / "serve.log"
    env = {
        **os.environ,
        "INFLUENCE_REDIS_URL": redis.url,
        "INFLUENCE_PORT": str(grpc_port),
        "INFLUENCE_METRICS_PORT": str(metrics_port),
        "INFLUENCE_LOG_FORMAT": "json",
        "INFLUENCE_LOG_LEVEL": "info",
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "serve",
                "--host",
                "127.0.0.1",
                *("--workers", str(workers)),
                "--state-dir",
                str(tmp_path / "s"),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    health = health_pb2_grpc.HealthStub(channel)

    def status() -> int | None:
        if process.poll() is not None:
            raise RuntimeError(log_path.read_text())
        try:
            return health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return None

    wait_until(lambda: status() == health_pb2.HealthCheckResponse.SERVING, 60, "influence serve")
    try:
        yield {
            "target": f"127.0.0.1:{grpc_port}",
            "metrics_port": metrics_port,
            "status": status,
            "redis": redis,
            "log": log_path,
            "state": tmp_path / "s",
        }
    finally:
        channel.close()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
        redis.cleanup()


def test_metrics_health_and_logs_follow_the_work_and_the_dependencies(observed_server, workspace, tmp_path):
    server = observed_server
    before = scrape(server["metrics_port"])
    assert sample(before, "influence_up", dependency="redis") == 1
    assert sample(before, "influence_up", dependency="store") == 1
    assert sample(before, "influence_queue_tasks", kind="covariance", state="waiting") == 0
    assert sample(before, "influence_queue_lag_seconds", kind="covariance") == 0

    arguments = ["--model", str(workspace / "model"), "--data", str(workspace / "train.jsonl"), "--quiet"]
    assert main(["fit", "--server", server["target"], *arguments, "--out", str(tmp_path / "f")]) == 0

    def succeeded_tasks(text: str) -> float:
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("influence_task_seconds_count") and 'outcome="succeeded"' in line
        )

    # the server's own Redis, new to this test: the dataset's registration and the fit, one task each
    # (a task's time is observed just after its operation ends: the CLI may return first)
    wait_until(lambda: succeeded_tasks(scrape(server["metrics_port"])) == 2, 10, "both tasks observed")
    from services.client import InfluenceClient
    from services.errors import NotFoundError

    with InfluenceClient(server["target"]) as client, pytest.raises(NotFoundError):
        client.get_operation("operations/0123456789abcdef0123")
    after = scrape(server["metrics_port"])
    assert sample(after, "influence_operations", state="SUCCEEDED") == 2
    # per method and status code: rate, errors, latency
    fit = "/influence.v1.FactorService/FitFactors"
    assert sample(after, "influence_rpc_seconds_count", method=fit, code="OK") == 1
    missing = "/google.longrunning.Operations/GetOperation"
    assert sample(after, "influence_rpc_seconds_count", method=missing, code="NOT_FOUND") == 1
    assert sample(after, "process_resident_memory_bytes") > 0
    assert sample(after, "influence_build_info", version="0.1.0") == 1
    assert sample(after, "influence_store_bytes_total", backend="local", direction="written") > 0
    assert sample(after, "influence_store_bytes_total", backend="local", direction="read") > 0

    server["redis"].stop()
    wait_until(lambda: server["status"]() == health_pb2.HealthCheckResponse.NOT_SERVING, 30, "NOT_SERVING")
    assert sample(scrape(server["metrics_port"]), "influence_up", dependency="redis") == 0
    server["redis"].start()
    wait_until(lambda: server["status"]() == health_pb2.HealthCheckResponse.SERVING, 30, "SERVING again")

    entries = [json.loads(line) for line in server["log"].read_text().splitlines() if line.startswith("{")]
    warnings = [entry for entry in entries if entry["level"] == "warning" and "NOT_SERVING" in entry["message"]]
    assert warnings and "Redis unreachable" in warnings[0]["message"]
    assert {"time", "logger", "process", "thread"} <= set(warnings[0])


def test_liveness_stays_serving_while_a_dependency_is_down(observed_server):
    """Kubernetes' livenessProbe asks for the `liveness` service: the process, not Redis, so an
    outage makes the pods unready but restarts none of them."""
    server = observed_server
    with grpc.insecure_channel(server["target"]) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def live() -> int:
            return health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=2).status

        assert live() == health_pb2.HealthCheckResponse.SERVING
        server["redis"].stop()
        try:
            wait_until(lambda: server["status"]() == health_pb2.HealthCheckResponse.NOT_SERVING, 30, "NOT_SERVING")
            assert live() == health_pb2.HealthCheckResponse.SERVING
            # the same two questions over HTTP, for probes that cannot speak gRPC (TLS)
            assert http_status(server["metrics_port"], "/livez") == 200
            assert http_status(server["metrics_port"], "/healthz") == 503
        finally:
            server["redis"].start()


@pytest.mark.parametrize("observed_server", [0], indirect=True)  # the separate worker runs every task
def test_redis_that_comes_back_empty_is_noticed_repaired_and_the_next_job_runs(observed_server, workspace, tmp_path):
    """FLUSHALL under a running `influence serve` and a separate `influence worker` (what a Redis
    restarted without persistence, or a failover to an empty replica, looks like): the consumer
    groups come back (API and worker), /metrics answers, an operation whose record was lost is
    NOT_FOUND saying so, and a new fit runs to completion through the worker."""
    from services.client import InfluenceClient
    from services.errors import NotFoundError

    server = observed_server
    env = {**os.environ, "INFLUENCE_REDIS_URL": server["redis"].url, "INFLUENCE_LOG_LEVEL": "info"}
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "worker", "--state-dir", str(server["state"])],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        arguments = ["--model", str(workspace / "model"), "--data", str(workspace / "train.jsonl"), "--quiet"]
        assert main(["fit", "--server", server["target"], *arguments, "--out", str(tmp_path / "before")]) == 0
        with InfluenceClient(server["target"]) as client:
            name = client.list_operations()[0].name
        redis_client.Redis.from_url(server["redis"].url).flushall()
        wait_until(lambda: "Redis lost its data" in server["log"].read_text(), 30, "the loss noticed")
        assert sample(scrape(server["metrics_port"]), "influence_up", dependency="redis") == 1
        assert server["status"]() == health_pb2.HealthCheckResponse.SERVING
        with InfluenceClient(server["target"]) as client, pytest.raises(NotFoundError, match="lost its data"):
            client.get_operation(name)
        fit = subprocess.run(
            [sys.executable, "-m", "services.cli", "fit", "--server", server["target"], *arguments,
             "--out", str(tmp_path / "after")],
            env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert fit.returncode == 0, fit.stderr + (tmp_path / "worker.log").read_text()
        assert (tmp_path / "after" / "manifest.json").exists()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
