"""GradientService: registered datasets and training-gradient blocks.

Thin: each method validates the request, runs the domain work on a thread (never blocking the
event loop) and converts the result.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from google.protobuf import empty_pb2

from ..engine.index import IndexSpec
from ..engine.model_io import ModelRef
from ..engine.modules import check_selection
from ..engine.records import parse_jsonl_bytes, read_training_jsonl, training_examples
from ..engine.score import ScoreConfig
from ..enums import enum_word
from ..errors import InputError, NotFoundError, PreconditionError, error_for_code
from ..factor_svc.artifacts import factors_artifact
from ..gen.influence.v1 import common_pb2, gradient_service_pb2, gradient_service_pb2_grpc
from ..jobs.operations import CANCELLED, FAILED
from ..options import (
    BATCH_SIZE,
    BLOCK_SIZE,
    DAMPING_FACTOR,
    DIM,
    MAX_LENGTH,
    MODULES,
    PROJECTION,
    RANK,
    SHARD_SIZE,
    STORAGE_DTYPE,
)
from ..rpc import validation
from ..rpc.common import TenantScoped, file_chunks, in_thread, list_artifacts, model_ref, new_id, operation_message
from ..rpc.resources import dataset_message, index_message, packed
from ..rpc.status import code_name, grpc_errors
from ..storage import MANIFEST, delete_artifact, split_s3_uri
from ..storage.manifest import sha256_bytes, sha256_file
from ..system import layout
from ..system.specs import BlocksJob, IndexJob, RegisterJob
from ..wire import dataset_id
from . import indexes
from .datasets import check_dataset_size, dataset_artifact, dataset_metadata

_POLL_SECONDS = 0.05  # how often StreamBlocks looks for the worker's next block


class GradientServicer(TenantScoped, gradient_service_pb2_grpc.GradientServiceServicer):

    @grpc_errors
    async def RegisterDataset(self, request, context):
        return await asyncio.to_thread(self._register, request)

    def _register(self, request):
        model = model_ref(request.model)
        source_uri, upload = "", None
        if request.uri and request.jsonl:
            raise InputError("send the dataset as jsonl or as uri, not both", field="uri")
        if request.uri.startswith("s3://"):
            self.check_caller_locations("uri")  # the system's bucket holds every tenant's data
            bucket, key = split_s3_uri(request.uri, "uri")
            if not self.system.store.in_bucket(bucket).exists(key):
                raise NotFoundError(f"training data not found: {request.uri}")
            source_uri = request.uri  # read (and validated, naming its lines) by the worker, not here
            digest = sha256_bytes(f"{request.uri} {uuid.uuid4()}".encode())  # an object can change: never reused
        elif request.uri:
            upload = self.server_file(request.uri, "uri")
            if not upload.is_file():
                raise NotFoundError(f"training data file not found: {upload}")
            examples = read_training_jsonl(upload)  # validated where it lies: errors name its lines
            check_dataset_size(len(examples), self.limits.max_dataset_sequences, request.uri, "uri")
            digest = sha256_file(upload)[0]
        else:
            if not request.jsonl:
                raise InputError('jsonl is empty: upload at least one {"text": ...} line (or give a uri)')
            size = len(request.jsonl)
            what, advice = f"jsonl is {size} bytes", "register a larger dataset by uri (file:// or s3://)"
            validation.within_limit(size, self.limits.max_upload_bytes, "max_upload_bytes", what, "jsonl", advice)
            examples = training_examples(parse_jsonl_bytes(request.jsonl, "jsonl", "training data"), "jsonl")
            check_dataset_size(len(examples), self.limits.max_dataset_sequences, "jsonl", "jsonl")
            upload = request.jsonl
            digest = sha256_bytes(upload)
        shard_size = validation.positive(request.shard_size, "shard_size", SHARD_SIZE.default, SHARD_SIZE.maximum)
        max_length = validation.positive(request.max_length, "max_length", MAX_LENGTH.default, MAX_LENGTH.maximum)
        job = RegisterJob(
            model,
            dataset_id=dataset_id(digest, model.path, max_length, shard_size),
            display_name=request.display_name,
            shard_size=shard_size,
            max_length=max_length,
            source_uri=source_uri,
            max_dataset_sequences=self.limits.max_dataset_sequences,  # the worker checks an s3:// source
        )
        target = f"datasets/{job.dataset_id}"
        if self.system.store.exists(layout.dataset_prefix(job.dataset_id) + MANIFEST):  # registered before
            metadata = dataset_metadata(self.system.store, job.dataset_id)
            record = self.system.record_done(
                "register_dataset", packed(dataset_message(metadata)), request_id=request.request_id, target=target
            )
            return operation_message(record)
        record = self.system.submit(
            "register_dataset",
            job,
            request_id=request.request_id,
            target=target,
            upload=upload,
        )
        return operation_message(record)

    def _metadata(self, name: str, field: str = "name") -> tuple[str, dict]:
        dataset_id = validation.resource_id(name, "datasets", field)
        return dataset_id, dataset_metadata(self.system.store, dataset_id)

    @grpc_errors
    async def GetDataset(self, request, context):
        return dataset_message((await asyncio.to_thread(self._metadata, request.name))[1])

    @grpc_errors
    async def ListDatasets(self, request, context):
        items, token = await asyncio.to_thread(
            list_artifacts, self.system.store, "datasets/", request.page_size, request.page_token
        )
        return gradient_service_pb2.ListDatasetsResponse(
            datasets=[dataset_message(metadata) for _, metadata in items], next_page_token=token
        )

    @grpc_errors
    async def DeleteDataset(self, request, context):
        dataset_id, _ = await asyncio.to_thread(self._metadata, request.name)
        await asyncio.to_thread(delete_artifact, self.system.store, layout.dataset_prefix(dataset_id))
        return empty_pb2.Empty()

    def _submit_blocks(self, request) -> str:
        dataset_id, dataset = self._metadata(request.dataset, "dataset")
        if not 0 <= request.shard < dataset["num_shards"]:
            raise InputError(f"shard must be in [0, {dataset['num_shards']}), got {request.shard}")
        modules = request.modules or MODULES.default
        check_selection(modules)
        job = BlocksJob(
            model_ref(request.model),
            dataset_id=dataset_id,
            shard=request.shard,
            modules=modules,
            block_size=validation.positive(request.block_size, "block_size", BLOCK_SIZE.default, BLOCK_SIZE.maximum),
        )
        return self.system.submit("stream_blocks", job, target=f"{request.dataset}/shards/{request.shard}")["id"]

    def _next_block(self, job: str, sent: int, total: int | None) -> tuple[object | None, int | None]:
        """(block `sent` if written, else None; the block count once known). Raises the job's
        error when it failed."""
        store = self.system.store
        if store.exists(layout.job_block(job, sent)):
            return gradient_service_pb2.GradientBlock.FromString(store.get_bytes(layout.job_block(job, sent))), total
        if total is None and store.exists(layout.job_block_count(job)):
            return None, json.loads(store.get_bytes(layout.job_block_count(job)))["blocks"]
        record = self.system.operations.get(job)
        if record["state"] in (FAILED, CANCELLED):
            message = record.get("error_message") or "the blocks job failed"
            raise error_for_code(code_name(record["error_code"]), message)
        return None, total

    @grpc_errors
    async def StreamBlocks(self, request, context):
        """Submits a one-task blocks job (a worker computes, see blocks.py) and streams the blocks
        as the worker writes them. A consumer that goes away cancels the job."""
        job = await asyncio.to_thread(self._submit_blocks, request)
        sent, total = 0, None
        try:
            while total is None or sent < total:
                block, total = await asyncio.to_thread(self._next_block, job, sent, total)
                if block is not None:
                    yield block
                    sent += 1
                elif total is None or sent < total:
                    await asyncio.sleep(_POLL_SECONDS)
        finally:
            if total is None or sent < total:  # the consumer went away or the job failed
                await asyncio.to_thread(self.system.operations.cancel, job)
            else:
                await asyncio.to_thread(self.system.store.delete_prefix, layout.job_prefix(job))

    # -- the index ---------------------------------------------------------------------------

    @grpc_errors
    async def BuildIndex(self, request, context):
        return await asyncio.to_thread(self._build_index, request)

    def _index_config(self, request, dataset: dict) -> ScoreConfig:
        if request.HasField("damping_factor") and request.damping_factor < 0:
            raise InputError(f"damping_factor must be >= 0, got {request.damping_factor}")
        config = ScoreConfig(
            damping_factor=request.damping_factor if request.HasField("damping_factor") else DAMPING_FACTOR.default,
            damping=request.damping if request.HasField("damping") else None,
            batch_size=validation.positive(request.batch_size, "batch_size", BATCH_SIZE.default, BATCH_SIZE.maximum),
            max_length=dataset["max_length"],
        )
        config.validate()
        return config

    def _build_index(self, request):
        model = model_ref(request.model)
        factor_set_id = validation.resource_id(request.factor_set, "factorSets", "factor_set")
        factors_artifact(self.system.store, factor_set_id)
        dataset_id, dataset = self._metadata(request.dataset, "dataset")
        spec = IndexSpec(
            projection=(
                enum_word(gradient_service_pb2.Projection, request.projection, "projection") or PROJECTION.default
            ),
            rank=validation.positive(request.rank, "rank", RANK.default, RANK.maximum),
            dim=validation.positive(request.dim, "dim", DIM.default, DIM.maximum),
            seed=request.seed,
            storage_dtype=enum_word(common_pb2.Dtype, request.storage_dtype, "storage_dtype") or STORAGE_DTYPE.default,
        )
        spec.validate()
        job = IndexJob(
            model,
            dataset_id=dataset_id,
            shards=dataset["num_shards"],
            factor_set_id=factor_set_id,
            index_id=new_id(),
            spec=spec,
            config=self._index_config(request, dataset),
        )
        record = self.system.submit("build_index", job, request_id=request.request_id, target=f"indexes/{job.index_id}")
        return operation_message(record)

    @grpc_errors
    async def AppendIndex(self, request, context):
        return await asyncio.to_thread(self._append_index, request)

    def _append_index(self, request):
        index_id = validation.resource_id(request.index, "indexes", "index")
        index = indexes.index_artifact(self.system.store, index_id).metadata
        dataset_id, dataset = self._metadata(request.dataset, "dataset")
        if dataset["tokenizer_fingerprint"] != index["tokenizer_fingerprint"]:
            raise PreconditionError(f"{request.dataset} was tokenised with another tokenizer than the index's model's")
        if any(part["dataset"] == f"datasets/{dataset_id}" for part in index["parts"]):
            raise PreconditionError(f"{request.dataset} is already in {request.index}")
        repeated = indexes.existing_ids(self.system.store, {"parts": [{"dataset": f"datasets/{dataset_id}"}]})
        repeated &= indexes.existing_ids(self.system.store, index)
        if repeated:
            raise PreconditionError(
                f"{len(repeated)} ids of {request.dataset} are in the index already, e.g. {sorted(repeated)[0]!r}"
            )
        config = ScoreConfig(
            damping_factor=index["damping"]["factor"],
            damping=index["damping"]["absolute"],
            batch_size=validation.positive(request.batch_size, "batch_size", BATCH_SIZE.default, BATCH_SIZE.maximum),
            max_length=dataset["max_length"],
        )
        job = IndexJob(
            ModelRef(index["model_path"]),
            dataset_id=dataset_id,
            shards=dataset["num_shards"],
            factor_set_id=index["factor_set"].removeprefix("factorSets/"),
            index_id=index_id,
            spec=IndexSpec(**index["spec"]),
            config=config,
            part=len(index["parts"]),
            start=index["num_examples"],
            base=index,
        )
        record = self.system.submit("append_index", job, request_id=request.request_id, target=request.index)
        return operation_message(record)

    @grpc_errors
    async def GetIndex(self, request, context):
        index_id = validation.resource_id(request.name, "indexes", "name")
        return index_message((await asyncio.to_thread(indexes.index_artifact, self.system.store, index_id)).metadata)

    @grpc_errors
    async def ListIndexes(self, request, context):
        items, token = await asyncio.to_thread(
            list_artifacts, self.system.store, "indexes/", request.page_size, request.page_token
        )
        return gradient_service_pb2.ListIndexesResponse(
            indexes=[index_message(metadata) for _, metadata in items], next_page_token=token
        )

    @grpc_errors
    async def DeleteIndex(self, request, context):
        index_id = validation.resource_id(request.name, "indexes", "name")
        await asyncio.to_thread(indexes.index_artifact, self.system.store, index_id)
        await asyncio.to_thread(delete_artifact, self.system.store, layout.index_prefix(index_id))
        return empty_pb2.Empty()

    @grpc_errors
    async def StreamIndexFiles(self, request, context):
        index_id = validation.resource_id(request.name, "indexes", "name")
        artifact = await asyncio.to_thread(indexes.index_artifact, self.system.store, index_id)
        chunks = file_chunks(artifact, artifact.names(), request, self.limits, with_manifest=True)
        async for message in in_thread(chunks):
            yield message

    @grpc_errors
    async def StreamDatasetFiles(self, request, context):
        dataset_id = validation.resource_id(request.name, "datasets", "name")
        artifact = await asyncio.to_thread(dataset_artifact, self.system.store, dataset_id)
        chunks = file_chunks(artifact, artifact.names(), request, self.limits, with_manifest=True)
        async for message in in_thread(chunks):
            yield message

    @grpc_errors
    async def RegisterIndex(self, request, context):
        path = self.server_file(request.uri, "uri")
        metadata = await asyncio.to_thread(indexes.link, self.system.store, path)
        return index_message(metadata)
