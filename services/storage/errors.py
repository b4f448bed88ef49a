"""Domain errors of the artifact store (no gRPC here).

Each class also derives from the engine's error that says how a caller should treat it
(services/rpc/status.py maps those to status codes): a missing key or artifact is a
NotFoundError, a bad key an InputError, corrupted bytes a PreconditionError.
"""

from ..engine.errors import EngineError, InputError, PreconditionError
from ..engine.errors import NotFoundError as _EngineNotFound


class StorageError(EngineError):
    """Base class of storage failures."""


class NotFoundError(StorageError, _EngineNotFound):
    """No object at that key, or no published artifact (no manifest) under that prefix."""


class InvalidArgument(StorageError, InputError):
    """A malformed key, prefix, artifact file name, store URL or manifest metadata."""


class IntegrityError(StorageError, PreconditionError):
    """Stored bytes differ from what the manifest promises (sha256 or size), or a file it
    lists is missing, or the manifest itself is unreadable."""


class UnsupportedFormat(StorageError, PreconditionError):
    """A manifest written by a newer format version than this code reads."""


class AccessDenied(StorageError):
    """The object store refused the credentials (wrong key/secret or missing permission)."""


class StorageUnavailable(StorageError):
    """The object store did not answer after bounded retries; callers may retry later."""


__all__ = [
    "AccessDenied",
    "IntegrityError",
    "InvalidArgument",
    "NotFoundError",
    "StorageError",
    "StorageUnavailable",
    "UnsupportedFormat",
]
