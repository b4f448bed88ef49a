"""The stages of every job, each a function of (context, spec, shard) that reads its inputs from
the object store and writes its output to a deterministic key. Running a stage twice writes the
same bytes, so at-least-once delivery is harmless. No Redis or gRPC here: runner.py schedules.

    register:  register                                               -> dataset artifact
    fit:       covariance×k -> eigen -> correction×k -> finalize       -> factors artifact
               (kfac skips correction; diagonal skips covariance/eigen; identity is finalize only)
               k = 1: fit_one_shard (the same stages in one task, outputs kept in memory)
    score:     prepare -> score×k -> merge                             -> result artifact
               k = 1: score_one_shard
    self:      self×k -> self_merge                                    -> result artifact
    blocks:    blocks (one shard's per-sequence gradients)             -> jobs/{job}/blocks/ for StreamBlocks
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from ..engine.capture import accumulation_dtype
from ..engine.data import (
    Query,
    TokenizedSequence,
    pack_sequences,
    parse_jsonl,
    query_records,
    tokenize_queries,
    tokenize_training,
    training_examples,
    unpack_sequences,
)
from ..engine.factors import (
    CorrectionAccumulator,
    CovarianceAccumulator,
    FactorSet,
    ModuleFactors,
    bases_of,
    needs_correction,
    needs_covariance,
)
from ..engine.fit import (
    CaptureCache,
    FitConfig,
    accumulate_correction,
    accumulate_covariance,
    default_cache_bytes,
    finalize_factors,
    prepare_model,
)
from ..engine.model_io import model_fingerprint, tokenizer_fingerprint
from ..engine.progress import Progress
from ..engine.score import (
    ScoreConfig,
    attach_token_scores,
    check_factors_match,
    module_pattern,
    prepare_queries,
    query_gradients,
    score_sequences,
    self_influence_sequences,
    top_k_entries,
)
from ..engine.scoring import ModuleQueries
from ..reports import pairwise_report, self_report
from ..storage import ArtifactReader, ArtifactStore, ArtifactWriter, get_tensors, open_artifact, put_tensors
from . import layout
from .blocks import gradient_blocks, write_blocks
from .factor_artifacts import factor_reader, publish_factor_set, read_factor_set
from .model_cache import ArtifactCache, ModelCache
from .specs import JobSpec

SHARD_STAGES = {"covariance", "correction", "score", "self"}


@dataclass
class StageContext:
    """What a stage may use: the store, the worker's model cache and capture cache, progress."""

    store: ArtifactStore
    models: ModelCache = field(default_factory=ModelCache)
    artifacts: ArtifactCache = field(default_factory=ArtifactCache)
    progress: Progress = field(default_factory=Progress)
    # (job, shard) -> captures of the covariance pass, reused by the same worker's correction task
    capture_caches: dict = field(default_factory=dict)
    cache_bytes: int = field(default_factory=default_cache_bytes)


# ------------------------------------------------------------------------------------------
# Plans: which stage follows which.


def first_stages(spec: JobSpec) -> list[str]:
    if spec.kind in ("register", "blocks"):
        return [spec.kind]
    if spec.kind in ("fit", "score") and spec.num_shards == 1:  # nothing to fan out: one task
        return [f"{spec.kind}_one_shard"]
    if spec.kind == "score":
        return ["prepare"]
    if spec.kind == "self":
        return ["self"]
    strategy = spec.config["strategy"]
    if needs_covariance(strategy):
        return ["covariance"]
    return ["correction"] if needs_correction(strategy) else ["finalize"]


def next_stage(spec: JobSpec, stage: str) -> str | None:
    """The stage to run once every task of `stage` is done (None: the job is complete)."""
    if spec.kind == "fit":
        strategy = spec.config["strategy"]
        return {
            "covariance": "eigen",
            "eigen": "correction" if needs_correction(strategy) else "finalize",
            "correction": "finalize",
        }.get(stage)
    return {"prepare": "score", "score": "merge", "self": "self_merge"}.get(stage)


