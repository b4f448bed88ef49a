"""Domain errors as gRPC statuses, for the servicers (the meaning of each error is services/errors.py).

Servicers never pick codes themselves: they raise domain errors and `grpc_errors` turns them into
`context.abort(code, message)`, with the rich status (google.rpc.Status in the
`grpc-status-details-bin` trailer) carrying an ErrorInfo (reason: the error's stable name, domain
influence.dev) and, when the error names a request field, a BadRequest field violation. Anything
unexpected is INTERNAL with a one-line message (the traceback goes to the server log). Operation
records keep google.rpc.Code numbers; `rpc_code` and `code_name` convert.
"""

from __future__ import annotations

import functools
import inspect
import logging

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2

from ..errors import DomainError, code_of, message_of

log = logging.getLogger("influence.rpc")


def status_code(error: BaseException) -> grpc.StatusCode:
    return grpc.StatusCode[code_of(error)]


def rpc_code(error: BaseException) -> int:
    """The google.rpc.Code number of an error (what an operation record stores)."""
    return code_pb2.Code.Value(code_of(error))


def code_name(number: int) -> str:
    """The name of a google.rpc.Code number (UNKNOWN for a number that names none)."""
    try:
        return code_pb2.Code.Name(number)
    except ValueError:
        return "UNKNOWN"


ERROR_DOMAIN = "influence.dev"
DETAILS_KEY = "grpc-status-details-bin"


def rich_status(error: BaseException, message: str) -> status_pb2.Status:
    """google.rpc.Status of an error: code, message, ErrorInfo and (with a field) BadRequest."""
    status = status_pb2.Status(code=rpc_code(error), message=message)
    reason = error.reason if isinstance(error, DomainError) else "INTERNAL"
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
    status.details.add().Pack(info)
    field = getattr(error, "field", "")
    if field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return status


def grpc_errors(method):
    """Decorate an async servicer method (unary or server-streaming) to map errors to statuses."""

    def _abort_args(error: BaseException):
        code = status_code(error)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error in %s", method.__qualname__)
            message = f"internal error: {type(error).__name__}: {message_of(error)}"
        else:
            message = message_of(error)
        return code, message, ((DETAILS_KEY, rich_status(error, message).SerializeToString()),)

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
