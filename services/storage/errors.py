"""Storage errors (domain errors: no gRPC here)."""

from ..engine.errors import EngineError, NotFoundError, PreconditionError


class StorageError(EngineError):
    """Base class of storage failures."""


class StorageUnavailable(StorageError):
    """The object store did not answer after bounded retries (callers may retry later)."""


class IntegrityError(StorageError, PreconditionError):
    """Stored bytes do not match their manifest's sha256."""


__all__ = ["IntegrityError", "NotFoundError", "StorageError", "StorageUnavailable"]
