"""QueryService's jobs: scoring and self-influence, as stages over the engine's shard-level steps
(engine/score.py).

    score:  prepare × groups -> score × shards × groups -> merge   -> results/{id}
            one shard: score_one_shard, the engine's score_in_memory in one task (the prepared
            queries never leave memory)
            groups: the module groups the budget chose at submission (ScoreJob.module_groups,
            engine/budget.py plan_score), one when every module's preconditioner and prepared
            queries fit a worker; each group's prepared queries are written and read on their
            own, and merge joins the groups' per-module scores (score task t: shard t // groups,
            group t % groups)
    self:   self × shards -> self_merge                         -> results/{id}

Each task builds its Scorer once (model, factor set, modules matched, fingerprint checked);
prepare writes the preconditioned queries once per job, each score task contracts one shard's
training gradients with them in place, and merge takes the top-k, recomputes the top-k's
sequences for token-wise attribution, and publishes results.json and scores.safetensors.
merge loads the model only for token-wise attribution (--per-token); self_merge and index_score
never do: they run on any worker (engine/device.py: what a step reads from the store is placed on
its model's device by the step itself).
"""

from __future__ import annotations

import json

import torch

from ..catalog import factor_sets, indexes, results
from ..catalog.datasets import DATASETS, DatasetView, shard_sequences
from ..catalog.factor_sets import FACTOR_SETS, FactorSetInfo
from ..catalog.indexes import IndexInfo, IndexView
from ..catalog.results import RESULTS, ResultInfo
from ..engine.device import to_device
from ..engine.factors import FactorSet
from ..engine.finite import require_finite
from ..engine.index import Indexer
from ..engine.index_scan import queries_from_tensors, queries_to_tensors, score_index_shards
from ..engine.lexical import Bm25Index
from ..engine.score import (
    PreparedQueries,
    Scorer,
    ScoreResult,
    ShardScores,
    concatenate,
    joined,
    merge,
    merge_self_influence,
    score_in_memory,
)
from ..engine.two_stage import contributions, merged, top_candidates, two_stage
from ..errors import PreconditionError
from ..rpc.messages import packed
from ..storage import get_tensors, put_tensors
from ..system import layout
from ..system.plans import JobPlan, Stage, StageCall
from .jobs import ScoreJob, SelfJob
from .messages import result_message
from .report_data import from_artifact
from .report_html import render
from .reports import add_damping_check, pairwise_report, rank_tensors, self_report, settings_of


def _scorer(call: StageCall, group: int | None = None) -> Scorer:
    """The task's model and factor set, matched once; for module group `group` (default the task's)
    of a score job planned in groups."""
    job: ScoreJob | SelfJob = call.job
    context = call.context
    model, tokenizer = context.models.get(job.model)
    factors = factor_sets.load_cached(context.artifacts, context.store, job.factor_set_id)
    names = job.group(call.group if group is None else group) if isinstance(job, ScoreJob) else None
    return Scorer(model, tokenizer, factors, job.config, names, getattr(job, "batch_size", 0) or None)


def _prepare(call: StageCall, scorer: Scorer) -> PreparedQueries:
    job: ScoreJob = call.job
    mean_tokens = DATASETS.read(call.context.store, job.dataset_id).mean_tokens
    return scorer.prepare(job.queries, mean_tokens, call.context.progress)


def _lexical_mask(call: StageCall, scorer: Scorer) -> torch.Tensor | None:
    """[Q, N] lexical candidates over the whole dataset (document frequencies need every shard), or None."""
    job: ScoreJob = call.job
    if job.config.lexical is None:  # no candidates: no need to read every shard
        return None
    sequences = [s for shard in range(job.num_shards) for s in _shard(call, shard)]
    return scorer.lexical_mask(job.queries, sequences)


def _shard(call: StageCall, shard: int):
    """The sequences of one shard of the job's dataset, through the worker's cache."""
    return shard_sequences(call.context.artifacts, call.context.store, call.job.dataset_id, shard)


def _prepared_key(call: StageCall, group: int) -> str:
    return layout.job_output(call.job_id, "prepared" if call.job.num_groups == 1 else f"prepared-{group:05d}")


def _prepared_tensors(call: StageCall, group: int = 0) -> dict[str, torch.Tensor]:
    """What prepare (or index_prepare) stored for module group `group`, as read from the store (on
    the host); group 0's also holds the lexical mask."""
    key = _prepared_key(call, group)
    return call.context.artifacts.get(key, lambda: get_tensors(call.context.store, key))


