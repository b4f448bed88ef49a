"""The three services and the Operations service. Thin: validate, call the job system, convert.

Long work (registering, fitting, scoring) returns an Operation at once; the tasks run on
workers (services/system). Errors are mapped to status codes by `grpc_errors` (rpc/status.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass

from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.rpc import status_pb2

from ..engine.data import parse_jsonl, query_records, training_examples
from ..engine.errors import NotFoundError, PreconditionError
from ..engine.factor_io import from_artifact
from ..engine.fit import FitConfig
from ..engine.model_io import load_tokenizer, tokenizer_fingerprint
from ..engine.precondition import Damping
from ..engine.score import ScoreConfig
from ..gen.influence.v1 import (
    common_pb2,
    factor_service_pb2,
    factor_service_pb2_grpc,
    gradient_service_pb2,
    gradient_service_pb2_grpc,
    query_service_pb2,
    query_service_pb2_grpc,
)
from ..jobs.operations import CANCELLED, FAILED, SUCCEEDED, TERMINAL
from ..system import layout
from ..system.runner import JobSystem
from ..system.specs import JobSpec, ModelRef
from ..system.stages import dataset_manifest, read_manifest
from . import validation
from .resources import dataset_message, factor_set_message, result_message
from .status import RequestError, grpc_errors


@dataclass
class Limits:
    max_upload_bytes: int = 256 * 2**20
    max_queries: int = 4096
    max_query_chars: int = 100_000
    chunk_bytes: int = 1 * 2**20


def _model_ref(spec: common_pb2.ModelSpec) -> ModelRef:
    return ModelRef(validation.model_path(spec), spec.device or "cpu", spec.dtype or "float32")


def _new_id() -> str:
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


def _listed(store, prefix: str, page_size: int, page_token: str) -> tuple[list[tuple[str, dict]], str]:
    """(id, manifest) of published artifacts under prefix, sorted by id, paginated."""
    size, offset = validation.page(page_size, page_token)
    ids = sorted(
        {key[len(prefix) :].split("/", 1)[0] for key in store.list(prefix) if key.endswith("/" + layout.MANIFEST)}
    )
    chosen = ids[offset : offset + size]
    items = [
        (artifact_id, json.loads(store.get_bytes(f"{prefix}{artifact_id}/{layout.MANIFEST}"))) for artifact_id in chosen
    ]
    return items, str(offset + size) if offset + size < len(ids) else ""


def _chunks(store, prefix: str, files: list[str], chunk_bytes: int):
    for name in files:
        data = store.get_bytes(prefix + name)
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


class GradientServicer(gradient_service_pb2_grpc.GradientServiceServicer):
    def __init__(self, system: JobSystem, limits: Limits):
        self.system, self.limits = system, limits

    @grpc_errors
    async def RegisterDataset(self, request, context):
        model = _model_ref(request.model)
        if not request.jsonl:
            raise RequestError('jsonl is empty: upload at least one {"text": ...} line')
        if len(request.jsonl) > self.limits.max_upload_bytes:
            raise RequestError(f"jsonl is {len(request.jsonl)} bytes; the limit is {self.limits.max_upload_bytes}")
        try:
            text = request.jsonl.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("jsonl is not UTF-8 text") from None
        training_examples(parse_jsonl(text.splitlines(), "jsonl", "training data"), "jsonl")
        spec = JobSpec(
            "register",
            model,
            dataset_id=_new_id(),
            display_name=request.display_name,
            shard_size=validation.positive(request.shard_size, "shard_size", 256, 1_000_000),
            max_length=validation.positive(request.max_length, "max_length", 512, 1_000_000),
        )
        record = self.system.submit(
            "register_dataset",
            spec,
            request_id=request.request_id,
            target=f"datasets/{spec.dataset_id}",
            upload=request.jsonl,
        )
        return operation_message(record)

    @grpc_errors
    async def GetDataset(self, request, context):
        return dataset_message(
            dataset_manifest(self.system.store, validation.resource_id(request.name, "datasets", "name"))
        )

    @grpc_errors
    async def ListDatasets(self, request, context):
        items, token = _listed(self.system.store, "datasets/", request.page_size, request.page_token)
        return gradient_service_pb2.ListDatasetsResponse(
            datasets=[dataset_message(manifest) for _, manifest in items], next_page_token=token
        )

    @grpc_errors
    async def DeleteDataset(self, request, context):
        dataset_id = validation.resource_id(request.name, "datasets", "name")
        dataset_manifest(self.system.store, dataset_id)
        self.system.store.delete(layout.dataset_prefix(dataset_id) + layout.MANIFEST)  # unpublish first
        self.system.store.delete_prefix(layout.dataset_prefix(dataset_id))
        return empty_pb2.Empty()

    @grpc_errors
    async def StreamBlocks(self, request, context):
        from ..system.blocks import gradient_blocks

        dataset_id = validation.resource_id(request.dataset, "datasets", "dataset")
        manifest = dataset_manifest(self.system.store, dataset_id)
        if not 0 <= request.shard < manifest["num_shards"]:
            raise RequestError(f"shard must be in [0, {manifest['num_shards']}), got {request.shard}")
        model = _model_ref(request.model)
        blocks = gradient_blocks(
            self.system.store,
            dataset_id,
            request.shard,
            model,
            request.modules or "mlp",
            validation.positive(request.block_size, "block_size", 8, 1024),
        )
        loop = asyncio.get_running_loop()
        while True:
            block = await loop.run_in_executor(None, next, blocks, None)
            if block is None:
                return
            yield block


class FactorServicer(factor_service_pb2_grpc.FactorServiceServicer):
    def __init__(self, system: JobSystem, limits: Limits):
        self.system, self.limits = system, limits

    @grpc_errors
    async def FitFactors(self, request, context):
        model = _model_ref(request.model)
        dataset_id = validation.resource_id(request.dataset, "datasets", "dataset")
        manifest = dataset_manifest(self.system.store, dataset_id)
        if tokenizer_fingerprint(load_tokenizer(model.path)) != manifest["tokenizer_fingerprint"]:
            raise PreconditionError(f"{request.dataset} was tokenised with another tokenizer than {model.path}'s")
        config = FitConfig(
            strategy=request.strategy or "ekfac",
            fisher=request.fisher or "sampled",
            modules=request.modules or "mlp",
            batch_size=validation.positive(request.batch_size, "batch_size", 8, 65536),
            max_length=manifest["max_length"],
            max_examples=request.max_examples or None,
            seed=request.seed,
        )
        config.validate()
        limit = min(manifest["num_examples"], config.max_examples or manifest["num_examples"])
        spec = JobSpec(
            "fit",
            model,
            dataset_id=dataset_id,
            num_shards=-(-limit // manifest["shard_size"]),
            config=asdict(config),
            factor_set_id=_new_id(),
        )
        record = self.system.submit(
            "fit_factors", spec, request_id=request.request_id, target=f"factorSets/{spec.factor_set_id}"
        )
        return operation_message(record)

    def _manifest(self, name: str) -> tuple[str, dict]:
        factor_set_id = validation.resource_id(name, "factorSets", "name")
        return factor_set_id, read_manifest(
            self.system.store, layout.factors_prefix(factor_set_id), f"factor set '{name}'"
        )

    @grpc_errors
    async def GetFactorSet(self, request, context):
        return factor_set_message(*self._manifest(request.name))

    @grpc_errors
    async def ListFactorSets(self, request, context):
        items, token = _listed(self.system.store, "factors/", request.page_size, request.page_token)
        return factor_service_pb2.ListFactorSetsResponse(
            factor_sets=[factor_set_message(i, m) for i, m in items], next_page_token=token
        )

    @grpc_errors
    async def DeleteFactorSet(self, request, context):
        factor_set_id, _ = self._manifest(request.name)
        self.system.store.delete(layout.factors_prefix(factor_set_id) + layout.MANIFEST)
        self.system.store.delete_prefix(layout.factors_prefix(factor_set_id))
        return empty_pb2.Empty()

    @grpc_errors
    async def StreamFactors(self, request, context):
        factor_set_id, manifest = self._manifest(request.name)
        modules = list(request.modules) or list(manifest["modules"])
        unknown = [name for name in modules if name not in manifest["modules"]]
        if unknown:
            raise NotFoundError(f"factor set has no module {unknown[0]!r}")
        files = [manifest["modules"][name]["file"] for name in modules] + [layout.MANIFEST]
        chunk = validation.positive(request.chunk_bytes, "chunk_bytes", self.limits.chunk_bytes, 64 * 2**20)
        for message in _chunks(self.system.store, layout.factors_prefix(factor_set_id), files, chunk):
            yield message

    @grpc_errors
    async def ImportFactors(self, request_iterator, context):
        files: dict[str, bytearray] = {}
        total = 0
        async for chunk in request_iterator:
            total += len(chunk.data)
            if total > self.limits.max_upload_bytes:
                raise RequestError(f"factor upload exceeds {self.limits.max_upload_bytes} bytes")
            files.setdefault(chunk.file, bytearray()).extend(chunk.data)
        if layout.MANIFEST not in files:
            raise RequestError("factor upload has no manifest.json")
        try:
            manifest = json.loads(bytes(files[layout.MANIFEST]))
        except json.JSONDecodeError:
            raise RequestError("manifest.json is not valid JSON") from None

        def read_file(name: str) -> bytes:
            if name not in files:
                raise RequestError(f"factor upload is missing {name}")
            return bytes(files[name])

        from_artifact(manifest, read_file)  # validates format and every sha256
        factor_set_id = hashlib.sha256(bytes(files[layout.MANIFEST])).hexdigest()[:20]
        prefix = layout.factors_prefix(factor_set_id)
        for name in manifest["files"]:
            self.system.store.put_bytes(prefix + name, bytes(files[name]))
        self.system.store.put_bytes(prefix + layout.MANIFEST, bytes(files[layout.MANIFEST]))
        return factor_set_message(factor_set_id, manifest)


class QueryServicer(query_service_pb2_grpc.QueryServiceServicer):
    def __init__(self, system: JobSystem, limits: Limits):
        self.system, self.limits = system, limits

    def _inputs(self, request) -> tuple[ModelRef, str, str, dict]:
        model = _model_ref(request.model)
        factor_set_id = validation.resource_id(request.factor_set, "factorSets", "factor_set")
        dataset_id = validation.resource_id(request.dataset, "datasets", "dataset")
        factors = read_manifest(
            self.system.store, layout.factors_prefix(factor_set_id), f"factor set '{request.factor_set}'"
        )
        dataset = dataset_manifest(self.system.store, dataset_id)
        return model, factor_set_id, dataset_id, {"factors": factors, "dataset": dataset}

    def _damping(self, request) -> dict:
        if request.damping_factor < 0:
            raise RequestError(f"damping_factor must be >= 0, got {request.damping_factor}")
        damping = request.damping if request.HasField("damping") else None
        Damping(factor=request.damping_factor or 0.1, absolute=damping)
        return {"damping_factor": request.damping_factor or 0.1, "damping": damping}

    @grpc_errors
    async def ComputeScores(self, request, context):
        model, factor_set_id, dataset_id, found = self._inputs(request)
        if not request.queries:
            raise RequestError("queries is empty: send at least one {id, prompt, completion}")
        if len(request.queries) > self.limits.max_queries:
            raise RequestError(f"{len(request.queries)} queries; the limit is {self.limits.max_queries} per request")
        records = []
        for position, query in enumerate(request.queries):
            if len(query.prompt) + len(query.completion) > self.limits.max_query_chars:
                raise RequestError(f"query {position + 1} is longer than {self.limits.max_query_chars} characters")
            record = {"prompt": query.prompt, "completion": query.completion}
            if query.id:
                record["id"] = query.id
            records.append(record)
        queries = query_records(records, "queries")
        config = ScoreConfig(
            **self._damping(request),
            query_rank=request.query_rank or None,
            batch_size=validation.positive(request.batch_size, "batch_size", 8, 65536),
            max_length=found["dataset"]["max_length"],
            top_k=validation.positive(request.top_k, "top_k", 10, 10_000),
            per_module=request.per_module,
            per_token=request.per_token,
        )
        config.validate()
        spec = JobSpec(
            "score",
            model,
            dataset_id=dataset_id,
            num_shards=found["dataset"]["num_shards"],
            config=asdict(config),
            factor_set_id=factor_set_id,
            result_id=_new_id(),
            queries=[{"id": q.id, "prompt": q.prompt, "completion": q.completion} for q in queries],
        )
        record = self.system.submit(
            "compute_scores", spec, request_id=request.request_id, target=f"results/{spec.result_id}"
        )
        return operation_message(record)

    @grpc_errors
    async def ComputeSelfInfluence(self, request, context):
        model, factor_set_id, dataset_id, found = self._inputs(request)
        config = ScoreConfig(
            **self._damping(request),
            batch_size=validation.positive(request.batch_size, "batch_size", 8, 65536),
            max_length=found["dataset"]["max_length"],
            top_k=validation.positive(request.top_k, "top_k", 10, 10_000),
        )
        spec = JobSpec(
            "self",
            model,
            dataset_id=dataset_id,
            num_shards=found["dataset"]["num_shards"],
            config=asdict(config),
            factor_set_id=factor_set_id,
            result_id=_new_id(),
        )
        record = self.system.submit(
            "compute_self_influence", spec, request_id=request.request_id, target=f"results/{spec.result_id}"
        )
        return operation_message(record)

    def _result(self, name: str) -> tuple[str, dict]:
        result_id = validation.resource_id(name, "results", "name")
        return result_id, read_manifest(self.system.store, layout.result_prefix(result_id), f"result '{name}'")

    @grpc_errors
    async def GetScoreResult(self, request, context):
        return result_message(self._result(request.name)[1])

    @grpc_errors
    async def StreamScoreRows(self, request, context):
        result_id, _ = self._result(request.name)
        report = json.loads(self.system.store.get_bytes(layout.result_prefix(result_id) + "results.json"))
        groups = report["queries"] if report["kind"] == "pairwise" else [{"id": "", "top": report["top"]}]
        for group in groups:
            for entry in group["top"]:
                yield query_service_pb2.ScoreRow(
                    query_id=group["id"],
                    rank=entry["rank"],
                    train_id=entry["id"],
                    score=entry["score"],
                    text=entry["text"],
                    per_module=entry.get("per_module", {}),
                    tokens=[
                        query_service_pb2.TokenScore(token=t["token"], score=t["score"])
                        for t in entry.get("tokens", [])
                    ],
                )

    @grpc_errors
    async def StreamResultFiles(self, request, context):
        result_id, manifest = self._result(request.name)
        chunk = validation.positive(request.chunk_bytes, "chunk_bytes", self.limits.chunk_bytes, 64 * 2**20)
        for message in _chunks(self.system.store, layout.result_prefix(result_id), sorted(manifest["files"]), chunk):
            yield message


class OperationsServicer(operations_pb2_grpc.OperationsServicer):
    """google.longrunning.Operations backed by the Redis operation records."""

    def __init__(self, system: JobSystem):
        self.system = system

    def _record(self, name: str) -> dict:
        record = self.system.operations.get(validation.resource_id(name, "operations", "name"))
        if record is None:
            raise NotFoundError(f"operation {name!r} not found")
        return record

    @grpc_errors
    async def GetOperation(self, request, context):
        return operation_message(self._record(request.name))

    @grpc_errors
    async def ListOperations(self, request, context):
        size, offset = validation.page(request.page_size, request.page_token)
        records, token = self.system.operations.list(
            size, str(offset), kind=request.filter.removeprefix("kind=") if request.filter else ""
        )
        return operations_pb2.ListOperationsResponse(
            operations=[operation_message(r) for r in records], next_page_token=token
        )

    @grpc_errors
    async def CancelOperation(self, request, context):
        record = self._record(request.name)
        self.system.operations.cancel(record["id"])
        return empty_pb2.Empty()

    @grpc_errors
    async def DeleteOperation(self, request, context):
        record = self._record(request.name)
        if record["state"] not in TERMINAL:
            raise PreconditionError(f"{request.name} is still running; cancel it first")
        self.system.operations.delete(record["id"])
        return empty_pb2.Empty()

    @grpc_errors
    async def WaitOperation(self, request, context):
        deadline = time.monotonic() + (
            request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else 60.0
        )
        record = self._record(request.name)
        while record["state"] not in TERMINAL and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # one Redis HGETALL: cheap, and completion is seen within 20 ms
            record = self._record(request.name)
        return operation_message(record)
