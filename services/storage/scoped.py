"""A store seen through a key prefix: one tenant's part of a shared store.

`PrefixedStore(store, "tenants/acme/")` puts "datasets/d1/x" at "tenants/acme/datasets/d1/x" of
`store`, lists only keys under its prefix (returned without it) and can delete only there. Every
key still passes the underlying store's checks (keys.py): no segment may be "." or "..", so no
key escapes the prefix. Errors name keys as the tenant knows them, without the prefix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import DomainError, InputError
from .base import ArtifactStore, ObjectInfo
from .keys import as_directory, check_key, check_prefix


class PrefixedStore(ArtifactStore):
    def __init__(self, store: ArtifactStore, prefix: str):
        self.base = store
        self.prefix = as_directory(prefix)
        if not self.prefix:
            raise InputError("a PrefixedStore needs a non-empty prefix")

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    @contextlib.contextmanager
    def _own_keys(self) -> Iterator[None]:
        """An error of the underlying store, its keys without this store's prefix (the same class
        and field): what a tenant is told never shows the layout it lives in."""
        try:
            yield
        except DomainError as error:
            text = str(error)
            if self.prefix not in text:
                raise
            raise type(error)(text.replace(self.prefix, ""), field=error.field) from error

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._own_keys():
            self.base.put_bytes(self._key(key), data)

    def put_buffers(self, key: str, buffers: Sequence[bytes | memoryview]) -> None:
        with self._own_keys():
            self.base.put_buffers(self._key(key), buffers)

    def get_bytes(self, key: str) -> bytes:
        with self._own_keys():
            return self.base.get_bytes(self._key(key))

    def put_file(self, key: str, path: str | Path) -> None:
        with self._own_keys():
            self.base.put_file(self._key(key), path)

    def get_file(self, key: str, path: str | Path) -> Path:
        with self._own_keys():
            return self.base.get_file(self._key(key), path)

    def stat(self, key: str) -> ObjectInfo:
        with self._own_keys():
            info = self.base.stat(self._key(key))
        return ObjectInfo(key, info.size)

    def exists(self, key: str) -> bool:
        with self._own_keys():
            return self.base.exists(self._key(key))

    def list(self, prefix: str = "") -> list[str]:
        with self._own_keys():
            return [key[len(self.prefix) :] for key in self.base.list(self.prefix + check_prefix(prefix))]

    def delete(self, key: str) -> None:
        with self._own_keys():
            self.base.delete(self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        if not check_prefix(prefix):
            raise InputError("delete_prefix needs a non-empty prefix (refusing to empty the whole store)")
        with self._own_keys():
            return self.base.delete_prefix(self.prefix + prefix)

    def describe(self) -> str:
        return f"{self.base.describe()} (under {self.prefix})"

    def close(self) -> None:
        return None  # the underlying store is shared; its owner closes it
