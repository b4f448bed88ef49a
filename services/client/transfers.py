"""Files between the client and a server: a dataset's JSONL and a directory uploaded in chunks
read from disk (each one message, under any server's message limit), and an artifact's files
streamed into a directory, each checked against its sha256 and put in place
whole, a broken stream resumed where it stopped. Memory holds one chunk at a time either way."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

from ..errors import InternalError, StorageFull
from ..gen.influence.v1 import common_pb2, gradient_service_pb2
from ..wire import CHUNK_BYTES
from .channel import RetryPolicy


def download(retry: RetryPolicy, method, request, out_dir: str | Path, last: str | None = None) -> Path:
    """Stream an artifact's files into out_dir (`method`: a Stream*Files call, `request` its
    request). A stream broken by a retryable error (the server restarted, a connection dropped) is
    resumed where it stopped (request.resume_file and resume_offset) under `retry`; a file's
    checksum covers all its parts. A full disk is StorageFull, and leaves nothing half-written."""
    receiver = FileReceiver(Path(out_dir), last)

    def attempt() -> Path:
        request.resume_file, request.resume_offset = receiver.position
        receiver.receive(method(request, timeout=None))
        return receiver.finish()

    try:
        return retry.run(attempt)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):  # nothing half-written stays: see finally
            raise StorageFull(f"disk full: writing {out_dir} failed ({os.strerror(error.errno)})") from None
        raise
    finally:
        receiver.discard()


def dataset_upload(settings: gradient_service_pb2.RegisterDatasetRequest, content: Path | bytes):
    """UploadDataset's messages: the settings, then the JSONL's bytes in chunks (from disk, for a path)."""
    yield gradient_service_pb2.UploadDatasetRequest(request=settings)
    if isinstance(content, bytes):
        for offset in range(0, len(content), CHUNK_BYTES):
            yield gradient_service_pb2.UploadDatasetRequest(data=content[offset : offset + CHUNK_BYTES])
        return
    with content.open("rb") as handle:
        while data := handle.read(CHUNK_BYTES):
            yield gradient_service_pb2.UploadDatasetRequest(data=data)


def upload_chunks(directory: Path, manifest: bytes, files, progress=None):
    """manifest.json (its size on its first chunk), then each file read from disk in chunks."""
    yield common_pb2.FileChunk(file="manifest.json", offset=0, data=manifest, size=len(manifest))
    for name in files:
        path = directory / name
        size = path.stat().st_size
        if progress is not None:
            progress(name)
        with path.open("rb") as handle:
            offset = 0
            while True:
                data = handle.read(CHUNK_BYTES)
                if not data and offset:
                    break
                yield common_pb2.FileChunk(file=name, offset=offset, data=data, size=size if offset == 0 else 0)
                offset += len(data)
                if offset >= size:
                    break


class FileReceiver:
    """Writes streamed files into a directory as they arrive (each to a temporary file, checked
    against the sha256 its first chunk carries, then renamed into place), across as many streams
    as a download takes: `position` is where a resumed stream must start. `last` (a manifest) is
    removed first and put in place after every other file. Memory holds one chunk at a time."""

    def __init__(self, out_dir: Path, last: str | None):
        self.out_dir, self.last = out_dir, last
        out_dir.mkdir(parents=True, exist_ok=True)
        if last:
            (out_dir / last).unlink(missing_ok=True)
        self.temporaries: dict[str, Path] = {}
        self.expected: dict[str, str] = {}
        self.digests: dict[str, hashlib._Hash] = {}
        self.sizes: dict[str, int] = {}
        self.current: str | None = None
        self.handle = None

    @property
    def position(self) -> tuple[str, int]:
        """(file, offset) of the first byte not yet received ("" before any)."""
        return (self.current, self.sizes[self.current]) if self.current else ("", 0)

    def receive(self, chunks) -> None:
        for chunk in chunks:
            name = chunk.file
            if name != self.current:
                self._open(name, chunk.sha256)
            if chunk.offset != self.sizes[name]:
                raise InternalError(f"stream of {name} skipped bytes at offset {chunk.offset}")
            self.handle.write(chunk.data)
            self.digests[name].update(chunk.data)
            self.sizes[name] += len(chunk.data)

    def _open(self, name: str, sha256: str) -> None:
        if self.handle is not None:
            self.handle.close()
        parts = name.split("/")
        if any(not part or part.startswith(".") for part in parts) or name in self.temporaries:
            raise InternalError(f"the server sent an invalid or repeated file {name!r}")
        self.current = name
        target = self.out_dir.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.temporaries[name] = target.with_name(f".{target.name}.part")
        self.handle = self.temporaries[name].open("wb")
        self.digests[name], self.sizes[name], self.expected[name] = hashlib.sha256(), 0, sha256

    def finish(self) -> Path:
        self.handle.close() if self.handle is not None else None
        self.handle = None
        for name, digest in self.digests.items():
            if self.expected[name] and digest.hexdigest() != self.expected[name]:
                raise InternalError(f"{name} arrived corrupted (sha256 mismatch)")
        for name in sorted(self.temporaries, key=lambda n: n == self.last):
            self.temporaries[name].replace(self.out_dir.joinpath(*name.split("/")))
        self.temporaries.clear()
        return self.out_dir

    def discard(self) -> None:
        if self.handle is not None:
            self.handle.close()
        for temporary in self.temporaries.values():
            temporary.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
