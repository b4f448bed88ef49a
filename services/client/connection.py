"""The client's connection to the services: a stub per service over its target's channel, unary
calls under the one retry policy (channel.py), and operations: started (`_create`), waited on
(`wait`, `wait_for`), listed and cancelled. The resource calls build on it (resources.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import code_pb2

from ..errors import InputError, InternalError, error_for_code
from ..gen.influence.v1 import common_pb2, factor_service_pb2_grpc, gradient_service_pb2_grpc, query_service_pb2_grpc
from .channel import RetryPolicy, channel_credentials, domain_error, open_channel
from .transfers import download


class Connection:
    """Stubs of the three services and the Operations service.

    `target` reaches all of them (one `influence serve`, or a deployment's single entry point);
    `factor_target`, `gradient_target` and `query_target` send one service's calls elsewhere
    (per-service Services of a deployment). A target may name several replicas, e.g.
    `dns:///influence-query-headless:50051`: calls are spread over them round-robin, one
    HTTP/2 connection each. Operations are read through whichever target is given first
    (every server answers for every operation: they share Redis). `retries`, `retry_seconds`
    (env INFLUENCE_RETRY_SECONDS, default 120) and `connect_seconds` are the retry budget
    (channel.RetryPolicy)."""

    def __init__(
        self,
        target: str = "",
        *,
        factor_target: str = "",
        gradient_target: str = "",
        query_target: str = "",
        timeout: float = 60.0,
        retries: int | None = None,
        retry_seconds: float | None = None,
        connect_seconds: float = 10.0,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ):
        targets = {
            "factor": factor_target or target,
            "gradient": gradient_target or target,
            "query": query_target or target,
        }
        missing = [role for role, value in targets.items() if not value]
        if missing:
            raise InputError(f"no target for the {', '.join(missing)} service: give `target` or each service's target")
        self.target = target or targets["query"]
        self.timeout = timeout
        if retry_seconds is None:
            retry_seconds = float(os.environ.get("INFLUENCE_RETRY_SECONDS", "120"))
        self.retry = RetryPolicy(retries, retry_seconds, connect_seconds)
        self.on_operation: Callable[[str], None] | None = None  # told each operation `wait` starts on
        self.waiting_on = ""  # the operation `wait` is (or was last) waiting on
        token = os.environ.get("INFLUENCE_TOKEN", "") if token is None else token
        credentials = channel_credentials(
            os.environ.get("INFLUENCE_TLS_CA", "") if tls_ca is None else tls_ca,
            os.environ.get("INFLUENCE_TLS_CERT", "") if tls_cert is None else tls_cert,
            os.environ.get("INFLUENCE_TLS_KEY", "") if tls_key is None else tls_key,
        )
        self._channels: dict[str, grpc.Channel] = {}
        for name in {*targets.values(), self.target}:
            self._channels[name] = open_channel(name, credentials, token)
        self.factors = factor_service_pb2_grpc.FactorServiceStub(self._channels[targets["factor"]])
        self.gradients = gradient_service_pb2_grpc.GradientServiceStub(self._channels[targets["gradient"]])
        self.queries = query_service_pb2_grpc.QueryServiceStub(self._channels[targets["query"]])
        self.operations = operations_pb2_grpc.OperationsStub(self._channels[self.target])

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- calls ------------------------------------------------------------------------------

    def _call(self, method, request, *, timeout: float | None = None):
        """A call under the retry policy; a failure raises its domain error. For a client-streaming
        method `request` is a function that returns the messages (called again for each attempt),
        and the call has no deadline (an upload takes as long as its bytes take)."""
        if callable(request):
            return self.retry.run(lambda: method(request(), timeout=None))
        return self.retry.run(lambda: method(request, timeout=timeout or self.timeout))

    def _stream(self, method, request):
        """A server stream's messages (not retried: the caller cannot resume it)."""
        try:
            yield from method(request, timeout=None)
        except grpc.RpcError as error:
            raise domain_error(error) from None

    def _download(self, method, request, out_dir: str | Path, last: str | None = None) -> Path:
        """An artifact's files into out_dir, resumed across broken streams (transfers.download)."""
        return download(self.retry, method, request, out_dir, last)

    # -- operations -------------------------------------------------------------------------

    def _create(self, method, request) -> operations_pb2.Operation:
        """Start a job: `_call` of a create method, whose operation is this client's `waiting_on`
        (and is announced to `on_operation`) as soon as its name is known. A Ctrl-C or SIGTERM
        arriving while the call is in flight is held until then (a second one is not), so the
        caller's interrupt handling always knows the job it started: there is no moment at which
        a job exists on the server that an interrupted command cannot name or cancel."""
        with _interrupts_held():
            operation = self._call(method, request)
            self._waiting(operation.name)
        return operation

    def _waiting(self, name: str) -> None:
        if self.on_operation is not None and self.waiting_on != name:
            self.on_operation(name)
        self.waiting_on = name

    def cancel(self, name: str) -> None:
        """Cancel an operation (its running tasks stop between batches)."""
        self._call(self.operations.CancelOperation, operations_pb2.CancelOperationRequest(name=name))

    def get_operation(self, name: str) -> operations_pb2.Operation:
        return self._call(self.operations.GetOperation, operations_pb2.GetOperationRequest(name=name))

    def list_operations(self, kind: str = "") -> list[operations_pb2.Operation]:
        """Every operation the server keeps (newest first), or those of one kind
        ("fit_factors", "compute_scores", ...), filtered by the server (AIP-160: `kind = X`) and,
        for servers that read another filter form, here too."""
        request = operations_pb2.ListOperationsRequest(name="operations", filter=f"kind = {kind}" if kind else "")

        def fetch(token):
            request.page_token = token
            return self._call(self.operations.ListOperations, request)

        operations = paged(fetch, "operations")
        return [operation for operation in operations if not kind or operation_metadata(operation).kind == kind]

    def wait(
        self,
        operation: operations_pb2.Operation,
        progress: Callable[[common_pb2.OperationMetadata], None] | None = None,
        *,
        timeout: float | None = None,
        interval: float = 0.5,
    ):
        """Block until the operation is done; return it (see `unpack` for its response).

        Uses the server-side WaitOperation in `interval`-long slices, so completion is noticed
        at once and `progress(metadata)` is called between slices when the metadata changed.
        A failed operation raises the domain error of its status code with the server's message.
        """
        from google.protobuf import duration_pb2

        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        self._waiting(operation.name)
        while True:
            metadata = common_pb2.OperationMetadata()
            if operation.metadata.Unpack(metadata) and progress and metadata != last:
                progress(metadata)
                last = metadata
            if operation.done:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise InternalError(f"timed out waiting for {operation.name}")
            request = operations_pb2.WaitOperationRequest(
                name=operation.name, timeout=duration_pb2.Duration(nanos=int(interval * 1e9))
            )
            operation = self._call(self.operations.WaitOperation, request, timeout=interval + 30)
        if operation.HasField("error"):
            name = code_pb2.Code.Name(operation.error.code) if operation.error.code in code_pb2.Code.values() else ""
            raise error_for_code(name, operation.error.message)
        return operation

    def wait_for(self, name: str, progress=None, *, timeout: float | None = None) -> operations_pb2.Operation:
        """Reattach to an operation by name ("operations/ID") and wait for it (see `wait`)."""
        return self.wait(self.get_operation(name), progress, timeout=timeout)

    @staticmethod
    def unpack(operation, message_type):
        message = message_type()
        operation.response.Unpack(message)
        return message


def operation_metadata(operation: operations_pb2.Operation) -> common_pb2.OperationMetadata:
    metadata = common_pb2.OperationMetadata()
    operation.metadata.Unpack(metadata)
    return metadata


@contextlib.contextmanager
def _interrupts_held():
    """SIGINT and SIGTERM received inside the block are delivered when it ends, under the handlers
    in place before it (a second one, an insisting user, at once). Only on the main thread, where
    Python runs signal handlers; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    def hold(number, frame):
        if held:  # the second: deliver it now, instead of the first
            held.clear()
            _restore(previous)
            signal.raise_signal(number)
        else:
            held.append(number)

    for number in previous:
        signal.signal(number, hold)
    try:
        yield
    finally:
        _restore(previous)
        if held:
            signal.raise_signal(held[0])


def _restore(handlers: dict) -> None:
    for number, handler in handlers.items():
        signal.signal(number, handler if handler is not None else signal.SIG_DFL)


def request_id() -> str:
    """A fresh id per logical call: `_call` resends the same request (same id) after UNAVAILABLE,
    so the server runs it once; a new call, even with identical content, is a new job."""
    return uuid.uuid4().hex


def paged(fetch, field: str) -> list:
    items, token = [], ""
    while True:
        response = fetch(token)
        items.extend(getattr(response, field))
        token = response.next_page_token
        if not token:
            return items
