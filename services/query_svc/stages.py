"""QueryService's jobs: scoring and self-influence, as stages over the engine's shard-level steps
(engine/score.py).

    score:  prepare -> score × shards -> merge                  -> results/{id}
            one shard: score_one_shard (the prepared queries never leave memory)
    self:   self × shards -> self_merge                         -> results/{id}

Each task builds its Scorer once (model, factor set, modules matched, fingerprint checked);
prepare writes the preconditioned queries once per job, each score task contracts one shard's
training gradients with them in place, and merge takes the top-k, recomputes the top-k's
sequences for token-wise attribution, and publishes results.json and scores.safetensors.
"""

from __future__ import annotations

import json

import torch

from ..engine.score import PreparedQueries, Scorer, ShardScores, concatenate
from ..factor_svc.artifacts import factors_artifact, load_factor_set
from ..gradient_svc.datasets import DatasetView, dataset_metadata, shard_sequences
from ..rpc.resources import packed, result_message
from ..storage import ArtifactWriter, get_tensors, put_tensors
from ..system import layout
from ..system.plans import JobPlan, Stage, StageCall
from ..system.specs import ScoreJob, SelfJob
from .reports import pairwise_report, self_report


def _scorer(call: StageCall) -> Scorer:
    """The task's model and factor set, matched once."""
    job: ScoreJob | SelfJob = call.job
    context = call.context
    model, tokenizer = context.models.get(job.model)
    factors = context.artifacts.get(
        ("factors", job.factor_set_id), lambda: load_factor_set(context.store, job.factor_set_id)
    )
    return Scorer(model, tokenizer, factors, job.config)


def _prepare(call: StageCall, scorer: Scorer) -> PreparedQueries:
    job: ScoreJob = call.job
    dataset = dataset_metadata(call.context.store, job.dataset_id)
    mean_tokens = dataset["num_tokens"] / max(dataset["num_examples"], 1)
    return scorer.prepare(job.queries, mean_tokens, call.context.progress)


def _prepared(call: StageCall, scorer: Scorer) -> PreparedQueries:
    key = layout.job_output(call.job_id, "prepared")
    tensors = call.context.artifacts.get(key, lambda: get_tensors(call.context.store, key))
    return PreparedQueries.from_tensors(tensors, scorer.names)


def _partials(call: StageCall, stage: str) -> list[ShardScores]:
    """Every shard's partial of `stage`, in shard (so global index) order."""
    store = call.context.store
    keys = [layout.job_partial(call.job_id, stage, shard) for shard in range(call.job.num_shards)]
    return [ShardScores.from_tensors(get_tensors(store, key)) for key in keys]


def run_prepare(call: StageCall) -> None:
    tensors = _prepare(call, _scorer(call)).to_tensors()
    key = layout.job_output(call.job_id, "prepared")
    put_tensors(call.context.store, key, tensors)
    call.context.artifacts.put(key, tensors)


def run_score(call: StageCall) -> None:
    scorer = _scorer(call)
    sequences = shard_sequences(call.context, call.job.dataset_id, call.shard)
    partial = scorer.score(_prepared(call, scorer), sequences, call.context.progress)
    put_tensors(call.context.store, layout.job_partial(call.job_id, "score", call.shard), partial.to_tensors())


def run_merge(call: StageCall) -> dict:
    scorer = _scorer(call)
    return _merge(call, scorer, _partials(call, "score"), lambda: _prepared(call, scorer))


def run_score_one_shard(call: StageCall) -> dict:
    """prepare, score and merge in one task (see fit_one_shard): the prepared queries, the
    largest intermediate of a score job, never leave memory."""
    scorer = _scorer(call)
    prepared = _prepare(call, scorer)
    partial = scorer.score(prepared, shard_sequences(call.context, call.job.dataset_id, 0), call.context.progress)
    return _merge(call, scorer, [partial], lambda: prepared)


def _merge(call: StageCall, scorer: Scorer, partials: list[ShardScores], prepared) -> dict:
    job: ScoreJob = call.job
    view = DatasetView(call.context, job.dataset_id)
    result = scorer.merge(partials, prepared, view.sequence, call.context.progress)
    tensors = {"scores": result.scores.contiguous()}
    if result.per_module is not None:
        tensors["per_module"] = result.per_module.contiguous()
    report = pairwise_report(
        job.queries,
        result.top,
        view.record,
        strategy=scorer.factors.strategy,
        damping=job.config.damping_policy.describe(),
        query_rank=job.config.query_rank,
        modules=scorer.names,
    )
    return _publish_result(call, tensors, report, num_queries=len(job.queries))


def run_self(call: StageCall) -> None:
    scorer = _scorer(call)
    sequences = shard_sequences(call.context, call.job.dataset_id, call.shard)
    partial = scorer.self_influence(sequences, call.context.progress)
    put_tensors(call.context.store, layout.job_partial(call.job_id, "self", call.shard), partial.to_tensors())


def run_self_merge(call: StageCall) -> dict:
    job: SelfJob = call.job
    scores = concatenate(_partials(call, "self")).to(torch.float32)
    view = DatasetView(call.context, job.dataset_id)
    strategy = factors_artifact(call.context.store, job.factor_set_id).metadata["strategy"]
    report = self_report(
        scores, view.record, strategy=strategy, damping=job.config.damping_policy.describe(), top_k=job.config.top_k
    )
    return _publish_result(call, {"scores": scores.contiguous()}, report, num_queries=0)


def _publish_result(call: StageCall, tensors: dict, report: dict, num_queries: int) -> dict:
    job: ScoreJob | SelfJob = call.job
    metadata = {
        "kind": "result",
        "name": f"results/{job.result_id}",
        "result_kind": report["kind"],
        "factor_set": f"factorSets/{job.factor_set_id}",
        "dataset": f"datasets/{job.dataset_id}",
        "num_queries": num_queries,
        "num_train": int(tensors["scores"].shape[-1]),
        "modules": report.get("modules", []),
        "create_time": job.create_time,
    }
    writer = ArtifactWriter(call.context.store, layout.result_prefix(job.result_id))
    writer.add_bytes("results.json", json.dumps(report, indent=2, allow_nan=False).encode())
    writer.add_tensors("scores.safetensors", tensors)
    writer.publish(metadata)
    return metadata


def _respond(job, metadata: dict) -> bytes:
    return packed(result_message(metadata))


STAGES = [
    Stage("prepare", run_prepare),
    Stage("score", run_score, per_shard=True),
    Stage("merge", run_merge),
    Stage("score_one_shard", run_score_one_shard),
    Stage("self", run_self, per_shard=True),
    Stage("self_merge", run_self_merge),
]
PLANS = [
    JobPlan(
        "score",
        first=lambda job: "score_one_shard" if job.num_shards == 1 else "prepare",
        after=lambda job, stage: {"prepare": "score", "score": "merge"}.get(stage),
        respond=_respond,
    ),
    JobPlan(
        "self",
        first=lambda job: "self",
        after=lambda job, stage: {"self": "self_merge"}.get(stage),
        respond=_respond,
    ),
]
