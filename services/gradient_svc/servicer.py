"""GradientService: registered datasets and training-gradient blocks."""

from __future__ import annotations

import asyncio
import json

from google.protobuf import empty_pb2

from ..engine.data import parse_jsonl, training_examples
from ..engine.modules import check_selection
from ..errors import InputError, error_for_code
from ..gen.influence.v1 import (
    gradient_service_pb2,
    gradient_service_pb2_grpc,
)
from ..jobs.operations import CANCELLED, FAILED
from ..rpc import validation
from ..rpc.common import Limits, list_artifacts, model_ref, new_id, operation_message
from ..rpc.resources import dataset_message
from ..rpc.status import code_name, grpc_errors
from ..storage import delete_artifact
from ..system import layout
from ..system.runner import JobSystem
from ..system.specs import DEFAULT_SHARD_SIZE, JobSpec
from ..system.stages import dataset_manifest

_POLL_SECONDS = 0.05  # how often StreamBlocks looks for the worker's next block


class GradientServicer(gradient_service_pb2_grpc.GradientServiceServicer):
    def __init__(self, system: JobSystem, limits: Limits):
        self.system, self.limits = system, limits

    @grpc_errors
    async def RegisterDataset(self, request, context):
        model = model_ref(request.model)
        if not request.jsonl:
            raise InputError('jsonl is empty: upload at least one {"text": ...} line')
        if len(request.jsonl) > self.limits.max_upload_bytes:
            raise InputError(f"jsonl is {len(request.jsonl)} bytes; the limit is {self.limits.max_upload_bytes}")
        try:
            text = request.jsonl.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("jsonl is not UTF-8 text") from None
        training_examples(parse_jsonl(text.splitlines(), "jsonl", "training data"), "jsonl")
        spec = JobSpec(
            "register",
            model,
            dataset_id=new_id(),
            display_name=request.display_name,
            shard_size=validation.positive(request.shard_size, "shard_size", DEFAULT_SHARD_SIZE, 1_000_000),
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
        items, token = list_artifacts(self.system.store, "datasets/", request.page_size, request.page_token)
        return gradient_service_pb2.ListDatasetsResponse(
            datasets=[dataset_message(manifest) for _, manifest in items], next_page_token=token
        )

    @grpc_errors
    async def DeleteDataset(self, request, context):
        dataset_id = validation.resource_id(request.name, "datasets", "name")
        dataset_manifest(self.system.store, dataset_id)
        delete_artifact(self.system.store, layout.dataset_prefix(dataset_id))
        return empty_pb2.Empty()

    @grpc_errors
    async def StreamBlocks(self, request, context):
        """Submits a one-task blocks job (a worker computes, see system/blocks.py) and streams the
        blocks as the worker writes them. A consumer that goes away cancels the job."""
        dataset_id = validation.resource_id(request.dataset, "datasets", "dataset")
        manifest = dataset_manifest(self.system.store, dataset_id)
        if not 0 <= request.shard < manifest["num_shards"]:
            raise InputError(f"shard must be in [0, {manifest['num_shards']}), got {request.shard}")
        modules = request.modules or "mlp"
        check_selection(modules)
        spec = JobSpec(
            "blocks",
            model_ref(request.model),
            dataset_id=dataset_id,
            num_shards=1,
            config={
                "shard": request.shard,
                "modules": modules,
                "block_size": validation.positive(request.block_size, "block_size", 8, 1024),
            },
        )
        job = self.system.submit("stream_blocks", spec, target=f"{request.dataset}/shards/{request.shard}")["id"]
        store, sent, total = self.system.store, 0, None
        try:
            while total is None or sent < total:
                if store.exists(layout.job_block(job, sent)):
                    yield gradient_service_pb2.GradientBlock.FromString(store.get_bytes(layout.job_block(job, sent)))
                    sent += 1
                elif total is None and store.exists(layout.job_block_count(job)):
                    total = json.loads(store.get_bytes(layout.job_block_count(job)))["blocks"]
                else:
                    record = self.system.operations.get(job)
                    if record["state"] in (FAILED, CANCELLED):
                        raise error_for_code(
                            code_name(record["error_code"]), record.get("error_message", "the blocks job failed")
                        )
                    await asyncio.sleep(_POLL_SECONDS)
        finally:
            if total is None or sent < total:  # the consumer went away or the job failed
                self.system.operations.cancel(job)
            else:
                store.delete_prefix(layout.job_prefix(job))
