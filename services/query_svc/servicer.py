"""QueryService: scoring and self-influence jobs (as Operations) and their results.

Thin: each method validates the request, runs the domain work on a thread (never blocking the
event loop) and converts the result.
"""

from __future__ import annotations

import asyncio

from ..catalog import indexes, results
from ..catalog.datasets import DATASETS, DatasetInfo
from ..catalog.factor_sets import FACTOR_SETS
from ..catalog.indexes import INDEXES
from ..catalog.results import RESULTS, result_path
from ..engine.budget import WorkerBudget
from ..engine.model_io import model_skeleton
from ..engine.records import query_records
from ..engine.score import ScoreConfig, plan_model_score
from ..errors import InputError, PreconditionError
from ..gen.influence.v1 import query_service_pb2, query_service_pb2_grpc
from ..options import BATCH_SIZE, BM25, DAMPING_FACTOR, LEXICAL, RESCORE, TFIDF, TOP_K
from ..rpc import validation
from ..rpc.common import TenantScoped, in_thread, model_ref, new_id, operation_message
from ..rpc.status import grpc_errors
from .jobs import ScoreJob, SelfJob
from .messages import result_message


class QueryServicer(TenantScoped, query_service_pb2_grpc.QueryServiceServicer):

    def _inputs(self, request) -> tuple[str, DatasetInfo]:
        """The factor set's id and the dataset, both checked to exist."""
        factor_set_id = FACTOR_SETS.parse(request.factor_set, "factor_set")
        dataset_id = DATASETS.parse(request.dataset, "dataset")
        FACTOR_SETS.open(self.system.store, factor_set_id)
        return factor_set_id, DATASETS.read(self.system.store, dataset_id)

    def _config(self, request, dataset: DatasetInfo, **extra) -> ScoreConfig:
        if request.HasField("damping_factor") and request.damping_factor < 0:
            raise InputError(f"damping_factor must be >= 0, got {request.damping_factor}")
        config = ScoreConfig(
            damping_factor=request.damping_factor if request.HasField("damping_factor") else DAMPING_FACTOR.default,
            damping=request.damping if request.HasField("damping") else None,
            batch_size=validation.positive(request.batch_size, "batch_size", BATCH_SIZE.default, BATCH_SIZE.maximum),
            max_length=dataset.max_length,
            top_k=self._top_k(request),
            **extra,
        )
        config.validate()
        return config

    def _top_k(self, request) -> int:
        """top_k, by default TOP_K.default (or this server's max_top_k if lower: an unset field is never refused)."""
        limit = self.limits.max_top_k
        top_k = validation.positive(request.top_k, "top_k", min(TOP_K.default, limit) if limit else TOP_K.default)
        return validation.within_limit(top_k, limit, "max_top_k", f"top_k is {top_k}", "top_k")

    def _bottom_k(self, request) -> int:
        """bottom_k (0: none), within this server's max_top_k like top_k."""
        bottom_k = validation.positive(request.bottom_k, "bottom_k", 0)
        limit = self.limits.max_top_k
        return validation.within_limit(bottom_k, limit, "max_top_k", f"bottom_k is {bottom_k}", "bottom_k")

    @grpc_errors
    async def ComputeScores(self, request, context):
        return await asyncio.to_thread(self._scores, request)

    def _scores(self, request):
        model = model_ref(request.model)
        if request.index:
            return self._index_scores(request, model)
        if request.lexical:
            raise InputError(
                "lexical adds BM25 candidates to an index query's: give it with index (bm25 filters recompute scoring)",
                field="lexical",
            )
        factor_set_id, dataset = self._inputs(request)
        config = self._config(
            request,
            dataset,
            query_rank=request.query_rank or None,
            per_module=request.per_module,
            per_token=request.per_token,
            tfidf=validation.positive(request.tfidf, "tfidf", TFIDF.default, TFIDF.maximum),
            bm25=validation.positive(request.bm25, "bm25", BM25.default, BM25.maximum),
            damping_check=request.damping_check,
            bottom_k=self._bottom_k(request),
        )
        queries = self._queries(request)
        # the module groups and batch size of the workers' budget (engine/budget.py plan_score)
        modules = list(FACTOR_SETS.read(self.system.store, factor_set_id).modules)
        skeleton = model_skeleton(model.path, model.dtype, model.base)
        plan = plan_model_score(skeleton, modules, config, len(queries), WorkerBudget.of_process(model.device))
        job = ScoreJob(
            model,
            dataset_id=dataset.id,
            shards=dataset.num_shards,
            factor_set_id=factor_set_id,
            result_id=new_id(),
            config=config,
            queries=queries,
            report=request.report,
            module_groups=plan.groups if len(plan.groups) > 1 else [],
            batch_size=plan.batch_size,
        )
        record = self.system.submit(
            "compute_scores", job, request_id=request.request_id, target=result_path(job.result_id)
        )
        return operation_message(record)

    def _queries(self, request) -> list:
        if not request.queries:
            raise InputError("queries is empty: send at least one {id, prompt, completion} (or {id, messages})")
        count = len(request.queries)
        validation.within_limit(
            count, self.limits.max_queries, "max_queries", f"the request has {count} queries", "queries"
        )
        records = []
        for position, query in enumerate(request.queries):
            chars = len(query.prompt) + len(query.completion) + sum(len(m.content) for m in query.messages)
            parts = "its messages" if query.messages else "prompt and completion"
            what = f"query {position + 1} has {chars} characters ({parts})"
            validation.within_limit(chars, self.limits.max_query_chars, "max_query_chars", what, "queries")
            if query.messages:  # a chat: validated as QUERIES.jsonl's chat lines are
                record = {"messages": [{"role": m.role, "content": m.content} for m in query.messages]}
                if query.prompt or query.completion:
                    record["prompt"] = query.prompt
            else:
                record = {"prompt": query.prompt, "completion": query.completion}
            if query.id:
                record["id"] = query.id
            if query.group:
                record["group"] = query.group
            records.append(record)
        return query_records(records, "queries")

    def _index_scores(self, request, model):
        """Scoring against an index: its factor set and damping are the ones it was built with."""
        index = INDEXES.read(self.system.store, INDEXES.parse(request.index, "index"))
        factor_set_id = FACTOR_SETS.parse(request.factor_set, "factor_set")
        if factor_set_id != index.factor_set_id:
            raise PreconditionError(f"{request.index} was built with {index.factor_set}, not {request.factor_set}")
        if request.dataset and request.dataset not in [part.dataset for part in index.parts]:
            raise PreconditionError(f"{request.dataset} is not in {request.index}")
        if request.tfidf or request.bm25:
            raise InputError("tfidf and bm25 filter recompute scoring; an index query has its own first stage")
        if request.damping_check:
            raise InputError("damping_check needs recompute scoring; an index is whitened at one damping")
        config = self._config(
            request,
            indexes.first_dataset(self.system.store, index),
            query_rank=request.query_rank or None,
            per_module=request.per_module,
            per_token=request.per_token,
            bottom_k=self._bottom_k(request),
        )
        damping = index.damping
        if not request.HasField("damping") and not request.HasField("damping_factor"):
            config.damping_factor, config.damping = damping.factor, damping.absolute
        elif index.whitened and (config.damping_factor, config.damping) != (damping.factor, damping.absolute):
            raise PreconditionError(
                f"{request.index} is whitened with damping {damping.policy}; query it with the same damping "
                "(or leave damping unset)"
            )
        rescore = request.rescore if request.HasField("rescore") else RESCORE.default
        if rescore < 0:
            raise InputError(f"rescore must be >= 0, got {rescore}")
        lexical = validation.positive(request.lexical, "lexical", LEXICAL.default, LEXICAL.maximum)
        job = ScoreJob(
            model,
            dataset_id="",
            shards=len(index.shards()),
            factor_set_id=factor_set_id,
            result_id=new_id(),
            config=config,
            queries=self._queries(request),
            report=request.report,
            index_id=index.id,
            rescore=rescore,
            lexical=lexical,
        )
        record = self.system.submit(
            "compute_scores", job, request_id=request.request_id, target=result_path(job.result_id)
        )
        return operation_message(record)

    @grpc_errors
    async def ComputeSelfInfluence(self, request, context):
        return await asyncio.to_thread(self._self, request)

    def _self(self, request):
        model = model_ref(request.model)
        factor_set_id, dataset = self._inputs(request)
        job = SelfJob(
            model,
            dataset_id=dataset.id,
            shards=dataset.num_shards,
            factor_set_id=factor_set_id,
            result_id=new_id(),
            config=self._config(request, dataset),
        )
        record = self.system.submit(
            "compute_self_influence", job, request_id=request.request_id, target=result_path(job.result_id)
        )
        return operation_message(record)

    @grpc_errors
    async def GetScoreResult(self, request, context):
        return result_message(await self.get_resource(RESULTS, request.name))

    @grpc_errors
    async def ListScoreResults(self, request, context):
        infos, token = await self.list_resources(RESULTS, request)
        return query_service_pb2.ListScoreResultsResponse(
            score_results=[result_message(info) for info in infos], next_page_token=token
        )

    @grpc_errors
    async def DeleteScoreResult(self, request, context):
        return await self.delete_resource(RESULTS, request.name)

    def _rows(self, result, include_bottom: bool):
        report = results.read_report(result)
        groups = report["queries"] if report["kind"] == "pairwise" else [{"id": "", "top": report["top"]}]
        tails = ("top", "bottom") if include_bottom else ("top",)
        for group in groups:
            for tail in tails:
                for entry in group.get(tail, []):
                    yield query_service_pb2.ScoreRow(
                        query_id=group["id"],
                        rank=entry["rank"],
                        train_id=entry["id"],
                        score=entry["score"],
                        text=entry["text"],
                        line=entry.get("line"),
                        per_module=entry.get("per_module", {}),
                        tokens=[
                            query_service_pb2.TokenScore(token=t["token"], score=t["score"])
                            for t in entry.get("tokens", [])
                        ],
                        bottom=tail == "bottom",
                    )

    @grpc_errors
    async def StreamScoreRows(self, request, context):
        result = await self.open_resource(RESULTS, request.name)
        async for row in in_thread(self._rows(result, request.include_bottom)):
            yield row

    @grpc_errors
    async def StreamResultFiles(self, request, context):
        async for message in self.stream_files(RESULTS, request):
            yield message
