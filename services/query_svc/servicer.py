"""QueryService: scoring and self-influence jobs (as Operations) and their results."""

from __future__ import annotations

import json
from dataclasses import asdict

from ..engine.data import query_records
from ..engine.precondition import Damping
from ..engine.score import ScoreConfig
from ..errors import InputError
from ..gen.influence.v1 import (
    query_service_pb2,
    query_service_pb2_grpc,
)
from ..rpc import validation
from ..rpc.common import Limits, file_chunks, model_ref, new_id, operation_message
from ..rpc.resources import result_message
from ..rpc.status import grpc_errors
from ..storage import ArtifactReader, open_artifact
from ..system import layout
from ..system.runner import JobSystem
from ..system.specs import JobSpec, ModelRef
from ..system.stages import dataset_manifest, factors_artifact


class QueryServicer(query_service_pb2_grpc.QueryServiceServicer):
    def __init__(self, system: JobSystem, limits: Limits):
        self.system, self.limits = system, limits

    def _inputs(self, request) -> tuple[ModelRef, str, str, dict]:
        model = model_ref(request.model)
        factor_set_id = validation.resource_id(request.factor_set, "factorSets", "factor_set")
        dataset_id = validation.resource_id(request.dataset, "datasets", "dataset")
        factors = factors_artifact(self.system.store, factor_set_id).metadata
        dataset = dataset_manifest(self.system.store, dataset_id)
        return model, factor_set_id, dataset_id, {"factors": factors, "dataset": dataset}

    def _damping(self, request) -> dict:
        if request.damping_factor < 0:
            raise InputError(f"damping_factor must be >= 0, got {request.damping_factor}")
        damping = request.damping if request.HasField("damping") else None
        Damping(factor=request.damping_factor or 0.1, absolute=damping)
        return {"damping_factor": request.damping_factor or 0.1, "damping": damping}

    @grpc_errors
    async def ComputeScores(self, request, context):
        model, factor_set_id, dataset_id, found = self._inputs(request)
        if not request.queries:
            raise InputError("queries is empty: send at least one {id, prompt, completion}")
        if len(request.queries) > self.limits.max_queries:
            raise InputError(f"{len(request.queries)} queries; the limit is {self.limits.max_queries} per request")
        records = []
        for position, query in enumerate(request.queries):
            if len(query.prompt) + len(query.completion) > self.limits.max_query_chars:
                raise InputError(f"query {position + 1} is longer than {self.limits.max_query_chars} characters")
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
            result_id=new_id(),
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
            result_id=new_id(),
        )
        record = self.system.submit(
            "compute_self_influence", spec, request_id=request.request_id, target=f"results/{spec.result_id}"
        )
        return operation_message(record)

    def _result(self, name: str) -> ArtifactReader:
        result_id = validation.resource_id(name, "results", "name")
        return open_artifact(self.system.store, layout.result_prefix(result_id), f"result '{name}'")

    @grpc_errors
    async def GetScoreResult(self, request, context):
        return result_message(self._result(request.name).metadata)

    @grpc_errors
    async def StreamScoreRows(self, request, context):
        report = json.loads(self._result(request.name).read_bytes("results.json"))
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
        artifact = self._result(request.name)
        chunk = validation.positive(request.chunk_bytes, "chunk_bytes", self.limits.chunk_bytes, 64 * 2**20)
        for message in file_chunks(artifact, artifact.names(), chunk):
            yield message
