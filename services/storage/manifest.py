"""The manifest of an artifact: the file that publishes it, written last.

    {"format_version": 1,
     "files": {"A.safetensors": {"sha256": "<hex>", "size": 1234}, ...},
     "metadata": {...anything JSON...}}

Serialised deterministically (sorted keys), so re-publishing the same content writes the same
bytes. A reader refuses a newer format_version than FORMAT_VERSION.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, IntegrityError, UnsupportedFormat

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    name: str  # relative to the artifact's prefix
    sha256: str  # hex
    size: int  # bytes


@dataclass(frozen=True)
class Manifest:
    files: dict[str, FileEntry]
    metadata: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_bytes(self) -> bytes:
        document = {
            "format_version": self.format_version,
            "files": {name: {"sha256": entry.sha256, "size": entry.size} for name, entry in self.files.items()},
            "metadata": self.metadata,
        }
        try:
            return (json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
        except (TypeError, ValueError) as error:
            raise InputError(f"artifact metadata must be plain JSON: {error}") from None

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        try:
            document = json.loads(data)
            version = document["format_version"]
            files = {
                name: FileEntry(name, str(entry["sha256"]), int(entry["size"]))
                for name, entry in document["files"].items()
            }
            metadata = document.get("metadata", {})
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise IntegrityError(f"manifest {where} is unreadable ({error})") from None
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UnsupportedFormat(
                f"manifest {where} has format version {version!r}; this code reads up to {FORMAT_VERSION}"
            )
        return cls(files, metadata if isinstance(metadata, dict) else {}, version)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_buffers(buffers) -> str:
    """sha256 of the concatenation of `buffers` (bytes or memoryviews), without joining them."""
    digest = hashlib.sha256()
    for buffer in buffers:
        digest.update(buffer)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> tuple[str, int]:
    """(hex sha256, size) of a local file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
