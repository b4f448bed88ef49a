"""FactorService's job: a fit, as stages over the engine's shard-level steps (engine/fit.py).

    covariance × shards × groups -> eigen × groups -> correction × shards × groups -> finalize
                                                                                 -> factorSets/{id}
    (kfac skips the correction; diagonal skips covariance and eigen)
    groups: the module groups the budget chose at submission (FitJob.module_groups, engine/budget.py),
    one when the factors fit a worker; each group's sums and eigenbases are written and read on
    their own (task t of a stage is shard t // groups, group t % groups; its key is t's)
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

import dataclasses
from collections.abc import Iterator

import torch

from ..catalog import factor_sets
from ..catalog.datasets import DATASETS, dataset_path, shard_sequences
from ..catalog.factor_sets import FACTOR_SETS, FactorSetInfo
from ..engine.correction import CorrectionAccumulator
from ..engine.covariance import CovarianceAccumulator, Eigenbases
from ..engine.factors import FactorSet
from ..engine.fit import FitModel, FittedModel, eigendecompose, finalize, fit_in_memory
from ..engine.sums import reduce
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
    fit = FitModel(model, tokenizer, job.config, batch_size=job.batch_size or None)
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


def _partials(call: StageCall, stage: str, group: int) -> Iterator[dict[str, torch.Tensor]]:
    """Every shard's partial sums of `stage` for module group `group`, in shard order, one at a time
    (a reduce holds two at once, never all): from this worker's memory if it wrote them (taken out:
    they are merged in place), else from the store."""
    store, artifacts = call.context.store, call.context.artifacts
    job: FitJob = call.job
    for shard in range(job.num_shards):
        key = layout.job_partial(call.job_id, stage, shard * job.num_groups + group)
        yield artifacts.take(key, lambda key=key: get_tensors(store, key))


def _eigen_key(call: StageCall, group: int) -> str:
    job: FitJob = call.job
    return layout.job_output(call.job_id, "eigen" if job.num_groups == 1 else f"eigen-{group:05d}")


def _eigenbases(call: StageCall, modules, group: int) -> Eigenbases | None:
    """Module group `group`'s eigenbases (of `modules`, the group's)."""
    job: FitJob = call.job
    if not job.config.strategy_spec.covariance:
        return None
    return Eigenbases.from_tensors(_get(call, _eigen_key(call, group)), modules)


def _group_modules(call: StageCall, modules: dict, group: int) -> dict:
    names = call.job.group(group)
    return modules if names is None else {name: modules[name] for name in names}


def run_covariance(call: StageCall) -> None:
    fit = _fit(call)
    sequences = _sequences(call, call.shard)
    group = call.job.group(call.group)
    cache = fit.capture_cache(call.context.captures.budget, sequences, group)
    try:
        partial = fit.covariance(sequences, call.context.progress, cache, group)
        _put(call, layout.job_partial(call.job_id, "covariance", call.task), partial.state())
    except BaseException:
        if cache is not None:  # a failed pass leaves no half-filled cache behind
            cache.release()
        raise
    if cache is not None and cache.complete:  # a cache that gave up (over its budget) holds nothing
        call.context.captures.keep(call.job_id, call.task, cache)


def run_eigen(call: StageCall) -> None:
    """No model: the covariance tasks described it. One module group's partial sums, read shard by
    shard, eigendecomposed on this worker's GPU when it has one."""
    fitted = _fitted(call)
    modules = _group_modules(call, fitted.modules, call.group)
    partials = (CovarianceAccumulator.from_state(modules, state) for state in _partials(call, "covariance", call.group))
    device = "cuda" if call.context.device == "cuda" else "cpu"
    eigen = eigendecompose(partials, fitted.storage_dtype, call.context.progress, device)
    _put(call, _eigen_key(call, call.group), eigen.to_tensors(fitted.storage_dtype))


def run_correction(call: StageCall) -> None:
    fit = _fit(call)
    cache = call.context.captures.take(call.job_id, call.task)
    group = call.job.group(call.group)
    eigen = _eigenbases(call, _group_modules(call, fit.tracked, call.group), call.group)
    partial = fit.correction(_sequences(call, call.shard), eigen, call.context.progress, cache, group)
    _put(call, layout.job_partial(call.job_id, "correction", call.task), partial.state())


def run_finalize(call: StageCall) -> FactorSetInfo:
    """No model: the pass tasks described it. Each module group's eigenbases and correction sums
    (reduced shard by shard) are read, finalized and written on their own, one group in memory at
    a time (factor_sets.publish_groups); one group is published as before, kept in this worker's cache."""
    job: FitJob = call.job
    fitted = _fitted(call)
    n_sequences, provenance = _n_sequences(call), _provenance(call)

    def finalized(group: int) -> FactorSet:
        modules = _group_modules(call, fitted.modules, group)
        eigen = _eigenbases(call, modules, group)
        corrections = []
        if job.config.strategy_spec.correction:
            states = _partials(call, "correction", group)
            corrections = [reduce(CorrectionAccumulator.from_state(modules, None, state) for state in states)]
        group_fitted = dataclasses.replace(fitted, modules=modules)
        return finalize(group_fitted, job.config, eigen, corrections, n_sequences, provenance)

    if job.num_groups == 1:
        return _publish_factor_set(call, finalized(0))
    groups = (finalized(group) for group in range(job.num_groups))
    return factor_sets.publish_groups(call.context.store, job.factor_set_id, groups)


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
        groups=call.job.module_groups or None,
    )
    return _publish_factor_set(call, factor_set)


def _provenance(call: StageCall) -> dict:
    job: FitJob = call.job
    planned = {"module_groups": job.num_groups, "planned_batch_size": job.batch_size} if job.batch_size else {}
    return {
        "dataset": dataset_path(job.dataset_id),
        "model_path": job.model.path,
        "create_time": job.create_time,
        **planned,
    }


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
    Stage("covariance", run_covariance, per_shard=True, per_group=True, loads_model=True),
    Stage("eigen", run_eigen, per_group=True, loads_model=False),
    Stage("correction", run_correction, per_shard=True, per_group=True, loads_model=True),
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
