"""Domain errors as gRPC statuses, for the servicers (the meaning of each error is services/errors.py).

Servicers never pick codes themselves: they raise domain errors and `grpc_errors` turns them into
`context.abort(code, message)`, with the rich status (google.rpc.Status in the
`grpc-status-details-bin` trailer) carrying an ErrorInfo (reason: the error's stable name, domain
influence.dev) and, when the error names a request field, a BadRequest field violation. The message
is `errors.caller_message`: the system's own failures (INTERNAL, the store or Redis away) reach the
caller as a fixed sentence, never naming an endpoint, a key layout or a class; their full text goes
to the server log (an INTERNAL one with its traceback and a reference the caller's message quotes).
Operation records keep google.rpc.Code numbers; `rpc_code` and `code_name` convert.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2

from ..errors import DomainError, caller_message, code_of, message_of

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


def abort_arguments(error: BaseException, where: str) -> tuple:
    """(code, message, trailing metadata) of `context.abort` for `error`, raised serving `where`
    (a method's name, for the log): the caller's message (errors.caller_message) and rich status.
    What the caller is not told is logged: the full text, and for INTERNAL the traceback."""
    code = status_code(error)
    message = caller_message(error)
    if code == grpc.StatusCode.INTERNAL:
        reference = uuid.uuid4().hex[:12]
        log.error("internal error %s in %s", reference, where, exc_info=error)
        message = f"{message} (reference {reference})"
    elif message != message_of(error):
        log.warning("%s: %s: %s", where, type(error).__name__, message_of(error))
    return code, message, ((DETAILS_KEY, rich_status(error, message).SerializeToString()),)


def grpc_errors(method):
    """Decorate an async servicer method (unary or server-streaming) to map errors to statuses."""

    def _abort_args(error: BaseException):
        return abort_arguments(error, method.__qualname__)

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
