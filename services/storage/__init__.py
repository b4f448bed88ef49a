"""Artifact storage: one interface (base.ArtifactStore), a local-directory backend and an S3
backend (minio SDK), artifacts published manifest-last, and safetensors helpers.

    store = open_store("s3://bucket?endpoint=127.0.0.1:8333")   # or a directory
    store.put_bytes("jobs/j1/spec.json", b"{}")
    with ArtifactWriter(store, "factors/f1") as writer: ...
    open_artifact(store, "factors/f1").read_tensors("mlp.safetensors")
"""

from .artifacts import ArtifactReader, ArtifactWriter, delete_artifact, is_published, open_artifact
from .base import ArtifactStore, ObjectInfo
from .local import LocalStore
from .manifest import FORMAT_VERSION, MANIFEST, FileEntry, Manifest
from .retry import RetryPolicy
from .s3 import S3Store, split_s3_uri
from .scoped import PrefixedStore
from .tensors import get_tensors, put_tensors
from .url import open_store

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "ArtifactReader",
    "ArtifactStore",
    "ArtifactWriter",
    "FileEntry",
    "LocalStore",
    "Manifest",
    "ObjectInfo",
    "PrefixedStore",
    "RetryPolicy",
    "S3Store",
    "delete_artifact",
    "get_tensors",
    "is_published",
    "open_artifact",
    "open_store",
    "put_tensors",
    "split_s3_uri",
]
