"""The one place where domain errors become gRPC status codes.

Servicers never pick codes themselves: they raise domain errors (engine, storage, jobs) or
`RequestError`, and `grpc_errors` turns them into `context.abort(code, message)`. Anything
unexpected is INTERNAL with a one-line message (the traceback goes to the server log).
"""

from __future__ import annotations

import functools
import inspect
import logging

import grpc

from ..engine.errors import CancelledError, EngineError, InputError, NotFoundError, PreconditionError

log = logging.getLogger("influence.rpc")


class RequestError(InputError):
    """A malformed request field (INVALID_ARGUMENT)."""


class ResourceExhausted(EngineError):
    """The request is too large (RESOURCE_EXHAUSTED)."""


class AlreadyExists(EngineError):
    """ALREADY_EXISTS."""


class Unavailable(EngineError):
    """A backing service (Redis, object storage) is unreachable (UNAVAILABLE: clients may retry)."""


class JobFailed(EngineError):
    """A job a streaming call waited on failed: the call ends with the job's own status code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code  # a google.rpc.Code value


# Checked in order: the first matching class decides. Storage and job-queue errors register
# themselves with `register` so this module needs no import of them.
_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (CancelledError, grpc.StatusCode.CANCELLED),
    (InputError, grpc.StatusCode.INVALID_ARGUMENT),
]


def register(error_type: type[BaseException], code: grpc.StatusCode) -> None:
    """Map another domain error type (e.g. a storage error) to a status code."""
    _CODES.insert(0, (error_type, code))


def status_of(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, JobFailed):
        return next((code for code in grpc.StatusCode if code.value[0] == error.code), grpc.StatusCode.UNKNOWN)
    for error_type, code in _CODES:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def message_of(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:1000]


def grpc_errors(method):
    """Decorate an async servicer method (unary or server-streaming) to map errors to statuses."""

    def _abort_args(error: BaseException):
        code = status_of(error)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error in %s", method.__qualname__)
            return code, f"internal error: {type(error).__name__}: {message_of(error)}"
        return code, message_of(error)

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def streaming(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except Exception as error:
                if isinstance(error, grpc.aio.AbortError):
                    raise
                await context.abort(*_abort_args(error))

        return streaming

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            await context.abort(*_abort_args(error))

    return unary
