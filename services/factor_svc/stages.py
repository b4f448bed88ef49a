"""FactorService's job: a fit, as stages over the engine's shard-level steps (engine/fit.py).

    covariance × shards -> eigen -> correction × shards -> finalize      -> factorSets/{id}
    (kfac skips the correction; diagonal skips covariance and eigen)
    one shard, or identity (no pass): fit_one_shard, the same steps in one task with their outputs
    kept in memory

Every stage reads its inputs from the store (through the worker's cache when it wrote them
itself) and writes its output to a deterministic key (system/layout.py); a redelivered task
rewrites the same bytes. A covariance task's captures become visible to this worker's
correction task of the same shard only once the task has succeeded (context.captures), and
are released when the job ends for any reason.

Only the passes (covariance, correction, fit_one_shard) load the model, on the job's device;
each pass task also stores what eigen and finalize need of the model (engine FittedModel: the
tracked modules, dtype, fingerprint, how the passes computed), so those two run on any worker,
e.g. a CPU pool's, without the model. A fit that makes no pass (identity) is one fit_one_shard task.
"""

from __future__ import annotations

import torch

from ..catalog import factor_sets
from ..catalog.datasets import DATASETS, dataset_path, shard_sequences
from ..catalog.factor_sets import FACTOR_SETS, FactorSetInfo
from ..engine.correction import CorrectionAccumulator
from ..engine.covariance import CovarianceAccumulator, Eigenbases
from ..engine.fit import FitModel, FittedModel, eigendecompose, finalize, fit_in_memory
from ..rpc.messages import packed
from ..storage import get_tensors, put_tensors
from ..system import layout
from ..system.plans import JobPlan, Stage, StageCall
from .jobs import FitJob
from .messages import factor_set_message


def _fit(call: StageCall) -> FitModel:
    """The task's model, prepared for the fit once; what the model-free stages need of it is
    stored for them (the same bytes from every pass task)."""
    job: FitJob = call.job
    model, tokenizer = call.context.models.get(job.model)
    fit = FitModel(model, tokenizer, job.config)
    key = layout.job_model(call.job_id)
    if key not in call.context.artifacts:
        call.context.store.put_bytes(key, fit.fitted.to_json())
        call.context.artifacts.put(key, fit.fitted)
    return fit


def _fitted(call: StageCall) -> FittedModel:
    """The job's model as its pass tasks described it: no model loaded."""
    key = layout.job_model(call.job_id)
    return call.context.artifacts.get(key, lambda: FittedModel.from_json(call.context.store.get_bytes(key)))


def _sequences(call: StageCall, shard: int):
    job: FitJob = call.job
    return shard_sequences(call.context.artifacts, call.context.store, job.dataset_id, shard, job.config.max_examples)


