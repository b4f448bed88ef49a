"""FactorService: fit jobs (as Operations) and the factor sets they produce.

Thin: each method validates the request, runs the domain work on a thread (never blocking the
event loop that also serves health checks and other callers' waits) and converts the result.
"""

from __future__ import annotations

import asyncio

from google.protobuf import empty_pb2

from ..engine.fit import FitConfig
from ..engine.model_io import load_tokenizer, tokenizer_fingerprint
from ..enums import enum_word
from ..errors import InputError, NotFoundError, PreconditionError
from ..gen.influence.v1 import factor_service_pb2, factor_service_pb2_grpc
from ..gradient_svc.datasets import dataset_metadata
from ..options import BATCH_SIZE, FISHER, MODULES, STRATEGY
from ..rpc import validation
from ..rpc.common import TenantScoped, file_chunks, in_thread, list_artifacts, model_ref, new_id, operation_message
from ..rpc.resources import factor_set_message
from ..rpc.status import grpc_errors
from ..storage import MANIFEST, ArtifactReader, delete_artifact
from ..system import layout
from ..system.specs import FitJob
from . import imports
from .artifacts import factors_artifact
from .imports import read_manifest


class FactorServicer(TenantScoped, factor_service_pb2_grpc.FactorServiceServicer):

    @grpc_errors
    async def FitFactors(self, request, context):
        return await asyncio.to_thread(self._fit, request)

    def _fit(self, request):
        model = model_ref(request.model)
        dataset_id = validation.resource_id(request.dataset, "datasets", "dataset")
        dataset = dataset_metadata(self.system.store, dataset_id)
        if tokenizer_fingerprint(load_tokenizer(model.path)) != dataset["tokenizer_fingerprint"]:
            raise PreconditionError(f"{request.dataset} was tokenised with another tokenizer than {model.path}'s")
        config = FitConfig(
            strategy=enum_word(factor_service_pb2.Strategy, request.strategy, "strategy") or STRATEGY.default,
            fisher=enum_word(factor_service_pb2.Fisher, request.fisher, "fisher") or FISHER.default,
            modules=request.modules or MODULES.default,
            batch_size=validation.positive(request.batch_size, "batch_size", BATCH_SIZE.default, BATCH_SIZE.maximum),
            max_length=dataset["max_length"],
            max_examples=request.max_examples or None,
            seed=request.seed,
            cache_gib=request.cache_gib if request.HasField("cache_gib") else None,
        )
        config.validate()
        examples = min(dataset["num_examples"], config.max_examples or dataset["num_examples"])
        job = FitJob(
            model,
            dataset_id=dataset_id,
            shards=-(-examples // dataset["shard_size"]),
            factor_set_id=new_id(),
            config=config,
        )
        record = self.system.submit(
            "fit_factors", job, request_id=request.request_id, target=f"factorSets/{job.factor_set_id}"
        )
        return operation_message(record)

    def _artifact(self, name: str) -> tuple[str, ArtifactReader]:
        factor_set_id = validation.resource_id(name, "factorSets", "name")
        return factor_set_id, factors_artifact(self.system.store, factor_set_id)

    @grpc_errors
    async def GetFactorSet(self, request, context):
        factor_set_id, artifact = await asyncio.to_thread(self._artifact, request.name)
        return factor_set_message(factor_set_id, artifact.metadata)

    @grpc_errors
    async def ListFactorSets(self, request, context):
        items, token = await asyncio.to_thread(
            list_artifacts, self.system.store, "factors/", request.page_size, request.page_token
        )
        return factor_service_pb2.ListFactorSetsResponse(
            factor_sets=[factor_set_message(i, m) for i, m in items], next_page_token=token
        )

    @grpc_errors
    async def DeleteFactorSet(self, request, context):
        factor_set_id, _ = await asyncio.to_thread(self._artifact, request.name)
        await asyncio.to_thread(delete_artifact, self.system.store, layout.factors_prefix(factor_set_id))
        return empty_pb2.Empty()

    @grpc_errors
    async def StreamFactors(self, request, context):
        """The chosen modules' files, then manifest.json (all modules: written in order, a directory
        `load_factors` reads)."""
        _, artifact = await asyncio.to_thread(self._artifact, request.name)
        modules = artifact.metadata["modules"]
        unknown = [name for name in request.modules if name not in modules]
        if unknown:
            raise NotFoundError(f"factor set has no module {unknown[0]!r}")
        chosen = list(request.modules) or list(modules)
        files = [modules[name]["file"] for name in chosen]
        async for message in in_thread(file_chunks(artifact, files, request, self.limits, with_manifest=True)):
            yield message

    @grpc_errors
    async def PlanFactorImport(self, request, context):
        def plan_it():
            manifest = read_manifest(request.manifest, "the uploaded manifest.json")
            identifier, published, missing = imports.plan(self.system.store, manifest)
            return factor_service_pb2.FactorImportPlan(
                factor_set=f"factorSets/{identifier}", published=published, missing_files=missing
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
            metadata = await asyncio.to_thread(upload.finish)
            return factor_set_message(upload.id, metadata)
        finally:
            if upload is not None:
                await asyncio.to_thread(upload.close)

    @grpc_errors
    async def RegisterFactors(self, request, context):
        path = self.server_file(request.uri, "uri")
        identifier, metadata = await asyncio.to_thread(imports.link, self.system.store, path)
        return factor_set_message(identifier, metadata)
