"""FactorService: fit jobs (as Operations) and the factor sets they produce.

Thin: each method validates the request, runs the domain work on a thread (never blocking the
event loop that also serves health checks and other callers' waits) and converts the result.
"""

from __future__ import annotations

import asyncio

from ..catalog import factor_sets
from ..catalog.datasets import DATASETS
from ..catalog.factor_sets import FACTOR_SETS, factor_set_path
from ..engine.budget import WorkerBudget
from ..engine.fit import FitConfig, plan_model_fit
from ..engine.model_io import load_tokenizer, model_skeleton, tokenizer_fingerprint
from ..enums import enum_word
from ..errors import InputError, PreconditionError
from ..gen.influence.v1 import factor_service_pb2, factor_service_pb2_grpc
from ..options import BATCH_SIZE, FISHER, MODULES, STRATEGY
from ..rpc import validation
from ..rpc.common import TenantScoped, model_ref, new_id, operation_message
from ..rpc.status import grpc_errors
from ..storage import MANIFEST
from . import imports
from .imports import read_manifest
from .jobs import FitJob
from .messages import factor_set_message


class FactorServicer(TenantScoped, factor_service_pb2_grpc.FactorServiceServicer):
    @grpc_errors
    async def FitFactors(self, request, context):
        return await asyncio.to_thread(self._fit, request)

    def _fit(self, request):
        model = model_ref(request.model)
        dataset = DATASETS.read(self.system.store, DATASETS.parse(request.dataset, "dataset"))
        if tokenizer_fingerprint(load_tokenizer(model.path, model.base)) != dataset.tokenizer_fingerprint:
            raise PreconditionError(f"{request.dataset} was tokenised with another tokenizer than {model.path}'s")
        config = FitConfig(
            strategy=enum_word(factor_service_pb2.Strategy, request.strategy, "strategy") or STRATEGY.default,
            fisher=enum_word(factor_service_pb2.Fisher, request.fisher, "fisher") or FISHER.default,
            modules=request.modules or MODULES.default,
            batch_size=validation.positive(request.batch_size, "batch_size", BATCH_SIZE.default, BATCH_SIZE.maximum),
            max_length=dataset.max_length,
            max_examples=request.max_examples or None,
            seed=request.seed,
            cache_gib=request.cache_gib if request.HasField("cache_gib") else None,
        )
        config.validate()
        skeleton = model_skeleton(model.path, model.dtype, model.base)
        plan = plan_model_fit(skeleton, config, WorkerBudget.of_process(model.device))
        job = FitJob(
            model,
            dataset_id=dataset.id,
            shards=-(-dataset.sequences_within(config.max_examples) // dataset.shard_size),
            factor_set_id=new_id(),
            config=config,
            module_groups=plan.groups if len(plan.groups) > 1 else [],
            batch_size=plan.batch_size,
        )
        record = self.system.submit(
            "fit_factors", job, request_id=request.request_id, target=factor_set_path(job.factor_set_id)
        )
        return operation_message(record)

    @grpc_errors
    async def GetFactorSet(self, request, context):
        return factor_set_message(await self.get_resource(FACTOR_SETS, request.name))

    @grpc_errors
    async def ListFactorSets(self, request, context):
        infos, token = await self.list_resources(FACTOR_SETS, request)
        return factor_service_pb2.ListFactorSetsResponse(
            factor_sets=[factor_set_message(info) for info in infos], next_page_token=token
        )

    @grpc_errors
    async def DeleteFactorSet(self, request, context):
        return await self.delete_resource(FACTOR_SETS, request.name)

    @grpc_errors
    async def StreamFactors(self, request, context):
        """The chosen modules' files, then manifest.json (all modules: written in order, a directory
        `load_factors` reads)."""
        chunks = self.stream_files(
            FACTOR_SETS, request, with_manifest=True, files=lambda info: info.files(request.modules)
        )
        async for message in chunks:
            yield message

    @grpc_errors
    async def PlanFactorImport(self, request, context):
        def plan_it():
            manifest = read_manifest(request.manifest, "the uploaded manifest.json")
            identifier, published, missing = imports.plan(self.system.store, manifest)
            return factor_service_pb2.FactorImportPlan(
                factor_set=factor_set_path(identifier), published=published, missing_files=missing
            )

        return await asyncio.to_thread(plan_it)

    @grpc_errors
    async def ImportFactors(self, request_iterator, context):
        """manifest.json's chunks first (the first with the manifest's size), then the missing
        files' (see imports.FactorUpload)."""
        manifest_bytes, manifest_size, upload = bytearray(), 0, None
        try:
            async for chunk in request_iterator:
                if upload is None:
                    if chunk.file != MANIFEST:
                        raise InputError(f"an upload starts with {MANIFEST}, got {chunk.file!r}")
                    manifest_bytes.extend(chunk.data)
                    if chunk.offset == 0:
                        manifest_size = chunk.size or len(chunk.data)
                    if len(manifest_bytes) < manifest_size:
                        continue
                    manifest = read_manifest(bytes(manifest_bytes), f"uploaded {MANIFEST}")
                    upload = imports.FactorUpload(self.system.store, manifest)
                    continue
                await asyncio.to_thread(upload.add, chunk.file, chunk.offset, chunk.data)
            if upload is None:
                raise InputError(f"factor upload has no {MANIFEST}")
            return factor_set_message(await asyncio.to_thread(upload.finish))
        finally:
            if upload is not None:
                await asyncio.to_thread(upload.close)

    @grpc_errors
    async def RegisterFactors(self, request, context):
        path = self.server_file(request.uri, "uri")
        return factor_set_message(await asyncio.to_thread(factor_sets.link, self.system.store, path))
