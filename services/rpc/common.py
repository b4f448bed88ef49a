"""What the three servicers share: request limits, operation messages, the Get/List/Delete/Stream
of a catalog collection's resources, and chunked files.

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
from google.protobuf import any_pb2, empty_pb2
from google.rpc import status_pb2

from ..engine.model_io import DTYPES as MODEL_DTYPES
from ..engine.model_io import ModelRef
from ..enums import enum_word
from ..errors import InputError
from ..gen.influence.v1 import common_pb2
from ..jobs.operations import CANCELLED, FAILED, SUCCEEDED, TERMINAL
from ..storage import MANIFEST, ArtifactReader
from ..wire import CHUNK_BYTES, MIN_MESSAGE_BYTES, REQUEST_LIMITS
from . import paging, validation
from .auth import current_tenant
from .messages import timestamp


@dataclass
class Limits:
    """What one request may ask of this server. The max_* fields are wire.REQUEST_LIMITS (set by
    `influence serve --max-...`; 0: no limit), each checked with validation.within_limit."""

    max_message_bytes: int = REQUEST_LIMITS["max_message_bytes"].default
    max_streams_per_tenant: int = REQUEST_LIMITS["max_streams_per_tenant"].default
    max_unauthenticated_streams: int = REQUEST_LIMITS["max_unauthenticated_streams"].default
    max_upload_bytes: int = REQUEST_LIMITS["max_upload_bytes"].default
    max_queries: int = REQUEST_LIMITS["max_queries"].default
    max_query_chars: int = REQUEST_LIMITS["max_query_chars"].default
    max_top_k: int = REQUEST_LIMITS["max_top_k"].default
    max_dataset_sequences: int = REQUEST_LIMITS["max_dataset_sequences"].default
    chunk_bytes: int = CHUNK_BYTES
    # whether callers may name files on the server (file:// uris: register in place, by path).
    # Off on a server with tokens: a tenant must not read the server's filesystem.
    server_paths: bool = True

    def __post_init__(self):
        for name, limit in REQUEST_LIMITS.items():
            if getattr(self, name) < 0:
                raise InputError(f"{limit.flag} must be >= 0 (0: no limit), got {getattr(self, name)}")
        if 0 < self.max_message_bytes < MIN_MESSAGE_BYTES:
            flag = REQUEST_LIMITS["max_message_bytes"].flag
            raise InputError(f"{flag} must be 0 (no limit) or >= {MIN_MESSAGE_BYTES} (one upload chunk must fit)")


class TenantScoped:
    """Base of the servicers: `self.system` is the calling tenant's view of the job system
    (JobSystem.for_tenant: its part of the store, its operations), so every request is served
    from the caller's own namespace and another tenant's resources simply do not exist there."""

    def __init__(self, system, limits: Limits):
        self.shared_system, self.limits = system, limits

    @property
    def system(self):
        return self.shared_system.for_tenant(current_tenant())

    def check_caller_locations(self, field: str) -> None:
        """InputError unless this server lets callers name what it reads (its files, the buckets
        its credentials reach): off when tenants share it."""
        if not self.limits.server_paths:
            raise InputError(
                f"{field}: this server does not read its own files or buckets for callers (it authenticates "
                "tenants); upload the content instead",
                field=field,
            )

    def server_file(self, uri: str, field: str) -> Path:
        """The server path a file:// `uri` names, if this server lets callers name its files."""
        self.check_caller_locations(field)
        return validation.file_uri(uri, field)

    # The resources of a catalog collection (services/catalog/collection.py: parse, open, list,
    # delete), each call's store work on a thread.

    async def open_resource(self, collection, name: str, field: str = "name"):
        """The caller's published resource `name` (InputError naming `field` if it is not a name of
        the collection; NotFoundError if absent): its id, info and file reader."""
        return await asyncio.to_thread(collection.open, self.system.store, collection.parse(name, field))

    async def get_resource(self, collection, name: str):
        """The info of the caller's resource `name`."""
        return (await self.open_resource(collection, name)).info

    async def list_resources(self, collection, request) -> tuple[list, str]:
        """A page of the caller's resources (request: page_size, page_token) and the next page's
        token ("" on the last page, never a page early); tokens are scoped to the collection."""
        size = paging.page_size(request.page_size)
        after = paging.read_token(request.page_token, collection.root) or ""
        infos, more = await asyncio.to_thread(collection.list, self.system.store, after, size)
        return infos, paging.make_token(collection.root, infos[-1].id) if more else ""

    async def delete_resource(self, collection, name: str) -> empty_pb2.Empty:
        """Delete the caller's resource `name` (NotFoundError if absent)."""
        await asyncio.to_thread(collection.delete, self.system.store, collection.parse(name, "name"))
        return empty_pb2.Empty()

    async def stream_files(self, collection, request, *, with_manifest: bool = False, files=None):
        """FileChunks of the resource `request.name`: `files(info)` (default: all of them), then
        manifest.json if asked (see file_chunks)."""
        resource = await self.open_resource(collection, request.name)
        names = files(resource.info) if files is not None else resource.reader.names()
        async for chunk in in_thread(file_chunks(resource.reader, names, request, self.limits, with_manifest)):
            yield chunk


