"""The pool defines the device: `influence worker --device cpu|cuda` (INFLUENCE_DEVICE) sets the
device a worker runs models on. A task whose model names no device runs on the worker's; a cuda
task taken by a CPU worker is refused with WrongWorkerError and left for redelivery (to a GPU
worker), never failed as bad input. Real Redis, real gRPC, a tiny model."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from google.longrunning import operations_pb2

from services.client import InfluenceClient
from services.embedded import EmbeddedSystem
from services.errors import InputError
from services.gen.influence.internal.v1 import tasks_pb2
from services.gen.influence.v1 import common_pb2, factor_service_pb2
from services.storage import LocalStore
from services.system.context import WorkerContext
from services.system.runner import Worker
from tests.support.stepping import registered


def take(worker: Worker, kind: str):
    """The next task of `kind` for `worker`, waiting for a lease to run out if need be."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        task = worker.system.queue.take(worker.kinds, worker.consumer, block_ms=50)
        if task is not None:
            assert task.kind == kind, task
            return task
    raise AssertionError(f"no {kind} task within 20 s")


@pytest.mark.needs_servers
def test_a_cpu_worker_leaves_cuda_tasks_and_runs_deviceless_ones_on_cpu(workspace):
    with EmbeddedSystem(workers=0, lease_seconds=0.5) as system, InfluenceClient(system.target) as client:
        cpu = Worker(system.system, consumer="cpu-0", context=WorkerContext(system.system.store, device="cpu"))
        assert cpu.context.device == "cpu"
        unplaced = common_pb2.ModelSpec(path=str(workspace / "model"))  # no device: the worker's
        dataset = registered(client, cpu, unplaced, (workspace / "train.jsonl").read_bytes(), shard_size=12)

        cuda = common_pb2.ModelSpec(path=str(workspace / "model"), device=common_pb2.DEVICE_CUDA)
        operation = client.factors.FitFactors(
            factor_service_pb2.FitFactorsRequest(model=cuda, dataset=dataset.name, batch_size=4)
        )
        first = take(cpu, "covariance")
        assert cpu.handle(first) == "retry"
        record = system.system.operations.get(operation.name.removeprefix("operations/"))
        assert record["state"] not in ("FAILED", "SUCCEEDED"), record
        shard = tasks_pb2.TaskPayload.FromString(first.payload).shard
        last_error = system.system.operations.last_error(record["id"], f"covariance/{shard}")
        assert "WrongWorkerError" in last_error
        # still queued: after the lease it is delivered again (to whichever worker takes it)
        again = take(cpu, "covariance")
        while again.message_id != first.message_id:  # the fit's other shards, refused the same way
            assert cpu.handle(again) == "retry"
            again = take(cpu, "covariance")
        assert again.deliveries == 2
        client.operations.CancelOperation(operations_pb2.CancelOperationRequest(name=operation.name))
        cpu.handle(again)

        operation = client.factors.FitFactors(
            factor_service_pb2.FitFactorsRequest(model=unplaced, dataset=dataset.name, batch_size=4)
        )
        outcome = cpu.handle(take(cpu, "covariance"))
        while outcome == "skipped":  # the cancelled fit's other shard, delivered again
            outcome = cpu.handle(take(cpu, "covariance"))
        assert outcome == "succeeded"
        assert {device for (_, device, _, _) in cpu.context.models._entries} == {"cpu"}


def test_the_worker_device_is_checked_and_defaults_to_what_the_machine_has(tmp_path):
    import torch

    assert WorkerContext(LocalStore(tmp_path)).device == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="cpu or cuda"):
        WorkerContext(LocalStore(tmp_path), device="tpu")


def test_worker_cli_takes_device_from_flag_or_environment():
    from services.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["worker", "--device", "cuda"]).device == "cuda"
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "worker", "--device", "tpu"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "--device" in result.stderr
    code = "from services.cli import build_parser; print(build_parser().parse_args(['worker']).device)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={"INFLUENCE_DEVICE": "cpu"}
    )
    assert result.stdout.strip() == "cpu", result.stderr
