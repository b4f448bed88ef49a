"""Artifact storage: one interface, a local-directory backend and an S3 backend (minio SDK)."""

from .errors import IntegrityError, StorageError, StorageUnavailable
from .store import ArtifactStore, LocalStore, S3Store, open_store

__all__ = [
    "ArtifactStore",
    "IntegrityError",
    "LocalStore",
    "S3Store",
    "StorageError",
    "StorageUnavailable",
    "open_store",
]
