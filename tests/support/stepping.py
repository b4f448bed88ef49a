"""Workers stepped by hand, one task at a time, so a test's schedule is exact."""

from __future__ import annotations

import time

from google.longrunning import operations_pb2

from services.gen.influence.v1 import gradient_service_pb2
from services.system.runner import Worker


def step(worker: Worker, kind: str, timeout: float = 15.0) -> None:
    """Run exactly one task on `worker`, which must be of `kind` (waiting up to `timeout` seconds,
    e.g. for a lease to expire)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = worker.system.queue.take(worker.kinds, worker.consumer, block_ms=50)
        if task is None:
            continue
        assert task.kind == kind, f"{worker.consumer} took a {task.kind} task, expected {kind}"
        worker.handle(task)
        return
    raise AssertionError(f"{worker.consumer} found no {kind} task")


def registered(client, worker: Worker, model, data: bytes, shard_size: int) -> gradient_service_pb2.Dataset:
    """The dataset of `data`, registered through `client` with its one task run on `worker`."""
    operation = client.gradients.RegisterDataset(
        gradient_service_pb2.RegisterDatasetRequest(model=model, jsonl=data, shard_size=shard_size)
    )
    step(worker, "register")
    operation = client.operations.GetOperation(operations_pb2.GetOperationRequest(name=operation.name))
    return client.unpack(operation, gradient_service_pb2.Dataset)
