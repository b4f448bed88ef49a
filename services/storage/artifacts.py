"""Artifacts: a set of files under a prefix, published by writing manifest.json last.

    with ArtifactWriter(store, "factors/f1") as writer:
        writer.add_tensors("mlp.safetensors", {"A": a, "S": s})
        writer.add_file("big.bin", "/tmp/big.bin")
        writer.publish({"strategy": "ekfac"})

    artifact = open_artifact(store, "factors/f1")   # NotFoundError until published
    artifact.metadata, artifact.names()
    artifact.read_tensors("mlp.safetensors")         # sha256 and size checked: IntegrityError

Files go to deterministic keys (prefix + name) and the manifest's bytes depend only on the
content, so a retried task that publishes the same artifact again rewrites identical bytes.
A reader only ever trusts the manifest: files without one (a crashed writer) are invisible.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError, IntegrityError, NotFoundError, StorageError
from .base import ArtifactStore
from .keys import as_directory, check_key
from .manifest import MANIFEST, FileEntry, Manifest, sha256_buffers, sha256_bytes, sha256_file
from .tensors import encode_tensors, tensors_from_bytes

if TYPE_CHECKING:
    import torch

_VERIFY_IN_MEMORY = 64 << 20  # verify() downloads bigger files to a temporary file instead


def _check_name(name: str) -> str:
    check_key(name)
    if name == MANIFEST:
        raise InputError(f"{MANIFEST!r} is reserved for the artifact's manifest")
    return name


class ArtifactWriter:
    """Writes an artifact's files, then its manifest (publish). As a context manager, a clean
    exit publishes with `metadata` if publish was not called; an exception publishes nothing."""

    def __init__(self, store: ArtifactStore, prefix: str, metadata: Mapping | None = None):
        self.store, self.prefix = store, as_directory(prefix)
        self.metadata = dict(metadata or {})
        self.entries: dict[str, FileEntry] = {}
        self.manifest: Manifest | None = None

    def _add(self, name: str, sha256: str, size: int) -> FileEntry:
        entry = FileEntry(name, sha256, size)
        self.entries[name] = entry
        return entry

    def _check_open(self, name: str) -> str:
        if self.manifest is not None:
            raise StorageError(f"artifact {self.prefix} is already published; cannot add {name!r}")
        return _check_name(name)

    def add_bytes(self, name: str, data: bytes) -> FileEntry:
        self._check_open(name)
        self.store.put_bytes(self.prefix + name, data)
        return self._add(name, sha256_bytes(data), len(data))

    def add_file(self, name: str, path: str | Path) -> FileEntry:
        """Upload a local file, streaming (hashed first, then uploaded)."""
        self._check_open(name)
        if not Path(path).is_file():
            raise NotFoundError(f"cannot add {path} to artifact {self.prefix}: no such file")
        sha256, size = sha256_file(path)
        self.store.put_file(self.prefix + name, path)
        return self._add(name, sha256, size)

    def add_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> FileEntry:
        self._check_open(name)
        buffers = encode_tensors(tensors)
        self.store.put_buffers(self.prefix + name, buffers)
        return self._add(name, sha256_buffers(buffers), sum(buffer.nbytes for buffer in buffers))

    def publish(self, metadata: Mapping | None = None) -> Manifest:
        """Write manifest.json (files sorted by name); the artifact is visible from now on."""
        if self.manifest is not None:
            return self.manifest
        if metadata is not None:
            self.metadata = dict(metadata)
        manifest = Manifest(dict(sorted(self.entries.items())), self.metadata)
        self.store.put_bytes(self.prefix + MANIFEST, manifest.to_bytes())
        self.manifest = manifest
        return manifest

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None:
            self.publish()


class ArtifactReader:
    """A published artifact; every read is checked against the manifest."""

    def __init__(self, store: ArtifactStore, prefix: str, manifest: Manifest):
        self.store, self.prefix, self.manifest = store, as_directory(prefix), manifest

    @property
    def metadata(self) -> dict:
        return self.manifest.metadata

    def names(self) -> list[str]:
        return sorted(self.manifest.files)

    def entry(self, name: str) -> FileEntry:
        try:
            return self.manifest.files[name]
        except KeyError:
            raise NotFoundError(f"artifact {self.prefix} has no file {name!r} (it has {self.names()})") from None

    def _fetch(self, name: str, fetch):
        try:
            return fetch(self.store, self.prefix + name)
        except NotFoundError:
            raise IntegrityError(f"{self.prefix}{name} is listed in the manifest but missing") from None

    def _check(self, entry: FileEntry, sha256: str, size: int) -> None:
        if size != entry.size or sha256 != entry.sha256:
            raise IntegrityError(
                f"{self.prefix}{entry.name} is corrupted: sha256 {sha256[:12]}.. and {size} bytes, but the "
                f"manifest says {entry.sha256[:12]}.. and {entry.size} bytes"
            )

    def read_bytes(self, name: str) -> bytes:
        entry = self.entry(name)
        data = self._fetch(name, lambda store, key: store.get_bytes(key))
        self._check(entry, sha256_bytes(data), len(data))
        return data

    def read_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return tensors_from_bytes(self.read_bytes(name), self.prefix + name)

    def get_file(self, name: str, path: str | Path) -> Path:
        """Download a file, streaming; on a mismatch the file is removed and IntegrityError raised."""
        entry = self.entry(name)
        target = self._fetch(name, lambda store, key: store.get_file(key, path))
        sha256, size = sha256_file(target)
        try:
            self._check(entry, sha256, size)
        except IntegrityError:
            target.unlink(missing_ok=True)
            raise
        return target

    def verify(self) -> None:
        """Check every file (IntegrityError on the first bad one)."""
        for name in self.names():
            if self.entry(name).size <= _VERIFY_IN_MEMORY:
                self.read_bytes(name)
                continue
            with tempfile.TemporaryDirectory(prefix="verify-") as directory:
                self.get_file(name, Path(directory) / "file")


def open_artifact(store: ArtifactStore, prefix: str, what: str | None = None) -> ArtifactReader:
    """The artifact published under `prefix`; NotFoundError if it has no manifest (yet), whose
    message is "{what} not found" when `what` names the artifact for the caller's user."""
    prefix = as_directory(prefix)
    try:
        data = store.get_bytes(prefix + MANIFEST)
    except NotFoundError:
        if what:
            raise NotFoundError(f"{what} not found") from None
        raise NotFoundError(f"no published artifact at {prefix} (no {MANIFEST})") from None
    return ArtifactReader(store, prefix, Manifest.from_bytes(data, prefix + MANIFEST))


def is_published(store: ArtifactStore, prefix: str) -> bool:
    return store.exists(as_directory(prefix) + MANIFEST)


def delete_artifact(store: ArtifactStore, prefix: str) -> int:
    """Unpublish (manifest first, so no reader sees a partial artifact), then delete every file."""
    prefix = as_directory(prefix)
    if not prefix:
        raise InputError("refusing to delete an artifact that is the whole store")
    store.delete(prefix + MANIFEST)
    return store.delete_prefix(prefix)