def _prepared(call: StageCall, scorer: Scorer, group: int = 0) -> tuple[PreparedQueries, torch.Tensor | None]:
    """Module group `group`'s prepared queries (of `scorer`, the group's) and the lexical mask, on
    the host: the Scorer places the queries itself."""
    tensors = _prepared_tensors(call, group)
    return PreparedQueries.from_tensors(tensors, scorer.names), _prepared_tensors(call).get("lexical_mask")


def _partials(call: StageCall, stage: str) -> list[ShardScores]:
    """Every shard's partial of `stage`, in shard (so global index) order."""
    store = call.context.store
    keys = [layout.job_partial(call.job_id, stage, shard) for shard in range(call.job.num_shards)]
    return [ShardScores.from_tensors(get_tensors(store, key)) for key in keys]


def _score_partials(call: StageCall) -> list[ShardScores]:
    """Every shard's per-module scores, its module groups' joined (model order), in shard order."""
    job: ScoreJob = call.job
    store = call.context.store

    def group_partial(task: int) -> ShardScores:
        return ShardScores.from_tensors(get_tensors(store, layout.job_partial(call.job_id, "score", task)))

    groups = range(job.num_groups)
    return [
        joined([group_partial(shard * job.num_groups + group) for group in groups], job.config.damping_check)
        for shard in range(job.num_shards)
    ]


def _put_prepared(call: StageCall, tensors: dict[str, torch.Tensor], group: int = 0) -> None:
    """Store the prepared queries (of module group `group`), and keep them in this worker's cache
    exactly as the store returns them (on the host), so a later stage here gets what it would read
    back and places it itself."""
    key = _prepared_key(call, group)
    tensors = to_device(tensors, "cpu")
    put_tensors(call.context.store, key, tensors)
    call.context.artifacts.put(key, tensors)


def run_prepare(call: StageCall) -> None:
    """One module group's prepared queries; group 0's task also computes the lexical mask."""
    scorer = _scorer(call)
    call.context.store.put_bytes(layout.job_modules(call.job_id), json.dumps(scorer.all_names).encode())
    tensors = _prepare(call, scorer).to_tensors()
    mask = _lexical_mask(call, scorer) if call.group == 0 else None
    if mask is not None:
        tensors["lexical_mask"] = mask
    _put_prepared(call, tensors, call.group)


def run_score(call: StageCall) -> None:
    """One shard's per-module scores for one module group."""
    scorer = _scorer(call)
    sequences = _shard(call, call.shard)
    prepared, mask = _prepared(call, scorer, call.group)
    partial = scorer.score(prepared, sequences, call.context.progress, mask)
    put_tensors(call.context.store, layout.job_partial(call.job_id, "score", call.task), partial.to_tensors())


def run_merge(call: StageCall) -> ResultInfo:
    """The shards' scores merged without the model; only token-wise attribution of the top-k
    (--per-token) loads it, on the job's device, to recompute their sequences."""
    job: ScoreJob = call.job
    names = json.loads(call.context.store.get_bytes(layout.job_modules(call.job_id)))  # prepare's (model) order
    factors = FACTOR_SETS.read(call.context.store, job.factor_set_id)  # its manifest alone
    mask = _prepared_tensors(call).get("lexical_mask")
    partials = _score_partials(call)
    view = DatasetView(call.context.artifacts, call.context.store, job.dataset_id)
    result = merge(partials, names, job.config, mask)
    if job.config.per_token and job.config.top_k:
        for group in range(job.num_groups):  # token scores summed group after group, in model order
            scorer = _scorer(call, group)
            prepared, _ = _prepared(call, scorer, group)
            scorer.attach_token_scores(prepared, result.ranked, view.sequence, call.context.progress)
            result.kernels.update({name: prepared.modules[name].kernel for name in scorer.names})
        result.query_tokens = scorer.query_tokens(job.queries)
    return _publish_scores(call, factors, names, view, result, partials, mask)


