"""A deployment loses its API server, then its Redis, in the middle of a job driven by the CLI.

Real processes throughout: a private redis-server (append-only, fsync always), the session's
SeaweedFS, `influence serve --workers 0` (the API only) and an `influence worker`, and
`influence fit --server` as the user runs it. The API server is SIGKILLed mid-job and restarted
on the same port; Redis is SIGKILLed mid-job and restarted from its append-only file. The CLI
rides both out (UNAVAILABLE is retried for long enough), names its operation as the job starts,
and the job runs once; `influence wait` reattaches to it and downloads the same bytes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client import InfluenceClient
from services.toy.models import build_tiny_model, save_model_dir
from services.toy.tokenizer import build_word_tokenizer
from tests.support.servers.ports import free_ports, wait_until
from tests.support.servers.redis import RedisServer

WORDS = [f"w{i}" for i in range(200)]


@pytest.fixture(scope="module")
def fit_inputs(tmp_path_factory):
    """A model and data whose fit takes several seconds on 2 cores (room to kill things mid-job)."""
    root = tmp_path_factory.mktemp("restarts")
    tokenizer = build_word_tokenizer(WORDS)
    save_model_dir(build_tiny_model("gpt2", len(tokenizer), n_layer=2, d_model=48, seed=0), tokenizer, root / "model")
    lines = [{"text": " ".join(WORDS[(i * 7 + j * 13) % 200] for j in range(30))} for i in range(120)]
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


class Deployment:
    """`influence serve --workers 0` and one `influence worker` on a private Redis and a fresh bucket."""

    def __init__(self, redis: RedisServer, s3_server, directory):
        self.redis, self.directory = redis, directory
        self.port = free_ports(1)[0]
        self.target = f"127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            **s3_server.env(),
            "INFLUENCE_REDIS_URL": redis.url,
            "INFLUENCE_STORE_URL": s3_server.url(f"restart{uuid.uuid4().hex[:8]}"),
            "INFLUENCE_QUEUE_PREFIX": f"r{uuid.uuid4().hex[:6]}",
            "INFLUENCE_LOG_LEVEL": "error",
            "HF_HUB_OFFLINE": "1",
        }
        self.server = self.worker = None

    def _spawn(self, *arguments: str) -> subprocess.Popen:
        log = (self.directory / f"{arguments[0]}.log").open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", *arguments],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start_server(self) -> None:
        self.server = self._spawn("serve", "--workers", "0", "--host", "127.0.0.1", "--port", str(self.port))
        channel = grpc.insecure_channel(self.target)
        health = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                return status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

        try:
            wait_until(serving, 240, "influence serve", self.directory / "serve.log")
        finally:
            channel.close()

    def start_worker(self) -> None:
        self.worker = self._spawn("worker", "--lease-seconds", "3")

    def kill_server(self) -> None:
        os.killpg(self.server.pid, signal.SIGKILL)
        self.server.wait(10)

    def logs(self) -> str:
        return "".join(
            f"\n--- {path.name} ---\n" + path.read_text(errors="replace")[-3000:]
            for path in sorted(self.directory.glob("*.log"))
        )

    def close(self) -> None:
        for process in (self.server, self.worker):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)


@pytest.fixture
def deployment(s3_server, tmp_path):
    redis = RedisServer().start()
    created = Deployment(redis, s3_server, tmp_path)
    try:
        created.start_server()
        created.start_worker()
        yield created
    finally:
        created.close()
        redis.cleanup()


def start_fit(deployment: Deployment, inputs, out) -> subprocess.Popen:
    command = [sys.executable, "-m", "services.cli", "fit", "--server", deployment.target, "--quiet"]
    command += ["--model", str(inputs / "model"), "--data", str(inputs / "train.jsonl"), "--out", str(out)]
    command += ["--shard-size", "40", "--batch-size", "2", "--max-length", "32"]
    # The default retry budget (120 s) outlasts a restart of a few seconds; on a loaded CI machine
    # the restarted server's imports alone can take longer, so the test gives the CLI more.
    env = {**deployment.env, "INFLUENCE_RETRY_SECONDS": "900"}
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def fit_operation(target: str, timeout: float = 600) -> str:
    """The name of the fit operation once the CLI has created it."""
    from google.longrunning import operations_pb2

    found = []

    def created() -> bool:
        with InfluenceClient(target) as client:
            listed = client._call(
                client.operations.ListOperations, operations_pb2.ListOperationsRequest(name="operations", page_size=100)
            )
        found[:] = [operation.name for operation in listed.operations if _kind(operation) == "fit_factors"]
        return bool(found)

    wait_until(created, timeout, "the fit operation")
    return found[0]


def operation_kinds(target: str) -> list[str]:
    from google.longrunning import operations_pb2

    with InfluenceClient(target) as client:
        listed = client._call(
            client.operations.ListOperations, operations_pb2.ListOperationsRequest(name="operations", page_size=100)
        )
    return [_kind(operation) for operation in listed.operations]


def tokens_processed(target: str, name: str) -> int:
    with InfluenceClient(target, retries=0) as client:
        operation = client.get_operation(name)
    from services.gen.influence.v1 import common_pb2

    metadata = common_pb2.OperationMetadata()
    operation.metadata.Unpack(metadata)
    return metadata.tokens_processed


def manifest_files(directory) -> dict:
    return json.loads((directory / "manifest.json").read_text())["files"]


@pytest.mark.slow
def test_the_cli_rides_out_an_api_server_restart_and_wait_reattaches(deployment, fit_inputs, tmp_path):
    fit = start_fit(deployment, fit_inputs, tmp_path / "out")
    try:
        name = fit_operation(deployment.target)
        wait_until(lambda: tokens_processed(deployment.target, name) > 0, 600, "the fit's first batches")
        deployment.kill_server()  # mid-job: the worker goes on, the CLI's calls fail UNAVAILABLE
        time.sleep(3)
        deployment.start_server()
        _, err = fit.communicate(timeout=900)
    finally:
        if fit.poll() is None:
            fit.kill()
            print(deployment.logs())
    assert fit.returncode == 0, err + deployment.logs()
    assert f"{name} started; reattach with: influence wait {name} --server" in err, err
    assert (tmp_path / "out" / "manifest.json").exists()
    assert operation_kinds(deployment.target).count("fit_factors") == 1, "the fit ran once"
    # reattach to the finished job from another command: the same factor bytes
    from services.cli import main

    assert main(["wait", name, "--server", deployment.target, "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert manifest_files(tmp_path / "again") == manifest_files(tmp_path / "out")


def _kind(operation) -> str:
    from services.gen.influence.v1 import common_pb2

    metadata = common_pb2.OperationMetadata()
    operation.metadata.Unpack(metadata)
    return metadata.kind


@pytest.mark.slow
def test_a_job_survives_redis_killed_and_restarted_from_its_append_only_file(deployment, fit_inputs, tmp_path):
    fit = start_fit(deployment, fit_inputs, tmp_path / "out")
    try:
        name = fit_operation(deployment.target)
        wait_until(lambda: tokens_processed(deployment.target, name) > 0, 600, "the fit's first batches")
        deployment.redis.process.send_signal(signal.SIGKILL)  # no graceful flush: fsync-always AOF only
        deployment.redis.process.wait(10)
        deployment.redis.process = None
        time.sleep(2)
        deployment.redis.start()
        _, err = fit.communicate(timeout=900)
    finally:
        if fit.poll() is None:
            fit.kill()
            print(deployment.logs())
    assert fit.returncode == 0, err + deployment.logs()
    assert (tmp_path / "out" / "manifest.json").exists()
