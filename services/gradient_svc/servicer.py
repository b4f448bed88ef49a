"""GradientService: registered datasets and training-gradient blocks.

Thin: each method validates the request, runs the domain work on a thread (never blocking the
event loop) and converts the result.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import uuid
from pathlib import Path

from ..catalog import datasets, indexes
from ..catalog.datasets import DATASETS, DatasetInfo, dataset_path
from ..catalog.factor_sets import FACTOR_SETS
from ..catalog.indexes import INDEXES, index_path
from ..engine.corpora import CorpusSpec, is_jsonl_name
from ..engine.index import IndexSpec
from ..engine.model_io import ModelRef
from ..engine.modules import check_selection
from ..engine.records import file_lines
from ..engine.score import ScoreConfig
from ..enums import enum_word
from ..errors import InputError, NotFoundError, PreconditionError, error_for_code
from ..gen.influence.v1 import common_pb2, gradient_service_pb2, gradient_service_pb2_grpc
from ..jobs.operations import CANCELLED, FAILED
from ..options import (
    BATCH_SIZE,
    BLOCK_SIZE,
    DAMPING_FACTOR,
    DIM,
    ENERGY,
    MAX_LENGTH,
    MODULES,
    PROJECTION,
    RANK,
    SHARD_SIZE,
    STORAGE_DTYPE,
)
from ..rpc import validation
from ..rpc.common import TenantScoped, model_ref, new_id, operation_message
from ..rpc.messages import packed
from ..rpc.status import code_name, grpc_errors
from ..storage import split_s3_uri
from ..storage.manifest import sha256_bytes, sha256_file
from ..system import layout
from ..wire import dataset_id
from .jobs import BlocksJob, IndexJob, RegisterJob, check_dataset_size, count_training_data
from .messages import dataset_message, index_message

_POLL_SECONDS = 0.05  # how often StreamBlocks looks for the worker's next block


def _upload_settings(message) -> gradient_service_pb2.RegisterDatasetRequest:
    """The settings an UploadDataset stream's first message carries (its bytes come after)."""
    if message.WhichOneof("part") != "request":
        raise InputError("an upload starts with a message holding `request` (the settings)", field="request")
    if message.request.jsonl or message.request.uri:
        message = "an upload's `request` leaves jsonl and uri empty: the bytes follow as `data`"
        raise InputError(message, field="request")
    return message.request


def _corpus(request) -> CorpusSpec | None:
    """The request's corpus settings, checked (None: TRAIN.jsonl)."""
    if not request.HasField("corpus"):
        return None
    corpus = request.corpus
    return CorpusSpec(
        text_field=corpus.text_field or CorpusSpec.text_field,
        messages_field=corpus.messages_field or CorpusSpec.messages_field,
        sequence_length=corpus.sequence_length,
        token_dtype=enum_word(gradient_service_pb2.TokenType, corpus.token_type, "corpus.token_type")
        or CorpusSpec.token_dtype,
    ).validate()


