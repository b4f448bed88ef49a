"""The domain errors of the whole system, and the one table that says what each one means to a
caller: its gRPC status code, whether a client should retry, and the CLI's exit code.

Every layer raises these (or a subclass with a more specific name, e.g. storage's
IntegrityError); nothing below the servicers knows about gRPC, and this module imports nothing,
so the engine, the stores, the client and the CLI all share it.

    class                    status               retried   CLI exit
    InputError               INVALID_ARGUMENT     no        2   the caller's input is invalid
    NotFoundError            NOT_FOUND            no        2   a named input does not exist
    PreconditionError        FAILED_PRECONDITION  no        2   inputs valid alone, not together
    AlreadyExistsError       ALREADY_EXISTS       no        2
    ResourceExhaustedError   RESOURCE_EXHAUSTED   no        2   over a configured limit
    PermissionDeniedError    PERMISSION_DENIED    no        1   the system's own credentials
    UnauthenticatedError     UNAUTHENTICATED      no        2   no valid token (serve --auth-tokens)
    CancelledError           CANCELLED            no        3   the job was cancelled (CancelOperation)
    UnavailableError         UNAVAILABLE          yes       1   Redis or the object store away
    AbortedError             ABORTED              no        1   a task failed every delivery
    DataLossError            DATA_LOSS            no        2   stored bytes differ from their manifest
    InternalError            INTERNAL             no        1   a bug, or an unknown remote failure
Exit code 2 means "fix your input" (the classes with `callers_fault`: a job task that raises one
fails its job at once instead of being retried); 1 means the system failed; 3 that the job the
command waited on was cancelled (by another caller); 130 that the command itself was interrupted
(Ctrl-C, SIGTERM: see the CLI).
"""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error the system raises on purpose. Subclasses set `code`. `field` names the
    request field at fault, when one is (a client sees it as a BadRequest field violation)."""

    code = "INTERNAL"  # a google.rpc.Code name (the same names as grpc.StatusCode)
    retryable = False  # a client may retry the call
    callers_fault = False  # retrying cannot help: a job task failing with it fails the job at once
    exit_code = 1
    # What a caller is told instead of the error's own text (None: the text itself). Set for the
    # system's own failures, whose text names its endpoints, keys and classes: those are for the
    # operator's log, never for callers (see `caller_message`).
    caller_text: str | None = None

    def __init__(self, *args, field: str = ""):
        super().__init__(*args)
        self.field = field

    @property
    def reason(self) -> str:
        """A stable machine-readable name: the class name in UPPER_SNAKE without "Error"
        (InputError -> INPUT, NonFiniteError -> NON_FINITE)."""
        name = type(self).__name__.removesuffix("Error") or "DOMAIN"
        return "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(name)).upper()


class InputError(DomainError, ValueError):
    """The caller's input is invalid."""

    code, exit_code = "INVALID_ARGUMENT", 2
    callers_fault = True


class NotFoundError(DomainError, FileNotFoundError):
    """A named input (file, directory, artifact, operation) does not exist."""

    code, exit_code = "NOT_FOUND", 2
    callers_fault = True


class PreconditionError(DomainError):
    """Inputs are individually valid but do not fit together, e.g. factors fitted for another model."""

    code, exit_code = "FAILED_PRECONDITION", 2
    callers_fault = True


class AlreadyExistsError(DomainError):
    code, exit_code = "ALREADY_EXISTS", 2
    callers_fault = True


class ResourceExhaustedError(DomainError):
    """A request over a configured limit (size, count)."""

    code, exit_code = "RESOURCE_EXHAUSTED", 2
    callers_fault = True


class PermissionDeniedError(DomainError):
    """A backing service refused the system's credentials."""

    code = "PERMISSION_DENIED"
    caller_text = "the object store refused this system's credentials: its operator must fix them (see the server log)"


class UnauthenticatedError(DomainError):
    """A call without a valid token (`influence serve --auth-tokens`)."""

    code, exit_code = "UNAUTHENTICATED", 2


class CancelledError(DomainError):
    """The caller asked to stop (checked between batches)."""

    code, exit_code = "CANCELLED", 3


class UnavailableError(DomainError):
    """A backing service (Redis, the object store) or the server is unreachable; retry later."""

    code, retryable = "UNAVAILABLE", True


class WrongWorkerError(UnavailableError):
    """This worker cannot run the task (e.g. it asks for CUDA on a CPU worker): left for another."""


class AbortedError(DomainError):
    """A task failed on every delivery and was dead-lettered."""

    code = "ABORTED"


class DataLossError(DomainError):
    """Stored bytes are damaged (a checksum or size differs from the manifest): never used, and a
    job task failing with it fails at once (a retry would read the same bytes). Exit code 2: the
    data named (a factor directory, an artifact) must be replaced."""

    code, exit_code = "DATA_LOSS", 2
    callers_fault = True


class InternalError(DomainError):
    """An unexpected failure (the server's log has the traceback)."""

    code = "INTERNAL"
    caller_text = "internal error: the server's log has the details"


_BY_CODE: dict[str, type[DomainError]] = {
    error.code: error
    for error in (
        InputError,
        NotFoundError,
        PreconditionError,
        AlreadyExistsError,
        ResourceExhaustedError,
        PermissionDeniedError,
        UnauthenticatedError,
        CancelledError,
        UnavailableError,
        AbortedError,
        DataLossError,
        InternalError,
    )
}


def code_of(error: BaseException) -> str:
    """The status code name of any exception (INTERNAL for one that is not a DomainError)."""
    return error.code if isinstance(error, DomainError) else "INTERNAL"


def error_for_code(code: str, message: str, field: str = "") -> DomainError:
    """The domain error a client raises for a status `code` name (INTERNAL for any other code)."""
    return _BY_CODE.get(code, InternalError)(message if code in _BY_CODE else f"{code}: {message}", field=field)


def exit_code_of(error: BaseException) -> int:
    return error.exit_code if isinstance(error, DomainError) else 1


def message_of(error: BaseException) -> str:
    """The first line of the error's text (at most 1,000 characters)."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:1000]


def caller_message(error: BaseException) -> str:
    """What a caller may read of an error (a status message, an operation's error): the error's
    own text when it is about the caller's request; for the system's own failures (INTERNAL,
    PERMISSION_DENIED, the store or Redis away; any exception that is not a DomainError) a fixed
    sentence that names no endpoint, key layout, path or class. The full text belongs in the log."""
    if not isinstance(error, DomainError):
        return InternalError.caller_text
    return message_of(error) if error.caller_text is None else error.caller_text


# -- more specific names, each one of the classes above ------------------------------------------


class NonFiniteError(PreconditionError):
    """A tensor that must be finite holds NaN or Inf (the model, the data or a factor file)."""


class IntegrityError(DataLossError):
    """Stored bytes differ from what their manifest promises (sha256 or size), a file it lists is
    missing, or the manifest itself is unreadable."""


class UnsupportedFormat(PreconditionError):
    """An artifact written in a format version this code does not read."""


class StorageError(InternalError):
    """The object store failed in a way that is neither transient nor the caller's fault."""


class StorageFull(ResourceExhaustedError):
    """The disk under a local store or an output directory is full (ENOSPC, EDQUOT): retrying
    cannot help until someone frees space, so a task failing with it fails its job at once."""


class StorageUnavailable(UnavailableError):
    """The object store did not answer after bounded retries."""

    caller_text = "the object store is unavailable; retry later"


class QueueUnavailable(UnavailableError):
    """Redis did not answer."""

    caller_text = "Redis unavailable: the job queue did not answer; retry later"