def shard_count(spec: JobSpec, stage: str) -> int:
    """How many tasks a stage has: one per data shard for shard stages, else one."""
    return spec.num_shards if stage in SHARD_STAGES else 1


# ------------------------------------------------------------------------------------------
# Published inputs: datasets and factor sets (every read checked against the manifest).


def dataset_artifact(store, dataset_id: str) -> ArtifactReader:
    """The published dataset (NotFoundError if absent); its metadata describes it."""
    return open_artifact(store, layout.dataset_prefix(dataset_id), f"dataset 'datasets/{dataset_id}'")


def dataset_manifest(store, dataset_id: str) -> dict:
    """The published dataset's metadata (NotFoundError if absent)."""
    return dataset_artifact(store, dataset_id).metadata


def load_shard(dataset: ArtifactReader, shard: int, limit: int | None = None) -> list[TokenizedSequence]:
    """A shard's sequences (global indices kept), cut at global index `limit` if given."""
    sequences = unpack_sequences(dataset.read_tensors(layout.shard_tokens(shard)))
    return sequences if limit is None else [s for s in sequences if s.index < limit]


def _shard_sequences(context: StageContext, dataset_id: str, shard: int, limit: int | None = None):
    """`load_shard` through the worker's cache: a published dataset never changes, and the
    fit's two passes and the score pass all read the same shards (register puts them)."""
    sequences = context.artifacts.get(
        ("shard", dataset_id, shard), lambda: load_shard(dataset_artifact(context.store, dataset_id), shard)
    )
    return sequences if limit is None else [s for s in sequences if s.index < limit]


def load_records(dataset: ArtifactReader, shard: int) -> list[dict]:
    """A shard's {"id", "text"} records, in shard order."""
    return json.loads(dataset.read_bytes(layout.shard_records(shard)))


def factors_artifact(store, factor_set_id: str) -> ArtifactReader:
    """The published factor set (NotFoundError if absent); its metadata describes it."""
    return factor_reader(store, layout.factors_prefix(factor_set_id), f"factor set 'factorSets/{factor_set_id}'")


def load_factor_set(store, factor_set_id: str) -> FactorSet:
    return read_factor_set(store, layout.factors_prefix(factor_set_id), f"factor set 'factorSets/{factor_set_id}'")


