"""Domain errors of the math core.

Every error a user can cause by bad input is an `InputError` (or a subclass) with a one-line
message naming the problem. The CLI prints it without a traceback; the services map these to
gRPC status codes in one place. Nothing here knows about gRPC.
"""


class EngineError(Exception):
    """Base class of the engine's domain errors."""


class InputError(EngineError, ValueError):
    """The caller's input is invalid (maps to INVALID_ARGUMENT)."""


class NotFoundError(EngineError, FileNotFoundError):
    """A named input (file, directory, artifact) does not exist (maps to NOT_FOUND)."""


class PreconditionError(EngineError):
    """Inputs are individually valid but do not fit together, e.g. factors fitted for another
    model (maps to FAILED_PRECONDITION)."""


class CancelledError(EngineError):
    """The caller asked to stop between batches."""
