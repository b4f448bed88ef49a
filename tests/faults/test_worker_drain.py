"""A worker pod stopped mid-task (a scale-in, a rollout, a node drain): on SIGTERM `influence worker`
takes no further task, lets its running one go on for --drain-seconds, then hands the lease back and
exits 0 before the kubelet's SIGKILL. Another worker takes the task at once, not a lease later.

Real processes: a private redis-server, `influence serve --workers 0`, two `influence worker`s
(the second started only after the first has gone) sharing a local store, and the user's
`influence fit --server`. The lease is 10 minutes: a fit that finishes within it proves the hand-back.
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
from services.gen.influence.v1 import common_pb2
from services.toy.models import build_tiny_model, save_model_dir
from services.toy.tokenizer import build_word_tokenizer
from tests.support.servers.ports import free_ports, wait_until
from tests.support.servers.redis import RedisServer

pytestmark = pytest.mark.slow

WORDS = [f"w{i}" for i in range(200)]
LEASE_SECONDS = 600


@pytest.fixture
def deployment(tmp_path):
    root = tmp_path
    tokenizer = build_word_tokenizer(WORDS)
    save_model_dir(build_tiny_model("gpt2", len(tokenizer), n_layer=2, d_model=48, seed=0), tokenizer, root / "model")
    lines = [{"text": " ".join(WORDS[(i * 7 + j * 13) % 200] for j in range(30))} for i in range(160)]
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    redis = RedisServer().start()
    port = free_ports(1)[0]
    env = {
        **os.environ,
        "INFLUENCE_REDIS_URL": redis.url,
        "INFLUENCE_QUEUE_PREFIX": f"d{uuid.uuid4().hex[:6]}",
        "INFLUENCE_LEASE_SECONDS": str(LEASE_SECONDS),
        "INFLUENCE_LOG_LEVEL": "info",
        "HF_HUB_OFFLINE": "1",
    }
    processes = []

    def spawn(name: str, *arguments: str, **extra_env: str) -> subprocess.Popen:
        log = (root / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *arguments, "--state-dir", str(root / "state")],
            env={**env, **extra_env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        processes.append(process)
        return process

    server = spawn("serve", "serve", "--workers", "0", "--port", str(port))
    target = f"127.0.0.1:{port}"
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            if server.poll() is not None:
                raise RuntimeError((root / "serve.log").read_text())
            try:
                return health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1
            except grpc.RpcError:
                return False

        wait_until(serving, 240, "influence serve", root / "serve.log")
    try:
        yield {"root": root, "env": env, "target": target, "spawn": spawn}
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        redis.cleanup()


def tokens_processed(target: str) -> int:
    with InfluenceClient(target, retries=0) as client:
        operations = client.list_operations("fit_factors")
    if not operations:
        return 0
    metadata = common_pb2.OperationMetadata()
    operations[0].metadata.Unpack(metadata)
    return metadata.tokens_processed


def test_a_stopped_worker_hands_its_running_task_to_the_next_at_once(deployment):
    root, target = deployment["root"], deployment["target"]
    # The first worker takes 0.2 s more per batch: its task (80 batches) cannot end within the drain.
    first = deployment["spawn"](
        "first", "worker", "--name", "first", "--drain-seconds", "1", INFLUENCE_TEST_UNIT_SECONDS="0.2"
    )
    command = [sys.executable, "-m", "services.cli", "fit", "--server", target, "--quiet", "--out", str(root / "out")]
    command += ["--model", str(root / "model"), "--data", str(root / "train.jsonl"), "--batch-size", "2"]
    fit = subprocess.Popen(command, env=deployment["env"], stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: tokens_processed(target) > 0, 600, "the fit's first batches", root / "first.log")
        stopped = time.monotonic()
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0, (root / "first.log").read_text()
        assert time.monotonic() - stopped < 30
        log = (root / "first.log").read_text()
        assert "handed back unfinished" in log, log
        deployment["spawn"]("second", "worker", "--name", "second")
        _, err = fit.communicate(timeout=LEASE_SECONDS / 2)  # well within the lease: the task was handed back
    finally:
        if fit.poll() is None:
            fit.kill()
    assert fit.returncode == 0, err + (root / "second.log").read_text()
    assert (root / "out" / "manifest.json").exists()