def _put_job_tensors(context: StageContext, key: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write a job's intermediate tensors, and keep them for this worker's next stage."""
    put_tensors(context.store, key, tensors)
    context.artifacts.put(key, tensors)


def _take_job_tensors(context: StageContext, job: str, stage: str, shard: int) -> dict[str, torch.Tensor]:
    """A shard's partial sums, from this worker's memory if it wrote them, else the store; the
    caller merges them in place, so they leave the cache."""
    key = layout.job_partial(job, stage, shard)
    return context.artifacts.take(key, lambda: get_tensors(context.store, key))


# ------------------------------------------------------------------------------------------
# register


def run_register(context: StageContext, spec: JobSpec, job: str) -> dict:
    """Tokenise the uploaded JSONL into shards and publish the dataset."""
    text = context.store.get_bytes(layout.job_upload(job)).decode("utf-8")
    examples = training_examples(
        parse_jsonl(io.StringIO(text), "uploaded dataset", "training data"), "uploaded dataset"
    )
    tokenizer = context.models.tokenizer(spec.model.path)
    num_shards = math.ceil(len(examples) / spec.shard_size)
    num_tokens, shards = 0, []
    context.progress.stage("register", num_shards)
    writer = ArtifactWriter(context.store, layout.dataset_prefix(spec.dataset_id))
    for shard in range(num_shards):
        start = shard * spec.shard_size
        part = examples[start : start + spec.shard_size]
        sequences = tokenize_training(tokenizer, part, spec.max_length, start_index=start)
        num_tokens += sum(sequence.length for sequence in sequences)
        shards.append(sequences)
        writer.add_tensors(layout.shard_tokens(shard), pack_sequences(sequences))
        writer.add_bytes(layout.shard_records(shard), json.dumps([{"id": e.id, "text": e.text} for e in part]).encode())
        context.progress.advance(1, sum(sequence.length for sequence in sequences))
    metadata = {
        "kind": "dataset",
        "name": f"datasets/{spec.dataset_id}",
        "display_name": spec.display_name,
        "num_examples": len(examples),
        "num_shards": num_shards,
        "shard_size": spec.shard_size,
        "max_length": spec.max_length,
        "num_tokens": num_tokens,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "create_time": spec.create_time,
    }
    writer.publish(metadata)
    for shard, sequences in enumerate(shards):  # the fit that follows on this worker reads none back
        context.artifacts.put(("shard", spec.dataset_id, shard), sequences)
    return metadata


# ------------------------------------------------------------------------------------------
# fit


def _fit_setup(context: StageContext, spec: JobSpec):
    config = FitConfig(**spec.config)
    model, tokenizer = context.models.get(spec.model)
    modules, tracked = prepare_model(model, config.modules)
    return config, model, tokenizer, modules, tracked


def _fit_limit(spec: JobSpec) -> int | None:
    return spec.config.get("max_examples") or None


def run_covariance(context: StageContext, spec: JobSpec, job: str, shard: int) -> None:
    state, cache = _covariance_partial(context, spec, shard)
    try:
        _put_job_tensors(context, layout.job_partial(job, "covariance", shard), state)
    except BaseException:
        if cache is not None:
            cache.release()
        raise
    if cache is not None:  # visible to this worker's correction task only once the task succeeded
        context.capture_caches[(job, shard)] = cache


def _covariance_partial(
    context: StageContext, spec: JobSpec, shard: int
) -> tuple[dict[str, torch.Tensor], CaptureCache | None]:
    """One shard's covariance sums (CovarianceAccumulator.state) and, for EK-FAC, the captures
    kept for the correction pass (the caller decides whether they become visible). A pass that
    fails releases its half-filled cache: no later task can mistake it for a whole one."""
    config, model, tokenizer, modules, _tracked = _fit_setup(context, spec)
    sequences = _shard_sequences(context, spec.dataset_id, shard, _fit_limit(spec))
    cache = CaptureCache(context.cache_bytes) if config.strategy == "ekfac" else None
    try:
        accumulator = accumulate_covariance(
            model,
            modules,
            sequences,
            objective=config.objective,
            batch_size=config.batch_size,
            pad_token_id=tokenizer.pad_token_id,
            seed=config.seed,
            progress=context.progress,
            cache=cache,
        )
    except BaseException:
        if cache is not None:
            cache.release()
        raise
    return accumulator.state(), cache


def run_eigen(context: StageContext, spec: JobSpec, job: str) -> None:
    partials = (_take_job_tensors(context, job, "covariance", shard) for shard in range(spec.num_shards))
    _put_job_tensors(context, layout.job_output(job, "eigen"), _eigen_output(context, spec, partials))


def _eigen_output(context: StageContext, spec: JobSpec, partials: Iterable[dict]) -> dict[str, torch.Tensor]:
    """Reduce covariance partial sums and eigendecompose. The output is in the dtype the factor
    set will be stored in (the correction rotates in it too), without K-FAC's eigenvalue
    products when EK-FAC replaces them: half the bytes, the same published factors."""
    config, model, _, _, tracked = _fit_setup(context, spec)
    merged = None
    for state in partials:
        partial = CovarianceAccumulator.from_state(tracked, state)
        if merged is None:
            merged = partial
        else:
            merged.merge(partial)
    factors = merged.eigendecompose()
    dtype = accumulation_dtype(next(model.parameters()).dtype)
    replaced = {"eigenvalues"} if needs_correction(config.strategy) else set()
    tensors = {
        f"{name}/{key}": value.to(dtype)
        for name, f in factors.items()
        for key, value in f.tensors().items()
        if key not in replaced
    }
    tensors["n_tokens"] = torch.tensor([max(merged.token_counts.values())])
    return tensors


def _stored_eigen_output(context: StageContext, job: str) -> dict[str, torch.Tensor]:
    key = layout.job_output(job, "eigen")
    return context.artifacts.get(key, lambda: get_tensors(context.store, key))


def _eigen_factors(tensors: dict[str, torch.Tensor], tracked) -> tuple[dict[str, ModuleFactors], int]:
    """The eigen stage's output as per-module factors, and the token count."""
    factors = {
        name: ModuleFactors(
            **{key: tensors[f"{name}/{key}"] for key in ModuleFactors.TENSOR_FIELDS if f"{name}/{key}" in tensors}
        )
        for name in tracked
    }
    return factors, int(tensors["n_tokens"][0])


def run_correction(context: StageContext, spec: JobSpec, job: str, shard: int) -> None:
    eigen = _stored_eigen_output(context, job) if needs_covariance(spec.config["strategy"]) else None
    cache = context.capture_caches.pop((job, shard), None)
    state = _correction_partial(context, spec, shard, eigen, cache)
    _put_job_tensors(context, layout.job_partial(job, "correction", shard), state)


def _correction_partial(
    context: StageContext,
    spec: JobSpec,
    shard: int,
    eigen: dict[str, torch.Tensor] | None,
    cache: CaptureCache | None,
) -> dict[str, torch.Tensor]:
    """One shard's eigenvalue-correction sums, in the eigenbases of `eigen` (EK-FAC, the one
    strategy that has both) or in the parameter basis (diagonal: `eigen` is None)."""
    config, model, tokenizer, modules, tracked = _fit_setup(context, spec)
    bases = bases_of(_eigen_factors(eigen, tracked)[0]) if eigen is not None else None
    sequences = _shard_sequences(context, spec.dataset_id, shard, _fit_limit(spec))
    accumulator = accumulate_correction(
        model,
        modules,
        sequences,
        bases,
        objective=config.objective,
        batch_size=config.batch_size,
        pad_token_id=tokenizer.pad_token_id,
        seed=config.seed,
        progress=context.progress,
        cache=cache,
    )
    return accumulator.state()


def run_finalize(context: StageContext, spec: JobSpec, job: str) -> dict:
    strategy = spec.config["strategy"]
    eigen = _stored_eigen_output(context, job) if needs_covariance(strategy) else None
    corrections = []
    if needs_correction(strategy):
        corrections = (_take_job_tensors(context, job, "correction", shard) for shard in range(spec.num_shards))
    return _publish_fit(context, spec, job, eigen, corrections)


def _publish_fit(
    context: StageContext, spec: JobSpec, job: str, eigen: dict | None, corrections: Iterable[dict]
) -> dict:
    """Reduce the correction partial sums, assemble the factor set and publish it."""
    config, model, _, _modules, tracked = _fit_setup(context, spec)
    covariance_factors, n_tokens = _eigen_factors(eigen, tracked) if eigen is not None else (None, 0)
    correction = None
    if needs_correction(config.strategy):
        for state in corrections:
            partial = CorrectionAccumulator.from_state(tracked, None, state)
            if correction is None:
                correction = partial
            else:
                correction.merge(partial)
    dataset = dataset_manifest(context.store, spec.dataset_id)
    n_sequences = min(dataset["num_examples"], _fit_limit(spec) or dataset["num_examples"])
    factor_set = FactorSet(
        strategy=config.strategy,
        fisher=config.fisher,
        modules=tracked,
        factors=finalize_factors(config.strategy, covariance_factors, correction, tracked),
        n_sequences=n_sequences,
        n_tokens=n_tokens or dataset["num_tokens"],
        model_fingerprint=model_fingerprint(model, list(tracked)),
        metadata={
            "fit_config": spec.config,
            "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "dataset": f"datasets/{spec.dataset_id}",
            "model_path": spec.model.path,
            "create_time": spec.create_time,
        },
    )
    for shard in range(spec.num_shards):  # caches a correction task on another worker made redundant
        leftover = context.capture_caches.pop((job, shard), None)
        if leftover is not None:
            leftover.release()
    metadata, stored = publish_factor_set(context.store, layout.factors_prefix(spec.factor_set_id), factor_set)
    context.artifacts.put(("factors", spec.factor_set_id), stored)  # a score job on this worker reads none back
    return metadata


def run_fit_one_shard(context: StageContext, spec: JobSpec, job: str) -> dict:
    """A one-shard fit in one task: the same stages, their outputs passed in memory. With one
    shard there is nothing to fan out, so storing the partial sums and eigenbases between
    tasks would only buy a finer-grained retry; a retried task recomputes it all."""
    strategy = spec.config["strategy"]
    eigen, cache = None, None
    try:
        if needs_covariance(strategy):
            state, cache = _covariance_partial(context, spec, 0)
            eigen = _eigen_output(context, spec, [state])
        corrections = []
        if needs_correction(strategy):
            corrections = [_correction_partial(context, spec, 0, eigen, cache)]
    finally:
        if cache is not None:
            cache.release()
    return _publish_fit(context, spec, job, eigen, corrections)


# ------------------------------------------------------------------------------------------
# score


def _queries(spec: JobSpec) -> list[Query]:
    return query_records(spec.queries, "request")


def _score_setup(context: StageContext, spec: JobSpec):
    config = ScoreConfig(**spec.config)
    model, tokenizer = context.models.get(spec.model)
    factors = context.artifacts.get(
        ("factors", spec.factor_set_id), lambda: load_factor_set(context.store, spec.factor_set_id)
    )
    modules, _ = prepare_model(model, module_pattern(factors))
    context.artifacts.get(
        ("checked", id(model), spec.factor_set_id), lambda: check_factors_match(model, modules, factors)
    )
    return config, model, tokenizer, factors, modules


def run_prepare(context: StageContext, spec: JobSpec, job: str) -> None:
    _put_job_tensors(context, layout.job_output(job, "prepared"), _prepared_tensors(context, spec))


def _prepared_tensors(context: StageContext, spec: JobSpec) -> dict[str, torch.Tensor]:
    """Query gradients and their IHVPs (once per job), as ModuleQueries tensors."""
    config, model, tokenizer, factors, modules = _score_setup(context, spec)
    sequences = tokenize_queries(tokenizer, _queries(spec), config.max_length)
    gradients = query_gradients(model, modules, sequences, config.batch_size, tokenizer.pad_token_id, context.progress)
    dataset = dataset_manifest(context.store, spec.dataset_id)
    mean_tokens = dataset["num_tokens"] / max(dataset["num_examples"], 1)
    dtype = accumulation_dtype(next(model.parameters()).dtype)
    prepared = prepare_queries(gradients, factors, config, mean_tokens, dtype)
    tensors = {}
    for name, module_queries in prepared.items():
        tensors.update(module_queries.to_tensors(name))
    return tensors


def _prepared(context: StageContext, job: str, modules) -> dict[str, ModuleQueries]:
    key = layout.job_output(job, "prepared")
    tensors = context.artifacts.get(key, lambda: get_tensors(context.store, key))
    return {name: ModuleQueries.from_tensors(name, tensors) for name in modules}


def run_score(context: StageContext, spec: JobSpec, job: str, shard: int) -> None:
    modules = _score_setup(context, spec)[4]
    partial = _score_partial(context, spec, shard, _prepared(context, job, modules))
    put_tensors(context.store, layout.job_partial(job, "score", shard), partial)


def _score_partial(
    context: StageContext, spec: JobSpec, shard: int, prepared: dict[str, ModuleQueries]
) -> dict[str, torch.Tensor]:
    """Contract one shard's training gradients with the prepared queries, in place:
    per_module [M, Q, n] and the shard's global indices [n]."""
    config, model, tokenizer, _, modules = _score_setup(context, spec)
    sequences = _shard_sequences(context, spec.dataset_id, shard)
    per_module = score_sequences(
        model,
        modules,
        sequences,
        prepared,
        batch_size=config.batch_size,
        pad_token_id=tokenizer.pad_token_id,
        progress=context.progress,
    )
    return {"per_module": per_module, "index": torch.tensor([sequence.index for sequence in sequences])}


class _DatasetView:
    """Lazy access to a dataset's sequences (through the worker's shard cache) and records by
    global index."""

    def __init__(self, context: StageContext, dataset_id: str):
        self.context, self.dataset_id = context, dataset_id
        self.artifact = dataset_artifact(context.store, dataset_id)
        self._records: dict[int, list[dict]] = {}

    def _shard(self, index: int) -> tuple[int, int]:
        return divmod(index, self.artifact.metadata["shard_size"])

    def sequence(self, index: int) -> TokenizedSequence:
        shard, offset = self._shard(index)
        return _shard_sequences(self.context, self.dataset_id, shard)[offset]

    def record(self, index: int) -> tuple[str, str]:
        shard, offset = self._shard(index)
        if shard not in self._records:
            self._records[shard] = load_records(self.artifact, shard)
        entry = self._records[shard][offset]
        return entry["id"], entry["text"]


def _stored_partials(context: StageContext, spec: JobSpec, job: str, stage: str) -> list[dict[str, torch.Tensor]]:
    """Every shard's partial of `stage`, in shard (so global index) order."""
    return [get_tensors(context.store, layout.job_partial(job, stage, shard)) for shard in range(spec.num_shards)]


def run_merge(context: StageContext, spec: JobSpec, job: str) -> dict:
    modules = _score_setup(context, spec)[4]
    partials = _stored_partials(context, spec, job, "score")
    return _merge_scores(context, spec, partials, lambda: _prepared(context, job, modules))


def run_score_one_shard(context: StageContext, spec: JobSpec, job: str) -> dict:
    """A one-shard score job in one task (prepare, score, merge; see run_fit_one_shard): the
    prepared queries, the largest intermediate of a score job, never leave memory."""
    modules = _score_setup(context, spec)[4]
    tensors = _prepared_tensors(context, spec)
    prepared = {name: ModuleQueries.from_tensors(name, tensors) for name in modules}
    return _merge_scores(context, spec, [_score_partial(context, spec, 0, prepared)], lambda: prepared)


def _merge_scores(context: StageContext, spec: JobSpec, partials: list[dict], prepared: Callable) -> dict:
    """Top-k over all shards' partials, token-wise attribution of the top-k (which needs
    `prepared()`, the prepared queries), and the result files."""
    config, model, tokenizer, factors, modules = _score_setup(context, spec)
    per_module = torch.cat([partial["per_module"] for partial in partials], dim=-1)  # [M, Q, N]
    names = list(modules)
    scores = per_module.sum(0)
    top = top_k_entries(scores, per_module if config.per_module else None, names, config.top_k)
    view = _DatasetView(context, spec.dataset_id)
    if config.per_token and config.top_k:
        attach_token_scores(model, modules, tokenizer, view.sequence, prepared(), top, context.progress)
    tensors = {"scores": scores.to(torch.float32).contiguous()}
    if config.per_module:
        tensors["per_module"] = per_module.to(torch.float32).contiguous()
    report = pairwise_report(
        _queries(spec),
        top,
        view.record,
        strategy=factors.strategy,
        damping=config.damping_policy.describe(),
        query_rank=config.query_rank,
        modules=names,
    )
    return _publish_result(context, spec, tensors, report, num_queries=len(spec.queries))


def _publish_result(context: StageContext, spec: JobSpec, tensors: dict, report: dict, num_queries: int) -> dict:
    metadata = {
        "kind": "result",
        "name": f"results/{spec.result_id}",
        "result_kind": report["kind"],
        "factor_set": f"factorSets/{spec.factor_set_id}",
        "dataset": f"datasets/{spec.dataset_id}",
        "num_queries": num_queries,
        "num_train": int(tensors["scores"].shape[-1]),
        "modules": report.get("modules", []),
        "create_time": spec.create_time,
    }
    writer = ArtifactWriter(context.store, layout.result_prefix(spec.result_id))
    writer.add_bytes("results.json", json.dumps(report, indent=2, allow_nan=False).encode())
    writer.add_tensors("scores.safetensors", tensors)
    writer.publish(metadata)
    return metadata


# ------------------------------------------------------------------------------------------
# self-influence


def run_self(context: StageContext, spec: JobSpec, job: str, shard: int) -> None:
    config, model, tokenizer, factors, modules = _score_setup(context, spec)
    sequences = _shard_sequences(context, spec.dataset_id, shard)
    scores = self_influence_sequences(
        model,
        modules,
        sequences,
        factors,
        config.damping_policy,
        batch_size=config.batch_size,
        pad_token_id=tokenizer.pad_token_id,
        progress=context.progress,
    )
    put_tensors(context.store, layout.job_partial(job, "self", shard), {"scores": scores})


def run_self_merge(context: StageContext, spec: JobSpec, job: str) -> dict:
    config = ScoreConfig(**spec.config)
    strategy = factors_artifact(context.store, spec.factor_set_id).metadata["strategy"]
    scores = torch.cat([part["scores"] for part in _stored_partials(context, spec, job, "self")], dim=-1)
    scores = scores.to(torch.float32)
    view = _DatasetView(context, spec.dataset_id)
    report = self_report(
        scores,
        view.record,
        strategy=strategy,
        damping=config.damping_policy.describe(),
        top_k=config.top_k,
    )
    return _publish_result(context, spec, {"scores": scores.contiguous()}, report, num_queries=0)


# ------------------------------------------------------------------------------------------
# blocks (StreamBlocks' computation; see blocks.py)


def run_blocks(context: StageContext, spec: JobSpec, job: str) -> dict:
    model, tokenizer = context.models.get(spec.model)
    dataset = dataset_artifact(context.store, spec.dataset_id)
    shard, block_size = spec.config["shard"], spec.config["block_size"]
    context.progress.stage("blocks", -(-len(load_records(dataset, shard)) // block_size))
    blocks = gradient_blocks(
        dataset, shard, model, tokenizer, spec.config["modules"], block_size, progress=context.progress
    )
    return {"kind": "blocks", "num_blocks": write_blocks(context.store, job, blocks)}


# ------------------------------------------------------------------------------------------


def run_stage(context: StageContext, spec: JobSpec, job: str, stage: str, shard: int) -> dict | None:
    """Run one task. Returns the published artifact's metadata for a job's last stage, else None."""
    if stage in SHARD_STAGES:
        {"covariance": run_covariance, "correction": run_correction, "score": run_score, "self": run_self}[stage](
            context, spec, job, shard
        )
        return None
    handler = {
        "register": run_register,
        "blocks": run_blocks,
        "eigen": run_eigen,
        "finalize": run_finalize,
        "prepare": run_prepare,
        "merge": run_merge,
        "self_merge": run_self_merge,
        "fit_one_shard": run_fit_one_shard,
        "score_one_shard": run_score_one_shard,
    }[stage]
    return handler(context, spec, job)