def model_ref(spec: common_pb2.ModelSpec) -> ModelRef:
    """The job's model: device "" (unspecified) is the device of the worker that runs each task."""
    dtype = enum_word(common_pb2.Dtype, spec.dtype, "model.dtype") or "float32"
    if dtype not in MODEL_DTYPES:
        raise InputError(f"model.dtype must be one of {', '.join(MODEL_DTYPES)}, got {dtype}")
    return ModelRef(
        validation.model_path(spec),
        enum_word(common_pb2.Device, spec.device, "model.device"),
        dtype,
        validation.model_directory(spec.base_model, "model.base_model") if spec.base_model else "",
    )


def new_id() -> str:
    return uuid.uuid4().hex[:20]


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
        create_time=timestamp(record["create_time"]),
        update_time=timestamp(record["update_time"]),
        target=record["metadata"].get("target", ""),
        step=record.get("step", ""),
        step_done=record.get("step_done", 0),
        step_total=record.get("step_total", 0),
        step_unit=record.get("step_unit", ""),
        steps=[common_pb2.StepProgress(**step) for step in record.get("steps", [])],
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


def file_chunks(
    artifact: ArtifactReader,
    names: list[str],
    request,
    limits: Limits,
    with_manifest: bool = False,
):
    """FileChunk messages of an artifact's files (each checked against the manifest as read), and
    then of manifest.json itself if asked, so the receiver can rebuild the artifact as it is.
    `request` (a StreamArtifactFilesRequest or StreamFactorsRequest) gives chunk_bytes and where a
    resumed download starts: resume_file at resume_offset (earlier files are skipped)."""
    chunk_bytes = validation.positive(request.chunk_bytes, "chunk_bytes", limits.chunk_bytes, 64 * 2**20)
    order = [*names, MANIFEST] if with_manifest else list(names)
    start, offset = 0, 0
    if request.resume_file:
        if request.resume_file not in order:
            message = f"resume_file {request.resume_file!r} is not a file of {artifact.prefix}"
            raise InputError(message, field="resume_file")
        start, offset = order.index(request.resume_file), request.resume_offset
    for number, name in enumerate(order[start:]):
        data = artifact.manifest.to_bytes() if name == MANIFEST else artifact.read_bytes(name)
        first_offset = offset if number == 0 else 0
        if not 0 <= first_offset <= len(data):
            message = f"resume_offset {first_offset} is outside {name} ({len(data)} bytes)"
            raise InputError(message, field="resume_offset")
        yield from _chunks(name, data, chunk_bytes, first_offset)


def _chunks(name: str, data: bytes, chunk_bytes: int, start: int = 0):
    """The file from byte `start`; its first chunk sent carries the whole file's size and sha256."""
    digest = hashlib.sha256(data).hexdigest()
    for offset in range(start, max(len(data), start + 1), chunk_bytes):
        first = offset == start
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