def run_score_one_shard(call: StageCall) -> ResultInfo:
    """A one-shard scoring in one task: the engine's in-memory chain (score_in_memory), the same
    steps as prepare, score and merge; the prepared queries, the largest intermediate of a score
    job, never leave memory. A retried task recomputes it all."""
    job: ScoreJob = call.job
    scorer = _scorer(call)
    scored = score_in_memory(scorer, job.queries, _shard(call, 0), call.context.progress, job.module_groups or None)
    if job.config.per_token:
        scored.result.query_tokens = scorer.query_tokens(job.queries)
    view = DatasetView(call.context.artifacts, call.context.store, job.dataset_id)
    return _publish_scores(call, scorer.factors, scorer.all_names, view, scored.result, [scored.partial], scored.mask)


def _planned(job: ScoreJob, batch_sizes: list[int]) -> dict:
    """What results.json's settings record of the memory plan (engine/budget.py), where the factor
    set's provenance records a fit's: the module groups and batch size planned at submission, and
    the batch sizes the scoring passes ran at (a lowered one after an out-of-memory error)."""
    planned = {"module_groups": job.num_groups, "planned_batch_size": job.batch_size} if job.batch_size else {}
    return {**planned, **({"effective_batch_sizes": batch_sizes} if batch_sizes else {})}


def _coverage(call: StageCall) -> dict:
    """What the job's factor set covers of the model, as its manifest records it (for the report)."""
    return FACTOR_SETS.read(call.context.store, call.job.factor_set_id).coverage


def _publish_scores(
    call: StageCall,
    factors: FactorSet | FactorSetInfo,
    names: list[str],
    view: DatasetView,
    result: ScoreResult,
    partials: list[ShardScores],
    mask: torch.Tensor | None,
) -> ResultInfo:
    """results/{id}: the merged result, its top-k's per-module view and the report. `factors`: the
    factor set used (its strategy, Fisher and model fingerprint go into results.json)."""
    job: ScoreJob = call.job
    tensors = {"scores": result.scores.contiguous()}
    if result.per_module is not None:
        tensors["per_module"] = result.per_module.contiguous()
    if mask is not None:
        tensors["scored"] = mask.contiguous()
    per_module = result.per_module if result.per_module is not None else concatenate(partials)
    tensors.update(rank_tensors(result.top, result.bottom, per_module if mask is None else per_module * mask))
    report = pairwise_report(
        job.queries,
        result.top,
        view.record,
        strategy=factors.strategy,
        damping=job.config.damping_policy.describe(),
        query_rank=job.config.query_rank,
        modules=names,
        settings=settings_of(job, factors, _coverage(call)),
        query_tokens=result.query_tokens,
        bottom=result.bottom,
    )
    report["settings"].update(_planned(job, result.batch_sizes))
    if mask is not None:
        method, k = job.config.lexical
        report[method] = {"k": k, "scored_sequences": int(mask.any(0).sum())}  # "tfidf" or "bm25"
    if result.damping_overlap is not None:
        add_damping_check(report, result.damping_overlap)
    return _publish_result(call, tensors, report, num_queries=len(job.queries))


# -- scoring against an index ----------------------------------------------------------------


def _index(call: StageCall):
    """The index, opened once per job on this worker (see indexes.open_for_job)."""
    job: ScoreJob = call.job
    return indexes.open_for_job(call.context.artifacts, call.context.store, job.index_id, call.job_id)


def run_index_prepare(call: StageCall) -> None:
    """The query side once: each module's query gradients rotated into the eigenbasis from the
    queries' per-token factors, turned into the exact preconditioned queries (for rescoring) and
    their index-space form (for the index score tasks), modules streamed."""
    job: ScoreJob = call.job
    index = _index(call).info
    model, tokenizer = call.context.models.get(job.model)
    factors = factor_sets.load_cached(call.context.artifacts, call.context.store, job.factor_set_id)
    indexer = Indexer(model, tokenizer, factors, index.spec, job.config)
    tokens = sum(DATASETS.read(call.context.store, dataset_id).num_tokens for dataset_id in index.dataset_ids)
    index_queries, prepared = indexer.query_side(
        job.queries, tokens / max(index.num_examples, 1), call.context.progress
    )
    tensors = prepared.to_tensors()
    tensors.update({f"index/{key}": value for key, value in queries_to_tensors(index_queries).items()})
    _put_prepared(call, tensors)


def _index_queries(call: StageCall, index) -> dict[str, dict[str, torch.Tensor]]:
    """The job's index-space queries, as index_prepare stored them (on the host)."""
    prepared = _prepared_tensors(call)
    return queries_from_tensors(
        {name.removeprefix("index/"): value for name, value in prepared.items() if name.startswith("index/")},
        list(index.info.modules),
    )


