"""GradientService: registered datasets and training-gradient blocks."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch
from google.protobuf import empty_pb2

from ..engine.data import parse_jsonl, training_examples
from ..gen.influence.v1 import (
    gradient_service_pb2,
    gradient_service_pb2_grpc,
)
from ..rpc import validation
from ..rpc.common import Limits, list_artifacts, model_ref, new_id, operation_message
from ..rpc.resources import dataset_message
from ..rpc.status import RequestError, grpc_errors
from ..storage import delete_artifact
from ..system import layout
from ..system.runner import JobSystem
from ..system.specs import JobSpec
from ..system.stages import dataset_manifest


class GradientServicer(gradient_service_pb2_grpc.GradientServiceServicer):
    def __init__(self, system: JobSystem, limits: Limits):
        self.system, self.limits = system, limits
        # StreamBlocks computes gradients off the event loop, on one thread with one torch CPU
        # thread: it must not own an OpenMP team beside the workers' (see system/embedded.py).
        self._blocks_executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="stream-blocks", initializer=torch.set_num_threads, initargs=(1,)
        )

    @grpc_errors
    async def RegisterDataset(self, request, context):
        model = model_ref(request.model)
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
            dataset_id=new_id(),
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
        from ..system.blocks import gradient_blocks

        dataset_id = validation.resource_id(request.dataset, "datasets", "dataset")
        manifest = dataset_manifest(self.system.store, dataset_id)
        if not 0 <= request.shard < manifest["num_shards"]:
            raise RequestError(f"shard must be in [0, {manifest['num_shards']}), got {request.shard}")
        model = model_ref(request.model)
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
            block = await loop.run_in_executor(self._blocks_executor, next, blocks, None)
            if block is None:
                return
            yield block
