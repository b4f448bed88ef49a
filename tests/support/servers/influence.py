"""`influence serve` as its own process (all roles, one in-process worker), configured by
environment against the real Redis and S3 servers, for tests that drive it like a deployment."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.servers.ports import free_ports, wait_until


@contextlib.contextmanager
def serving(redis_server, s3_server, state: Path, args: tuple[str, ...] = (), env: dict[str, str] | None = None):
    """(target, process) of `influence serve` (all roles, one in-process worker) on a free port,
    configured by environment like a deployment, with extra `args` and `env`; stopped on exit."""
    port = free_ports(1)[0]
    environment = {
        **os.environ,
        **s3_server.env(),
        "INFLUENCE_REDIS_URL": redis_server.url,
        "INFLUENCE_STORE_URL": s3_server.url(f"serve{uuid.uuid4().hex[:8]}"),
        "INFLUENCE_QUEUE_PREFIX": f"serve{uuid.uuid4().hex[:6]}",
        "INFLUENCE_PORT": str(port),
        "INFLUENCE_LOG_LEVEL": "warning",
        **(env or {}),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "--host", "127.0.0.1", "--state-dir", str(state), *args],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, process)
        yield target, process
    finally:
        _stop(process)


def wait_serving(target: str, process: subprocess.Popen, log: Path | None = None, timeout: float = 240) -> None:
    """Wait until `influence serve` (`process`) at `target` reports SERVING; RuntimeError with its
    output (`log`, else its piped stdout) as soon as it exits. A loaded 2-core machine can take
    minutes to import torch and start: wait, but never leak."""
    channel = grpc.insecure_channel(target)
    health = health_pb2_grpc.HealthStub(channel)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(log.read_text() if log is not None else process.stdout.read().decode())
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            return status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    try:
        wait_until(ready, timeout, "influence serve", log)
    finally:
        channel.close()


@pytest.fixture(scope="session")
def served(redis_server, s3_server, tmp_path_factory):
    """One `influence serve` for the session: tests name what they make uniquely (or find it by
    the names they were given), cancel what they leave running, and never stop it (a test that
    stops a server starts its own with `serving`)."""
    with serving(redis_server, s3_server, tmp_path_factory.mktemp("serve")) as started:
        yield started


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
