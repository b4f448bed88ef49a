"""The artifact store interface: what every backend does, identically.

Keys follow services/storage/keys.py. Semantics every backend guarantees (the contract
tests in tests/services/storage/test_storage.py check them against each backend):
- put_* (bytes, buffers, file) replaces the object atomically: a reader sees the old or the new bytes, never a mix;
- get_* of a missing key raises NotFoundError (get_file then leaves no file behind);
- list(prefix) is recursive and sorted, and is a plain string-prefix match ("jobs/a" also
  matches "jobs/ab/x");
- delete of a missing key is a no-op; delete_prefix returns how many objects it removed;
- put_file / get_file stream: memory use does not grow with the file size.
One difference remains: S3 can hold both "a" and "a/b"; LocalStore (a file cannot be a
directory) refuses the second with InputError. Artifact layouts never need both.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .keys import check_prefix


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int  # bytes


class ArtifactStore(abc.ABC):
    """A flat key -> bytes store (see the module docstring for the contract)."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    def put_buffers(self, key: str, buffers: Sequence[bytes | memoryview]) -> None:
        """Store the concatenation of `buffers` at `key` (a backend that can write them one by
        one, without joining them first, overrides this)."""
        self.put_bytes(key, b"".join(buffers))

    @abc.abstractmethod
    def put_file(self, key: str, path: str | Path) -> None:
        """Upload the local file `path` to `key`, streaming."""

    @abc.abstractmethod
    def get_file(self, key: str, path: str | Path) -> Path:
        """Download `key` to the local file `path` (parents created, replaced atomically)."""

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size of the object at `key` (NotFoundError if none)."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]: ...

    @abc.abstractmethod
    def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def describe(self) -> str:
        """A URL for open_store that reaches the same objects (never contains secrets)."""

    def close(self) -> None:
        """Release connections (a no-op where there are none); the store is unusable afterwards."""
        return None

    def in_bucket(self, bucket: str) -> ArtifactStore:
        """The same store reading another bucket with the same endpoint and credentials (for
        s3:// URIs users give, e.g. a dataset to register); InputError where there are no buckets."""
        raise InputError(f"this system's object store is a directory, not S3: it cannot read s3://{bucket}/...")

    def size(self, key: str) -> int:
        return self.stat(key).size

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with `prefix` (non-empty); how many there were."""
        if not check_prefix(prefix):
            raise InputError("delete_prefix needs a non-empty prefix (refusing to empty the whole store)")
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r})"
