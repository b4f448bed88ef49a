"""google.longrunning.Operations backed by the Redis operation records."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import empty_pb2

from ..errors import NotFoundError, PreconditionError
from ..jobs.ended import EndedWatcher
from ..jobs.operations import TERMINAL, OperationStore
from . import validation
from .common import operation_message
from .status import grpc_errors


class OperationsServicer(operations_pb2_grpc.OperationsServicer):
    """google.longrunning.Operations backed by the Redis operation records."""

    # How often a waiter re-reads the record even without a message: a lost pub/sub message
    # then costs at most this much latency. While the subscription is down (starting, or Redis
    # reconnecting) it polls every UNWATCHED_SECONDS instead.
    RECHECK_SECONDS = 0.25
    UNWATCHED_SECONDS = 0.02

    def __init__(self, operations: OperationStore, watcher: EndedWatcher):
        self.operations = operations
        self.watcher = watcher

    def _record(self, name: str) -> dict:
        record = self.operations.get(validation.resource_id(name, "operations", "name"))
        if record is None:
            raise NotFoundError(f"operation {name!r} not found")
        return record

    @grpc_errors
    async def GetOperation(self, request, context):
        return operation_message(await asyncio.to_thread(self._record, request.name))

    @grpc_errors
    async def ListOperations(self, request, context):
        size, offset = validation.page(request.page_size, request.page_token)
        # `kind = X` (AIP-160, as the client sends it) or the older `kind=X`
        kind = re.sub(r"^kind\s*=\s*", "", request.filter.strip()) if request.filter else ""
        records, token = await asyncio.to_thread(self.operations.list, size, str(offset), kind)
        return operations_pb2.ListOperationsResponse(
            operations=[operation_message(r) for r in records], next_page_token=token
        )

    @grpc_errors
    async def CancelOperation(self, request, context):
        record = await asyncio.to_thread(self._record, request.name)
        await asyncio.to_thread(self.operations.cancel, record["id"])
        return empty_pb2.Empty()

    @grpc_errors
    async def DeleteOperation(self, request, context):
        record = await asyncio.to_thread(self._record, request.name)
        if record["state"] not in TERMINAL:
            raise PreconditionError(f"{request.name} is still running; cancel it first")
        await asyncio.to_thread(self.operations.delete, record["id"])
        return empty_pb2.Empty()

    @grpc_errors
    async def WaitOperation(self, request, context):
        deadline = time.monotonic() + (
            request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else 60.0
        )
        operation_id = validation.resource_id(request.name, "operations", "name")
        loop, ended = asyncio.get_running_loop(), asyncio.Event()
        with self.watcher.watch(operation_id, lambda: loop.call_soon_threadsafe(ended.set)):
            record = await asyncio.to_thread(self._record, request.name)
            while record["state"] not in TERMINAL and (remaining := deadline - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    interval = self.RECHECK_SECONDS if self.watcher.live else self.UNWATCHED_SECONDS
                    await asyncio.wait_for(ended.wait(), timeout=min(remaining, interval))
                ended.clear()
                record = await asyncio.to_thread(self._record, request.name)
        return operation_message(record)
