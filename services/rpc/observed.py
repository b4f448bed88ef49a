"""Every call's method, status code and duration, told to an `observe(method, code, seconds)`
callback (the assembly gives it the Prometheus histogram, system/metrics.py RPC_SECONDS): the
server's request rate, errors and latency per method. A grpc.aio server interceptor placed first,
so refusals at the door (UNAUTHENTICATED, RESOURCE_EXHAUSTED) count too."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

import grpc

Observe = Callable[[str, str, float], None]


class Observed(grpc.aio.ServerInterceptor):
    def __init__(self, observe: Observe):
        self.observe = observe

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:  # no such method: gRPC answers UNIMPLEMENTED itself
            return None
        return _observed(handler, details.method, self.observe)


def _code(context, error: BaseException | None) -> str:
    """The call's status code name: the one its handler set (abort, set_code), else OK, or
    CANCELLED / UNKNOWN for a call that was cancelled or raised."""
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == code)).name
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    return "UNKNOWN" if error is not None else "OK"


def _observed(handler: grpc.RpcMethodHandler, method: str, observe: Observe) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour timed and its outcome told to `observe`."""
    behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

    def told(context, started: float, error: BaseException | None) -> None:
        observe(method, _code(context, error), time.perf_counter() - started)

    if inspect.isasyncgenfunction(behaviour):

        async def serve(request, context):
            started, error = time.perf_counter(), None
            try:
                async for response in behaviour(request, context):
                    yield response
            except BaseException as raised:
                error = raised
                raise
            finally:
                told(context, started, error)

    else:

        async def serve(request, context):
            started, error = time.perf_counter(), None
            try:
                result = behaviour(request, context)
                return await result if inspect.isawaitable(result) else result
            except BaseException as raised:
                error = raised
                raise
            finally:
                told(context, started, error)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(serve, handler.request_deserializer, handler.response_serializer)