class GradientServicer(TenantScoped, gradient_service_pb2_grpc.GradientServiceServicer):

    @grpc_errors
    async def RegisterDataset(self, request, context):
        return await asyncio.to_thread(self._register, request)

    @grpc_errors
    async def UploadDataset(self, request_iterator, context):
        """The settings, then the JSONL's bytes: spooled to a temporary file as they come (memory
        holds one message), refused as soon as they pass the upload limit, then registered as
        RegisterDataset registers its `jsonl`."""
        with tempfile.TemporaryDirectory(prefix="dataset-upload-") as directory:
            spool, settings, size = Path(directory) / "train.jsonl", None, 0
            with spool.open("wb") as handle:
                async for message in request_iterator:
                    if settings is None:
                        settings = _upload_settings(message)
                        continue
                    if message.WhichOneof("part") != "data":
                        raise InputError("an upload sends `request` once, first, then only `data`", field="request")
                    size += len(message.data)
                    self._check_upload_size(size, f"the upload is {size} bytes so far", "data")
                    await asyncio.to_thread(handle.write, message.data)
            if settings is None:
                raise InputError("an upload starts with a message holding `request` (the settings)", field="request")
            return await asyncio.to_thread(self._register, settings, spool)

    def _check_upload_size(self, size: int, what: str, field: str) -> None:
        advice = "register a larger dataset by uri (file:// or s3://)"
        validation.within_limit(size, self.limits.max_upload_bytes, "max_upload_bytes", what, field, advice)

    def _register(self, request, uploaded: Path | None = None):
        """RegisterDataset's work: the JSONL in `request.jsonl` or `uploaded` (a spooled file), or
        at `request.uri`; every source is read line by line (memory holds one line)."""
        model = model_ref(request.model)
        source_uri, upload = "", None
        if request.uri and request.jsonl:
            raise InputError("send the dataset as jsonl or as uri, not both", field="uri")
        corpus = _corpus(request)
        if request.uri.startswith("s3://"):
            self.check_caller_locations("uri")  # the system's bucket holds every tenant's data
            if corpus is None and not is_jsonl_name(request.uri):
                corpus = CorpusSpec()  # a Parquet object or a prefix, read by its default columns
            bucket, key = split_s3_uri(request.uri, "uri", prefix=corpus is not None)
            bucket_store = self.system.store.in_bucket(bucket)
            if not (bucket_store.list(key) if key.endswith("/") else bucket_store.exists(key)):
                raise NotFoundError(f"training data not found: {request.uri}")
            source_uri = request.uri  # read (and validated, naming its lines) by the worker, not here
            digest = sha256_bytes(f"{request.uri} {uuid.uuid4()}".encode())  # an object can change: never reused
        elif corpus is not None or (request.uri and not is_jsonl_name(request.uri)):
            message = "a corpus is read from s3:// (a local one is sent as its TRAIN.jsonl lines: `influence fit` does)"
            raise InputError(message, field="corpus")
        elif request.uri or uploaded is not None:
            if uploaded is None:
                upload = self.server_file(request.uri, "uri")
                if not upload.is_file():
                    raise NotFoundError(f"training data file not found: {upload}")
                source, field = request.uri, "uri"
            else:
                upload, source, field = uploaded, "uploaded dataset", "data"
            # validated where it lies, line by line: errors name its lines
            sequences = count_training_data(lambda: file_lines(upload, source), source)
            check_dataset_size(sequences, self.limits.max_dataset_sequences, source, field)
            digest = sha256_file(upload)[0]
        else:
            if not request.jsonl:
                raise InputError('jsonl is empty: upload at least one {"text": ...} line (or give a uri)')
            size = len(request.jsonl)
            self._check_upload_size(size, f"jsonl is {size} bytes", "jsonl")
            sequences = count_training_data(lambda: request.jsonl.split(b"\n"), "jsonl")
            check_dataset_size(sequences, self.limits.max_dataset_sequences, "jsonl", "jsonl")
            upload = request.jsonl
            digest = sha256_bytes(upload)
        shard_size = validation.positive(request.shard_size, "shard_size", SHARD_SIZE.default, SHARD_SIZE.maximum)
        max_length = validation.positive(request.max_length, "max_length", MAX_LENGTH.default, MAX_LENGTH.maximum)
        job = RegisterJob(
            model,
            dataset_id=dataset_id(digest, model.path, max_length, shard_size, model.base),
            display_name=request.display_name,
            shard_size=shard_size,
            max_length=max_length,
            source_uri=source_uri,
            max_dataset_sequences=self.limits.max_dataset_sequences,  # the worker checks an s3:// source
            corpus=corpus,
        )
        target = dataset_path(job.dataset_id)
        if DATASETS.exists(self.system.store, job.dataset_id):  # registered before
            dataset = DATASETS.read(self.system.store, job.dataset_id)
            record = self.system.record_done(
                "register_dataset", packed(dataset_message(dataset)), request_id=request.request_id, target=target
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

    def _dataset(self, name: str, field: str) -> DatasetInfo:
        return DATASETS.read(self.system.store, DATASETS.parse(name, field))

    @grpc_errors
    async def GetDataset(self, request, context):
        return dataset_message(await self.get_resource(DATASETS, request.name))

    @grpc_errors
    async def ListDatasets(self, request, context):
        infos, token = await self.list_resources(DATASETS, request)
        return gradient_service_pb2.ListDatasetsResponse(
            datasets=[dataset_message(info) for info in infos], next_page_token=token
        )

    @grpc_errors
    async def DeleteDataset(self, request, context):
        return await self.delete_resource(DATASETS, request.name)

    @grpc_errors
    async def StreamDatasetFiles(self, request, context):
        async for message in self.stream_files(DATASETS, request, with_manifest=True):
            yield message

    def _submit_blocks(self, request) -> str:
        dataset = self._dataset(request.dataset, "dataset")
        if not 0 <= request.shard < dataset.num_shards:
            raise InputError(f"shard must be in [0, {dataset.num_shards}), got {request.shard}")
        modules = request.modules or MODULES.default
        check_selection(modules)
        job = BlocksJob(
            model_ref(request.model),
            dataset_id=dataset.id,
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

    def _index_config(self, request, dataset: DatasetInfo) -> ScoreConfig:
        if request.HasField("damping_factor") and request.damping_factor < 0:
            raise InputError(f"damping_factor must be >= 0, got {request.damping_factor}")
        config = ScoreConfig(
            damping_factor=request.damping_factor if request.HasField("damping_factor") else DAMPING_FACTOR.default,
            damping=request.damping if request.HasField("damping") else None,
            batch_size=validation.positive(request.batch_size, "batch_size", BATCH_SIZE.default, BATCH_SIZE.maximum),
            max_length=dataset.max_length,
        )
        config.validate()
        return config

    def _build_index(self, request):
        model = model_ref(request.model)
        factor_set_id = FACTOR_SETS.parse(request.factor_set, "factor_set")
        FACTOR_SETS.open(self.system.store, factor_set_id)
        dataset = self._dataset(request.dataset, "dataset")
        spec = IndexSpec(
            projection=(
                enum_word(gradient_service_pb2.Projection, request.projection, "projection") or PROJECTION.default
            ),
            rank=validation.positive(request.rank, "rank", RANK.default, RANK.maximum),
            dim=validation.positive(request.dim, "dim", DIM.default, DIM.maximum),
            seed=request.seed,
            storage_dtype=enum_word(common_pb2.Dtype, request.storage_dtype, "storage_dtype") or STORAGE_DTYPE.default,
            energy=request.energy or ENERGY.default,
            budget=request.budget,
        )
        spec.validate()
        job = IndexJob(
            model,
            dataset_id=dataset.id,
            shards=dataset.num_shards,
            factor_set_id=factor_set_id,
            index_id=new_id(),
            spec=spec,
            config=self._index_config(request, dataset),
        )
        record = self.system.submit("build_index", job, request_id=request.request_id, target=index_path(job.index_id))
        return operation_message(record)

    @grpc_errors
    async def AppendIndex(self, request, context):
        return await asyncio.to_thread(self._append_index, request)

    def _append_index(self, request):
        index = INDEXES.read(self.system.store, INDEXES.parse(request.index, "index"))
        dataset = self._dataset(request.dataset, "dataset")
        if dataset.tokenizer_fingerprint != index.tokenizer_fingerprint:
            raise PreconditionError(f"{request.dataset} was tokenised with another tokenizer than the index's model's")
        if dataset.id in index.dataset_ids:
            raise PreconditionError(f"{request.dataset} is already in {request.index}")
        repeated = datasets.example_ids(self.system.store, dataset.id) & indexes.example_ids(self.system.store, index)
        if repeated:
            raise PreconditionError(
                f"{len(repeated)} ids of {request.dataset} are in the index already, e.g. {sorted(repeated)[0]!r}"
            )
        config = ScoreConfig(
            damping_factor=index.damping.factor,
            damping=index.damping.absolute,
            batch_size=validation.positive(request.batch_size, "batch_size", BATCH_SIZE.default, BATCH_SIZE.maximum),
            max_length=dataset.max_length,
        )
        job = IndexJob(
            ModelRef(index.model_path),
            dataset_id=dataset.id,
            shards=dataset.num_shards,
            factor_set_id=index.factor_set_id,
            index_id=index.id,
            spec=index.spec,
            config=config,
            part=len(index.parts),
            start=index.num_examples,
            base=index.to_metadata(),
        )
        record = self.system.submit("append_index", job, request_id=request.request_id, target=request.index)
        return operation_message(record)

    @grpc_errors
    async def GetIndex(self, request, context):
        return index_message(await self.get_resource(INDEXES, request.name))

    @grpc_errors
    async def ListIndexes(self, request, context):
        infos, token = await self.list_resources(INDEXES, request)
        return gradient_service_pb2.ListIndexesResponse(
            indexes=[index_message(info) for info in infos], next_page_token=token
        )

    @grpc_errors
    async def DeleteIndex(self, request, context):
        return await self.delete_resource(INDEXES, request.name)

    @grpc_errors
    async def StreamIndexFiles(self, request, context):
        async for message in self.stream_files(INDEXES, request, with_manifest=True):
            yield message

    @grpc_errors
    async def RegisterIndex(self, request, context):
        path = self.server_file(request.uri, "uri")
        return index_message(await asyncio.to_thread(indexes.link, self.system.store, path))
