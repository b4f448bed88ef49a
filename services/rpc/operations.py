"""google.longrunning.Operations backed by the Redis operation records."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Collection

from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import empty_pb2

from ..errors import InputError, NotFoundError, PreconditionError
from ..jobs.ended import EndedWatcher
from ..jobs.operations import CANCELLED, FAILED, PENDING, RUNNING, SUCCEEDED, TERMINAL, OperationStore
from . import paging, validation
from .auth import current_tenant
from .common import operation_message
from .status import grpc_errors

STATES = {PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED}


def parse_filter(text: str, kinds: Collection[str]) -> dict[str, str]:
    """{field: value} of a ListOperations filter (AIP-160 subset): `field = value` terms joined
    by AND, values optionally quoted; fields kind (one of `kinds`, the operation kinds the services
    registered) and state. Anything else: InputError."""
    allowed = {"kind": set(kinds), "state": STATES}
    equal: dict[str, str] = {}
    for term in re.split(r"\s+AND\s+", text.strip()) if text.strip() else []:
        match = re.fullmatch(r'\s*(\w+)\s*=\s*"?([\w.-]+)"?\s*', term)
        if not match or match.group(1) not in allowed:
            raise InputError(
                f"filter term {term!r} is not understood: use kind = KIND and/or state = STATE, joined by AND",
                field="filter",
            )
        field, value = match.groups()
        if value not in allowed[field]:
            raise InputError(
                f"filter: {field} must be one of {', '.join(sorted(allowed[field]))}, got {value!r}",
                field="filter",
            )
        equal[field] = value
    return equal


class OperationsServicer(operations_pb2_grpc.OperationsServicer):
    """google.longrunning.Operations backed by the Redis operation records."""

    # How often a waiter re-reads the record even without a message: a lost pub/sub message
    # then costs at most this much latency. While the subscription is down (starting, or Redis
    # reconnecting) it polls every UNWATCHED_SECONDS instead.
    RECHECK_SECONDS = 0.25
    UNWATCHED_SECONDS = 0.02

    def __init__(self, operations: OperationStore, watcher: EndedWatcher, kinds: Collection[str]):
        """`kinds`: the operation kinds a ListOperations filter may name (the services' registered ones)."""
        self.operations = operations
        self.watcher = watcher
        self.kinds = kinds

    def _record(self, name: str) -> dict:
        """The caller's operation `name`: another tenant's is not found, exactly as a missing one."""
        record = self.operations.get(validation.operation_id(name))
        if record is None or record["tenant"] != current_tenant():
            raise NotFoundError(f"operation {name!r} not found{self.operations.lost_data()}")
        return record

    @grpc_errors
    async def GetOperation(self, request, context):
        return operation_message(await asyncio.to_thread(self._record, request.name))

    @grpc_errors
    async def ListOperations(self, request, context):
        """Newest first; `filter`: terms `kind = fit_factors` and/or `state = RUNNING` joined by AND.
        Only the caller's tenant's operations."""
        equal = parse_filter(request.filter, self.kinds)
        size = paging.page_size(request.page_size)
        scope = "operations?" + "&".join(f"{key}={value}" for key, value in sorted(equal.items()))
        offset = int(paging.read_token(request.page_token, scope) or 0)
        records, following = await asyncio.to_thread(
            self.operations.list, size, offset, tenant=current_tenant(), **equal
        )
        return operations_pb2.ListOperationsResponse(
            operations=[operation_message(r) for r in records],
            next_page_token=paging.make_token(scope, str(following)) if following is not None else "",
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
        operation_id = validation.operation_id(request.name)
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
