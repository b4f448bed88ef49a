"""The door every call passes before a servicer sees it, deciding from the call's method and
metadata alone, before one byte of its body is read:

- who calls (rpc/auth.tenant_of_call): a call that needs a token and has no valid one is
  UNAUTHENTICATED;
- whether the caller may have one more call in flight: at most `max_streams_per_tenant` per tenant
  (on a server without tokens every caller is the one default tenant), and at most
  `max_unauthenticated_streams` of the calls that need no token (health checks, reflection); one
  more is RESOURCE_EXHAUSTED naming the limit.

A refused call is answered at once by a handler that never asks for its request: gRPC hands a
handler a request only when it asks, so a refused caller's bytes are never buffered, however large.
That holds for unary methods too because the door serves every method as a request stream and
reads the one message itself. An admitted call's messages are decoded by rpc/decoding.py
(malformed bytes, text that is not UTF-8, NUL characters: INVALID_ARGUMENT naming the field), and
its servicer runs as the call's tenant. A message over `max_message_bytes` never reaches the door:
gRPC refuses it from its length prefix, before receiving its body (rpc/server.build_server).
"""

from __future__ import annotations

import collections
import inspect

import grpc

from ..errors import DomainError, InputError
from . import validation
from .auth import TokenFile, serving_as, tenant_of_call
from .common import Limits
from .decoding import decode
from .status import abort_arguments


class Door(grpc.aio.ServerInterceptor):
    """Authentication and admission from metadata, then decoding, for every call (see the module)."""

    def __init__(self, tokens: TokenFile | None, limits: Limits):
        self.tokens, self.limits = tokens, limits
        # calls in flight by tenant (None: calls that need no token); touched only on the event loop
        self.in_flight: collections.Counter[str | None] = collections.Counter()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:  # no such method: gRPC answers UNIMPLEMENTED
            return None
        try:
            tenant = tenant_of_call(self.tokens, details.method, details.invocation_metadata)
            self._enter(tenant)
        except DomainError as error:
            return _refusal(handler, error, details.method)
        return _admitted(handler, details.method, tenant, lambda: self._leave(tenant))

    def _enter(self, tenant: str | None) -> None:
        if tenant is None:
            name, whose = "max_unauthenticated_streams", "calls without a token"
        else:
            name, whose = "max_streams_per_tenant", f"tenant {tenant!r}'s calls" if self.tokens is not None else "calls"
        limit = getattr(self.limits, name)
        count = self.in_flight[tenant] + 1
        validation.within_limit(count, limit, name, f"{whose} in flight would be {count}", advice="retry later")
        self.in_flight[tenant] = count

    def _leave(self, tenant: str | None) -> None:
        self.in_flight[tenant] -= 1
        if not self.in_flight[tenant]:
            del self.in_flight[tenant]


def _refusal(handler: grpc.RpcMethodHandler, error: DomainError, method: str) -> grpc.RpcMethodHandler:
    """A handler that answers `error` at once, without reading the request."""
    code, message, trailing = abort_arguments(error, method)

    async def refuse(requests, context):
        await context.abort(code, message, trailing)

    return grpc.stream_unary_rpc_method_handler(refuse, None, handler.response_serializer)


def _admitted(handler: grpc.RpcMethodHandler, method: str, tenant: str | None, leave) -> grpc.RpcMethodHandler:
    """`handler` served as a request stream of raw bytes: its requests decoded here, its behaviour
    run as `tenant` (None: the default), and `leave()` called when the call ends, however it ends.
    (The stream form also means the behaviour always runs, so `leave` is never skipped.)"""
    behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    deserializer = handler.request_deserializer

    async def decoded(raw: bytes, context):
        try:
            return decode(raw, deserializer)
        except InputError as error:
            await context.abort(*abort_arguments(error, method))

    async def requests(raw_requests, context):
        async for raw in raw_requests:
            yield await decoded(raw, context)

    async def request_of(raw_requests, context):
        if tenant is not None:
            serving_as(tenant)
        if handler.request_streaming:
            return requests(raw_requests, context)
        async for raw in raw_requests:
            return await decoded(raw, context)
        await context.abort(*abort_arguments(InputError(f"{method}: the call carried no request message"), method))

    if inspect.isasyncgenfunction(behaviour):  # responses yielded

        async def serve(raw_requests, context):
            try:
                async for response in behaviour(await request_of(raw_requests, context), context):
                    yield response
            finally:
                leave()

    else:  # one response returned, or responses written with context.write

        async def serve(raw_requests, context):
            try:
                result = behaviour(await request_of(raw_requests, context), context)
                return await result if inspect.isawaitable(result) else result
            finally:
                leave()

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(serve, None, handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(serve, None, handler.response_serializer)