def run_index_score(call: StageCall) -> None:
    """One index shard's scores, block by block from the store (or the worker's block cache):
    no model, a block or two in memory."""
    (outcome,) = run_index_score_batch([call], [call.context.progress])
    if isinstance(outcome, Exception):
        raise outcome


def index_score_key(job: ScoreJob, task: int) -> str:
    """What index_score tasks may run together (with the runner's tenant): one index, factor set and shard."""
    return f"{job.index_id}/{job.factor_set_id}/{task}"


def run_index_score_batch(calls: list[StageCall], progresses: list) -> list[Exception | None]:
    """index_score tasks of several jobs (one tenant's coalesced requests: Stage.run_batch), each
    with its progress: the tasks that read the same blocks are scored in one pass over them
    (score_index_shards: each block read once, each job's queries scored exactly as alone), each
    job's partial written to its own key. Per task: None, or the exception it ends with
    (CancelledError when its operation was cancelled meanwhile: the others go on)."""
    outcomes: list[Exception | None] = [None] * len(calls)
    passes: dict[tuple, list[int]] = {}  # (index id, block names) -> the members reading those blocks
    opened = []
    for member, call in enumerate(calls):
        try:
            index = _index(call)
            _, _, shard = index.info.shards()[call.shard]
            opened.append((index, _index_queries(call, index)))
            passes.setdefault((index.id, tuple(shard.blocks)), []).append(member)
        except Exception as error:
            opened.append(None)
            outcomes[member] = error
    for (_, names), members in passes.items():
        index = opened[members[0]][0]
        context = calls[members[0]].context
        for member in members:
            progresses[member].stage("index scores", len(names), "block")
        blocks = (indexes.read_block(context.blocks, index, name) for name in names)
        try:
            scored = score_index_shards([(opened[member][1], progresses[member]) for member in members], blocks)
        except Exception as error:  # the pass failed: every member of it with it (each retried alone)
            scored = [error] * len(members)
        for member, partial in zip(members, scored, strict=True):
            outcomes[member] = partial if isinstance(partial, Exception) else _put_index_partial(calls[member], partial)
    return outcomes


def _put_index_partial(call: StageCall, partial: ShardScores) -> Exception | None:
    """Write one task's index scores (checked finite); None, or the exception that stopped it."""
    try:
        require_finite(partial.scores, f"the index scores of shard {call.shard}")
        key = layout.job_partial(call.job_id, "index_score", call.shard)
        put_tensors(call.context.store, key, partial.to_tensors())
    except Exception as error:
        return error
    return None


def _bm25(call: StageCall, index: IndexInfo, view: IndexView, count: int) -> Bm25Index:
    """BM25 over the index's first `count` sequences (the job's shards), built once per index and
    count on this worker and kept in its artifact cache (its sparse matrix counted against the
    cache's bytes): later jobs against the same index neither read its text nor rebuild it."""
    return call.context.artifacts.get(("bm25", index.id, count), lambda: Bm25Index.build(view.sequences(count)))


def run_index_merge(call: StageCall) -> ResultInfo:
    """Index scores of every shard, each query's best `rescore` candidates (and, with `lexical`,
    its best by BM25) rescored exactly, the final top-k (with the breakdowns asked for) from exact
    scores."""
    job: ScoreJob = call.job
    index = _index(call).info
    scorer = _scorer(call)
    partials = _partials(call, "index_score")
    order = torch.argsort(torch.cat([partial.index for partial in partials]))
    index_scores = torch.cat([partial.scores for partial in partials], dim=-1)[:, order]
    expected = sum(shard.count for _, _, shard in index.shards()[: job.num_shards])
    if index_scores.shape[1] != expected:
        raise PreconditionError(f"index scores cover {index_scores.shape[1]} of {expected} sequences")
    prepared, _ = _prepared(call, scorer)
    view = IndexView(call.context.artifacts, call.context.store, index)
    sources = {"index": top_candidates(index_scores, job.rescore)}
    if job.lexical:  # BM25 over the training text of the job's shards (document frequencies need all of it)
        sources["lexical"] = scorer.bm25_candidates(_bm25(call, index, view, expected), job.queries, job.lexical)
    if job.config.bottom_k:  # the most negative come from the other end of the index ranking
        sources["index_bottom"] = top_candidates(index_scores, job.rescore, largest=False)
    candidates = merged(*sources.values())
    result, rescored = two_stage(scorer, prepared, index_scores, candidates, view.sequence, call.context.progress)
    if job.config.per_token:
        result.query_tokens = scorer.query_tokens(job.queries)
    report = pairwise_report(
        job.queries,
        result.top,
        view.record,
        strategy=scorer.factors.strategy,
        damping=job.config.damping_policy.describe(),
        query_rank=job.config.query_rank,
        modules=scorer.names,
        settings=settings_of(job, scorer.factors, _coverage(call)),
        query_tokens=result.query_tokens,
        bottom=result.bottom,
    )
    report["index"] = {
        "name": index.name,
        **index.spec.to_dict(),
        "rescore": job.rescore,
        "rescored_sequences": rescored,
    }
    if job.lexical:  # what each candidate source brought to the final top-k
        report["index"]["lexical"] = job.lexical
        report["index"]["sources"] = contributions({**sources, "union": candidates}, result.top)
    tensors = {"scores": result.scores.contiguous(), **rank_tensors(result.top, result.bottom)}
    return _publish_result(call, tensors, report, num_queries=len(job.queries))


