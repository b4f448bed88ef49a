"""Bringing an existing factor set (a directory written by `influence fit`) into the system, at any
size and without holding it in memory.

    plan(store, manifest)         its id (derived from the manifest), whether it is published, and
                                  which files the store still lacks
    FactorUpload(store, manifest) receives the missing files chunk by chunk: each is spooled to a
                                  temporary file, checked against the manifest (size, sha256) and
                                  stored as it completes; `finish` checks every module file and
                                  publishes the manifest last. An interrupted upload leaves only
                                  complete, verified files behind, so a new plan resumes from there.
(A directory on the server is registered in place instead: catalog.factor_sets.link.)
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from ..catalog.factor_sets import FACTOR_SETS, FactorSetInfo, factor_set_id
from ..engine.factor_io import check_files
from ..errors import InputError, IntegrityError, NotFoundError
from ..storage import MANIFEST, ArtifactReader, ArtifactStore, FileEntry, Manifest


def read_manifest(data: bytes, where: str) -> Manifest:
    """An uploaded manifest, whose files must all lie directly in the factor set (no '/', no
    hidden names: each is spooled under its name); bytes that are no manifest are InputError."""
    try:
        manifest = Manifest.from_bytes(data, where)
    except IntegrityError as error:  # the caller's bytes, not stored ones: their input is at fault
        raise InputError(f"{error}: send the manifest.json `influence fit` wrote", field="manifest") from None
    for name in manifest.files:
        if "/" in name or name.startswith(".") or name == MANIFEST:
            raise InputError(f"{where} lists an invalid file name {name!r}")
    return manifest


def _stored(store: ArtifactStore, key: str, entry: FileEntry) -> bool:
    """The object is there with the manifest's size (its sha256 was checked when it was stored)."""
    try:
        return store.stat(key).size == entry.size
    except NotFoundError:
        return False


def plan(store: ArtifactStore, manifest: Manifest) -> tuple[str, bool, list[str]]:
    """(id, published, files still missing) for a factor set described by `manifest`."""
    identifier = factor_set_id(manifest)
    if FACTOR_SETS.exists(store, identifier):
        return identifier, True, []
    prefix = FACTOR_SETS.prefix(identifier)
    missing = [name for name, entry in sorted(manifest.files.items()) if not _stored(store, prefix + name, entry)]
    return identifier, False, missing


class FactorUpload:
    """One ImportFactors stream: the manifest's files arrive as consecutive chunks per file."""

    def __init__(self, store: ArtifactStore, manifest: Manifest):
        self.store, self.manifest = store, manifest
        self.id = factor_set_id(manifest)
        self.prefix = FACTOR_SETS.prefix(self.id)
        self._spool = tempfile.TemporaryDirectory(prefix="factor-upload-")
        self._file: str | None = None
        self._handle = None
        self._digest = None
        self._size = 0

    def add(self, name: str, offset: int, data: bytes) -> None:
        if name not in self.manifest.files:
            raise InputError(f"upload sends {name!r}, which the manifest does not list")
        if name != self._file:
            if self._file is not None:
                raise InputError(f"upload moved on to {name!r} before {self._file!r} was complete")
            self._open(name)
        if offset != self._size:
            raise InputError(f"upload of {name!r} skipped bytes: offset {offset}, expected {self._size}")
        entry = self.manifest.files[name]
        if self._size + len(data) > entry.size:
            raise IntegrityError(f"uploaded {name} is longer than its manifest says ({entry.size} bytes)")
        self._handle.write(data)
        self._digest.update(data)
        self._size += len(data)
        if self._size == entry.size:
            self._store_file()

    def _open(self, name: str) -> None:
        self._file, self._size, self._digest = name, 0, hashlib.sha256()
        self._handle = open(Path(self._spool.name) / name, "wb")  # noqa: SIM115 (closed in _store_file/close)
        if self.manifest.files[name].size == 0:
            self._store_file()

    def _store_file(self) -> None:
        name, entry = self._file, self.manifest.files[self._file]
        self._handle.close()
        spooled = Path(self._spool.name) / name
        if FileEntry(name, self._digest.hexdigest(), self._size) != entry:
            spooled.unlink(missing_ok=True)
            raise IntegrityError(f"uploaded {name} is corrupted (sha256 or size differs from its manifest)")
        self.store.put_file(self.prefix + name, spooled)
        spooled.unlink()
        self._file, self._handle = None, None

    def finish(self) -> FactorSetInfo:
        """Check that every file is stored and every module file reads as its metadata says, then
        publish the manifest."""
        if self._file is not None:
            raise InputError(f"upload ended in the middle of {self._file!r}")
        _, published, missing = plan(self.store, self.manifest)
        if not published:
            if missing:
                raise InputError(f"upload is incomplete: {len(missing)} files missing, e.g. {missing[0]!r}")
            reader = ArtifactReader(self.store, self.prefix, self.manifest)
            check_files(self.manifest.metadata, reader.read_tensors, "uploaded factors")
            self.store.put_bytes(self.prefix + MANIFEST, self.manifest.to_bytes())
        return FactorSetInfo.from_metadata(self.manifest.metadata, self.id, "uploaded factors")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._spool.cleanup()

