"""What the three servicers share: request limits, operation messages, listing and chunked files.

The servicers themselves live in services/factor_svc, services/gradient_svc and
services/query_svc; the Operations service in rpc/operations.py. They are thin: validate, call
the job system, convert. Errors become status codes in one place (rpc/status.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from google.longrunning import operations_pb2
from google.protobuf import any_pb2, timestamp_pb2
from google.rpc import status_pb2

from ..engine.model_io import ModelRef
from ..errors import InputError
from ..gen.influence.v1 import (
    common_pb2,
)
from ..jobs.operations import CANCELLED, FAILED, SUCCEEDED, TERMINAL
from ..storage import MANIFEST, ArtifactReader, open_artifact
from . import validation
from .auth import current_tenant


@dataclass
class Limits:
    max_upload_bytes: int = 256 * 2**20
    max_queries: int = 4096
    max_query_chars: int = 100_000
    chunk_bytes: int = 1 * 2**20
    # whether callers may name files on the server (file:// uris: register in place, by path).
    # Off on a server with tokens: a tenant must not read the server's filesystem.
    server_paths: bool = True


class TenantScoped:
    """Base of the servicers: `self.system` is the calling tenant's view of the job system
    (JobSystem.for_tenant: its part of the store, its operations), so every request is served
    from the caller's own namespace and another tenant's resources simply do not exist there."""

    def __init__(self, system, limits: Limits):
        self.shared_system, self.limits = system, limits

    @property
    def system(self):
        return self.shared_system.for_tenant(current_tenant())

    def server_file(self, uri: str, field: str) -> Path:
        """The server path a file:// `uri` names, if this server lets callers name its files."""
        if not self.limits.server_paths:
            raise InputError(
                f"{field}: this server does not read its own files for callers (it authenticates tenants); "
                "upload the content instead"
            )
        return validation.file_uri(uri, field)


def model_ref(spec: common_pb2.ModelSpec) -> ModelRef:
    return ModelRef(validation.model_path(spec), spec.device or "cpu", spec.dtype or "float32")


def new_id() -> str:
    return uuid.uuid4().hex[:20]


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def operation_message(record: dict) -> operations_pb2.Operation:
    """An operation record (jobs.operations) as a google.longrunning.Operation."""
    counters = record["counters"]
    metadata = common_pb2.OperationMetadata(
        kind=record["metadata"].get("kind", record["kind"]),
        stage=record.get("stage", ""),
        shards_done=counters.get("shards_done", 0),
        shards_total=record.get("shards_total", 0),
        tokens_processed=counters.get("tokens_processed", 0),
        bytes_written=counters.get("bytes_written", 0),
        bytes_read=counters.get("bytes_read", 0),
        create_time=_timestamp(record["create_time"]),
        update_time=_timestamp(record["update_time"]),
        target=record["metadata"].get("target", ""),
        step=record.get("step", ""),
        step_done=record.get("step_done", 0),
        step_total=record.get("step_total", 0),
        step_unit=record.get("step_unit", ""),
    )
    packed = any_pb2.Any()
    packed.Pack(metadata)
    operation = operations_pb2.Operation(
        name=f"operations/{record['id']}", metadata=packed, done=record["state"] in TERMINAL
    )
    if record["state"] == SUCCEEDED:
        operation.response.ParseFromString(record["response"])
    elif record["state"] in (FAILED, CANCELLED):
        operation.error.CopyFrom(
            status_pb2.Status(code=record["error_code"] or 2, message=record.get("error_message", ""))
        )
    return operation


def list_artifacts(store, prefix: str, page_size: int, page_token: str) -> tuple[list[tuple[str, dict]], str]:
    """(id, metadata) of the artifacts published under prefix, sorted by id, paginated."""
    size, offset = validation.page(page_size, page_token)
    ids = sorted({key[len(prefix) :].split("/", 1)[0] for key in store.list(prefix) if key.endswith("/" + MANIFEST)})
    chosen = ids[offset : offset + size]
    items = [(artifact_id, open_artifact(store, prefix + artifact_id).metadata) for artifact_id in chosen]
    return items, str(offset + size) if offset + size < len(ids) else ""


def file_chunks(artifact: ArtifactReader, names: list[str], chunk_bytes: int, with_manifest: bool = False):
    """FileChunk messages of an artifact's files (each checked against the manifest as read), and
    then of manifest.json itself if asked, so the receiver can rebuild the artifact as it is."""
    for name in names:
        yield from _chunks(name, artifact.read_bytes(name), chunk_bytes)
    if with_manifest:
        yield from _chunks(MANIFEST, artifact.manifest.to_bytes(), chunk_bytes)


def _chunks(name: str, data: bytes, chunk_bytes: int):
    digest = hashlib.sha256(data).hexdigest()
    for offset in range(0, max(len(data), 1), chunk_bytes):
        first = offset == 0
        yield common_pb2.FileChunk(
            file=name,
            offset=offset,
            data=data[offset : offset + chunk_bytes],
            size=len(data) if first else 0,
            sha256=digest if first else "",
        )


async def in_thread(iterator: Iterator):
    """An async iterator over a blocking iterator, each `next` on a worker thread: a servicer
    streams store reads without stalling the event loop."""
    done = object()
    while (item := await asyncio.to_thread(next, iterator, done)) is not done:
        yield item