def run_self(call: StageCall) -> None:
    scorer = _scorer(call)
    sequences = _shard(call, call.shard)
    partial = scorer.self_influence(sequences, call.context.progress)
    put_tensors(call.context.store, layout.job_partial(call.job_id, "self", call.shard), partial.to_tensors())


def run_self_merge(call: StageCall) -> ResultInfo:
    job: SelfJob = call.job
    scores = merge_self_influence(_partials(call, "self"))
    view = DatasetView(call.context.artifacts, call.context.store, job.dataset_id)
    strategy = FACTOR_SETS.read(call.context.store, job.factor_set_id).strategy
    report = self_report(
        scores, view.record, strategy=strategy, damping=job.config.damping_policy.describe(), top_k=job.config.top_k
    )
    return _publish_result(call, {"scores": scores.contiguous()}, report, num_queries=0)


def _publish_result(call: StageCall, tensors: dict, report: dict, num_queries: int) -> ResultInfo:
    job: ScoreJob | SelfJob = call.job
    info = ResultInfo(
        id=job.result_id,
        result_kind=report["kind"],
        factor_set_id=job.factor_set_id,
        dataset_id=job.dataset_id,
        index_id=getattr(job, "index_id", ""),
        num_queries=num_queries,
        num_train=int(tensors["scores"].shape[-1]),
        modules=tuple(report.get("modules", [])),
        create_time=job.create_time,
    )
    html = None
    if getattr(job, "report", False):
        arrays = {name: tensor.numpy() for name, tensor in tensors.items()}
        html = render(from_artifact(report, arrays))
    return results.publish(call.context.store, info, report, tensors, html)


def _respond(job, info: ResultInfo) -> bytes:
    return packed(result_message(info))


def _first_score_stage(job: ScoreJob) -> str:
    if job.index_id:
        return "index_prepare"
    return "score_one_shard" if job.num_shards == 1 else "prepare"


STAGES = [
    Stage("index_prepare", run_index_prepare, loads_model=True),
    Stage(
        "index_score",
        run_index_score,
        per_shard=True,
        loads_model=False,
        batch_key=index_score_key,
        run_batch=run_index_score_batch,
    ),
    Stage("index_merge", run_index_merge, loads_model=True),
    Stage("prepare", run_prepare, per_group=True, loads_model=True),
    Stage("score", run_score, per_shard=True, per_group=True, loads_model=True),
    Stage("merge", run_merge, loads_model=True),
    Stage("score_one_shard", run_score_one_shard, loads_model=True),
    Stage("self", run_self, per_shard=True, loads_model=True),
    Stage("self_merge", run_self_merge, loads_model=False),
]
PLANS = [
    JobPlan(
        ScoreJob,
        operations=("compute_scores",),
        first=_first_score_stage,
        after=lambda job, stage: {
            "prepare": "score",
            "score": "merge",
            "index_prepare": "index_score",
            "index_score": "index_merge",
        }.get(stage),
        respond=_respond,
        target_prefix=RESULTS.prefix_of,
    ),
    JobPlan(
        SelfJob,
        operations=("compute_self_influence",),
        first=lambda job: "self",
        after=lambda job, stage: {"self": "self_merge"}.get(stage),
        respond=_respond,
        target_prefix=RESULTS.prefix_of,
    ),
]
