"""`influence serve` as its own process (all roles, one in-process worker), configured by
environment against the real Redis and S3 servers, for tests that drive it like a deployment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.servers.ports import free_ports, wait_until


@pytest.fixture(scope="module")
def served(redis_server, s3_server, tmp_path_factory):
    port = free_ports(1)[0]
    state = tmp_path_factory.mktemp("serve")
    env = {
        **os.environ,
        **s3_server.env(),
        "INFLUENCE_REDIS_URL": redis_server.url,
        "INFLUENCE_STORE_URL": s3_server.url(f"serve{uuid.uuid4().hex[:8]}"),
        "INFLUENCE_QUEUE_PREFIX": f"serve{uuid.uuid4().hex[:6]}",
        "INFLUENCE_PORT": str(port),
        "INFLUENCE_LOG_LEVEL": "warning",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "--host", "127.0.0.1", "--state-dir", str(state)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    target = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(target)
    health = health_pb2_grpc.HealthStub(channel)

    def serving() -> bool:
        if process.poll() is not None:
            raise RuntimeError(process.stdout.read().decode())
        try:
            return (
                health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        except grpc.RpcError:
            return False

    try:
        # a loaded 2-core machine can take minutes to import torch and start: wait, but never leak
        wait_until(serving, 240, "influence serve")
    except BaseException:
        _stop(process)
        channel.close()
        raise
    yield target, process
    channel.close()
    _stop(process)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
