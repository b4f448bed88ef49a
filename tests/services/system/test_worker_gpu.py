"""A worker that knows its GPU: asked for cuda, it checks at start that CUDA works (torch built
with it, torch.cuda.is_available(), the driver, a test matmul); without it, it reports
NOT_SERVING (/healthz 503, influence_worker_serving 0), logs one clear line and takes no task,
so no task fails, let alone as the caller's fault. This CPU-only machine is exactly that case.
Real Redis, a real `influence worker` process."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from services.client import InfluenceClient
from services.embedded import EmbeddedSystem
from services.engine.device import cuda_problem
from services.gen.influence.v1 import common_pb2, gradient_service_pb2
from services.storage import LocalStore
from services.system.context import WorkerContext
from services.system.metrics import REGISTRY
from services.system.runner import Worker
from tests.support import ROOT
from tests.support.servers.ports import free_ports, wait_until

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU here: the missing-GPU case is moot")


def test_asked_for_cuda_here_the_worker_names_what_is_missing(tmp_path):
    problem = cuda_problem()
    assert problem is not None and ("without CUDA" in problem or "is_available() is False" in problem), problem
    context = WorkerContext(LocalStore(tmp_path), device="cuda")
    assert context.device == "cuda"
    assert context.device_problem == f"asked for cuda, but {problem}"
    # no device asked: the machine's, cuda only when it works
    assert WorkerContext(LocalStore(tmp_path)).device == "cpu"
    assert WorkerContext(LocalStore(tmp_path)).device_problem is None
    assert WorkerContext(LocalStore(tmp_path), device="cpu").device_problem is None


@pytest.mark.needs_servers
def test_a_worker_without_its_gpu_takes_no_task_and_logs_one_line(tmp_path, caplog):
    with EmbeddedSystem(workers=0) as system, InfluenceClient(system.target) as client:
        request = gradient_service_pb2.RegisterDatasetRequest(
            model=common_pb2.ModelSpec(path=str(tmp_path)), jsonl=b'{"id": "a", "text": "w1 w2"}\n'
        )
        operation = client.gradients.RegisterDataset(request)
        worker = Worker(system.system, consumer="gpu-0", context=WorkerContext(system.system.store, device="cuda"))
        assert worker.not_serving and worker.run_once(block_ms=50) is False
        stats = system.system.queue.stats("register")
        assert (stats.waiting, stats.running) == (1, 0), "the task was never taken"
        with caplog.at_level(logging.INFO, logger="influence.worker"):
            thread = threading.Thread(target=worker.run_forever, kwargs={"block_ms": 50}, daemon=True)
            thread.start()
            wait_until(lambda: _serving("gpu-0") == 0, 5, "the serving gauge")
            time.sleep(0.3)
            worker.stop.set()
            thread.join(5)
        lines = [record for record in caplog.records if record.name == "influence.worker"]
        assert len(lines) == 1 and lines[0].levelno == logging.ERROR, [r.getMessage() for r in lines]
        assert "NOT_SERVING" in lines[0].getMessage() and "asked for cuda" in lines[0].getMessage()
        assert _serving("gpu-0") is None, "a stopped worker leaves no series behind"
        record = system.system.operations.get(operation.name.removeprefix("operations/"))
        assert record["state"] not in ("FAILED", "SUCCEEDED"), record
        assert system.system.queue.stats("register").waiting == 1


def test_influence_worker_device_cuda_reports_not_serving_on_healthz_and_metrics(redis_server, tmp_path):
    metrics_port = free_ports(1)[0]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "worker",
            "--device",
            "cuda",
            "--name",
            "gpu-pod",
            "--redis-url",
            redis_server.url,
            "--store-url",
            str(tmp_path / "store"),
            "--metrics-port",
            str(metrics_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    try:
        first = process.stdout.readline()
        assert first.startswith("influence: worker gpu-pod NOT_SERVING: asked for cuda, but "), first
        wait_until(lambda: _get(metrics_port, "/metrics")[0] == 200, 20, "the metrics port")
        status, body = _get(metrics_port, "/healthz")
        assert status == 503 and body.startswith("NOT_SERVING: asked for cuda"), (status, body)
        _, metrics = _get(metrics_port, "/metrics")
        assert 'influence_worker_serving{consumer="gpu-pod",device="cuda"} 0.0' in metrics
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr
        assert stderr.count("NOT_SERVING") == 1, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _serving(consumer: str) -> float | None:
    return REGISTRY.get_sample_value("influence_worker_serving", {"consumer": consumer, "device": "cuda"})


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""
