"""How the client reaches a server: a channel per target (round-robin over every address the name
resolves to, quick reconnects), TLS credentials, the bearer token on every call, and the one rule
for calls that fail: which are tried again, after what backoff, within what budget."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2

from ..errors import DomainError, InputError, error_for_code
from ..wire import MAX_MESSAGE_BYTES

T = TypeVar("T")

CHANNEL_OPTIONS = [
    # a restarted server is found again within ~2 s (gRPC's default backs off to 120 s)
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.lb_policy_name", "round_robin"),  # over every address the name resolves to
    ("grpc.dns_min_time_between_resolutions_ms", 5000),  # replicas come and go
]


def open_channel(target: str, credentials: grpc.ChannelCredentials | None, token: str) -> grpc.Channel:
    """A channel to `target`: plaintext without `credentials`, with `token` on every call if given."""
    if credentials is None:
        channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
    return grpc.intercept_channel(channel, BearerToken(token)) if token else channel


def channel_credentials(ca: str, cert: str, key: str) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM file paths (None when none is given: plaintext)."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise InputError("give both a client certificate and its key (--tls-cert and --tls-key), or neither")

    def read(path: str, what: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as error:
            raise InputError(f"cannot read the {what} {path}: {error.strerror}") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca, "TLS CA") if ca else None,
        private_key=read(key, "TLS client key") if key else None,
        certificate_chain=read(cert, "TLS client certificate") if cert else None,
    )


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer TOKEN` to every call's metadata."""

    def __init__(self, token: str):
        self._metadata = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:  # never show the token
        return "BearerToken(***)"

    def _details(self, details):
        return details._replace(metadata=[*(details.metadata or ()), self._metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status our servers attach to every error they answer (rpc/status.py); None
    when the failure did not come from one (no connection, a proxy, gRPC's own refusals)."""
    for key, value in (error.trailing_metadata() or ()) if hasattr(error, "trailing_metadata") else ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    return None


# gRPC's own refusal of a message over the receiving side's limit
_TOO_LARGE = re.compile(r"Received message larger than max \((\d+) vs\. (\d+)\)")


def domain_error(error: grpc.RpcError) -> DomainError:
    """The domain error (services/errors.py) for a failed call's status, with the request field
    at fault when the server's rich status names one."""
    field = ""
    status = rich_status(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            field = next((v.field for v in request.field_violations), "")
    message = error.details() or ""
    too_large = _TOO_LARGE.search(message)
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and too_large and not message.startswith("CLIENT"):
        size, limit = too_large.groups()
        message = (
            f"one message of {size} bytes is over the server's limit of {limit} bytes per message "
            "(--max-message-bytes): send large data in chunks (register_dataset uploads a file in chunks) "
            "or by uri"
        )
    return error_for_code(error.code().name, message, field=field)


class RetryPolicy:
    """The client's one rule for a failed call. Tried again: the errors the table calls
    `retryable` (services/errors.py: UNAVAILABLE, the server or what it needs being away), after a
    backoff of 0.2 s doubling to 2 s; create calls carry a request_id, so a retried create runs
    once. Budget: `retries` attempts when given, else time: `connect_seconds` until a server has
    answered once (a wrong address fails fast), `retry_seconds` after (a server restarting mid-job
    is waited for). A server answers with a call's result or with an error status of its own (an
    UNAVAILABLE it sends when Redis or the store is away counts: that outage is waited for, not
    taken for a typo). Every other error is raised at once, as its domain error."""

    def __init__(self, retries: int | None, retry_seconds: float, connect_seconds: float):
        self.retries, self.retry_seconds, self.connect_seconds = retries, retry_seconds, connect_seconds
        self.reached = False  # a call has been answered: an UNAVAILABLE now is an outage, not a typo

    def run(self, attempt: Callable[[], T], *, retries: int | None = None) -> T:
        """attempt() until it returns, or raises an error that is not retryable or is over the
        budget (`retries` here bounds this run alone, whatever the policy's budget)."""
        delay, started, count = 0.2, time.monotonic(), 0
        while True:
            try:
                result = attempt()
            except grpc.RpcError as rpc_error:
                error = domain_error(rpc_error)
                if rich_status(rpc_error) is not None:  # a server answered
                    self.reached = True
                if not (error.retryable and self._may_retry(count, started, retries)):
                    raise error from None
                time.sleep(delay)
                delay, count = min(delay * 2, 2.0), count + 1
            else:
                self.reached = True
                return result

    def _may_retry(self, count: int, started: float, retries: int | None) -> bool:
        retries = self.retries if retries is None else retries
        if retries is not None:
            return count < retries
        return time.monotonic() - started < (self.retry_seconds if self.reached else self.connect_seconds)