def _put(call: StageCall, key: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write a job's intermediate tensors, and keep them for this worker's next stage."""
    put_tensors(call.context.store, key, tensors)
    call.context.artifacts.put(key, tensors)


def _get(call: StageCall, key: str) -> dict[str, torch.Tensor]:
    return call.context.artifacts.get(key, lambda: get_tensors(call.context.store, key))


def _take_partials(call: StageCall, stage: str) -> list[dict[str, torch.Tensor]]:
    """Every shard's partial sums of `stage`, in shard order, from this worker's memory if it
    wrote them (taken out: they are merged in place), else from the store."""
    store, artifacts = call.context.store, call.context.artifacts
    keys = [layout.job_partial(call.job_id, stage, shard) for shard in range(call.job.num_shards)]
    return [artifacts.take(key, lambda key=key: get_tensors(store, key)) for key in keys]


def _eigenbases(call: StageCall, modules) -> Eigenbases | None:
    job: FitJob = call.job
    if not job.config.strategy_spec.covariance:
        return None
    return Eigenbases.from_tensors(_get(call, layout.job_output(call.job_id, "eigen")), modules)


def run_covariance(call: StageCall) -> None:
    fit = _fit(call)
    sequences = _sequences(call, call.shard)
    cache = fit.capture_cache(call.context.captures.budget, sequences)
    try:
        partial = fit.covariance(sequences, call.context.progress, cache)
        _put(call, layout.job_partial(call.job_id, "covariance", call.shard), partial.state())
    except BaseException:
        if cache is not None:  # a failed pass leaves no half-filled cache behind
            cache.release()
        raise
    if cache is not None and cache.complete:  # a cache that gave up (over its budget) holds nothing
        call.context.captures.keep(call.job_id, call.shard, cache)


def run_eigen(call: StageCall) -> None:
    """No model: the covariance tasks described it."""
    fitted = _fitted(call)
    partials = (CovarianceAccumulator.from_state(fitted.modules, state) for state in _take_partials(call, "covariance"))
    eigen = eigendecompose(partials, fitted.storage_dtype, call.context.progress)
    _put(call, layout.job_output(call.job_id, "eigen"), eigen.to_tensors(fitted.storage_dtype))


def run_correction(call: StageCall) -> None:
    fit = _fit(call)
    cache = call.context.captures.take(call.job_id, call.shard)
    eigen = _eigenbases(call, fit.tracked)
    partial = fit.correction(_sequences(call, call.shard), eigen, call.context.progress, cache)
    _put(call, layout.job_partial(call.job_id, "correction", call.shard), partial.state())


def run_finalize(call: StageCall) -> FactorSetInfo:
    """No model: the pass tasks described it."""
    job: FitJob = call.job
    fitted = _fitted(call)
    corrections = []
    if job.config.strategy_spec.correction:
        corrections = (
            CorrectionAccumulator.from_state(fitted.modules, None, state)
            for state in _take_partials(call, "correction")
        )
    factor_set = finalize(
        fitted, job.config, _eigenbases(call, fitted.modules), corrections, _n_sequences(call), _provenance(call)
    )
    return _publish_factor_set(call, factor_set)


def run_fit_one_shard(call: StageCall) -> FactorSetInfo:
    """A one-shard fit in one task: the engine's one-shard chain, its outputs passed in memory.
    With one shard there is nothing to fan out, so storing the partial sums and eigenbases between
    tasks would only buy a finer-grained retry; a retried task recomputes it all."""
    fit = _fit(call)
    factor_set = fit_in_memory(
        fit,
        _sequences(call, 0),
        call.context.captures.budget,
        call.context.progress,
        _provenance(call),
        n_sequences=_n_sequences(call),
    )
    return _publish_factor_set(call, factor_set)


def _provenance(call: StageCall) -> dict:
    job: FitJob = call.job
    return {"dataset": dataset_path(job.dataset_id), "model_path": job.model.path, "create_time": job.create_time}


def _n_sequences(call: StageCall) -> int:
    job: FitJob = call.job
    return DATASETS.read(call.context.store, job.dataset_id).sequences_within(job.config.max_examples)


def _publish_factor_set(call: StageCall, factor_set) -> FactorSetInfo:
    """Publish factorSets/{id}, kept in this worker's cache: a score job here reads none back."""
    job: FitJob = call.job
    return factor_sets.publish(call.context.store, job.factor_set_id, factor_set, call.context.artifacts)


def _first(job: FitJob) -> str:
    strategy = job.config.strategy_spec
    if job.num_shards == 1 or not (strategy.covariance or strategy.correction):  # nothing to fan out: one task
        return "fit_one_shard"
    return "covariance" if strategy.covariance else "correction"


def _after(job: FitJob, stage: str) -> str | None:
    strategy = job.config.strategy_spec
    return {
        "covariance": "eigen",
        "eigen": "correction" if strategy.correction else "finalize",
        "correction": "finalize",
    }.get(stage)


STAGES = [
    Stage("covariance", run_covariance, per_shard=True, loads_model=True),
    Stage("eigen", run_eigen, loads_model=False),
    Stage("correction", run_correction, per_shard=True, loads_model=True),
    Stage("finalize", run_finalize, loads_model=False),
    Stage("fit_one_shard", run_fit_one_shard, loads_model=True),
]
PLANS = [
    JobPlan(
        FitJob,
        operations=("fit_factors",),
        first=_first,
        after=_after,
        respond=lambda job, info: packed(factor_set_message(info)),
        target_prefix=FACTOR_SETS.prefix_of,
    )
]
