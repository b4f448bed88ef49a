"""Fitting curvature factors, as shard-level steps and the one orchestration that chains them.

    fit = FitModel(model, tokenizer, config)          # modules selected, frozen, checked, once
    partial  = fit.covariance(shard)                  # per data shard: Σ a aᵀ, Σ s sᵀ (mergeable)
    eigen    = eigendecompose([partial, ...], dtype)  # reduce over shards, eigendecompose (float64)
    partial  = fit.correction(shard, eigen)           # per data shard: Σ_m (Q_Sᵀ DW_m Q_A)² (mergeable)
    factors  = finalize(fit.fitted, config, eigen, [partial, ...], n)   # reduce, keep what the strategy stores

Only the passes need the model: `eigendecompose` and `finalize` need of it just its `FittedModel`
(tracked modules, dtype, fingerprint), which the passes' tasks store for them, so the multi-shard
fit's eigen and finalize tasks run on any worker without loading the model.

`fit_in_memory` chains them on one shard with every intermediate in memory: `fit_factors` (the
in-process API) runs it on the whole data, and so does the service system's one-task fit of a
one-shard dataset (the `fit_one_shard` stage); the multi-shard fit stages
(services/factor_svc/stages.py) run the steps per shard with the partial sums and eigenbases
stored between tasks. The reference tests check the code production runs.
Which steps run is the strategy's business (strategies.py): identity none, diagonal the
correction pass, kfac the covariance pass, ekfac both.

The correction pass needs the same (a, s) as the covariance pass (the same sampled labels: each
sequence's labels come from its own seeded generator). When they fit in the capture budget, the
covariance pass keeps them (`CaptureCache`) and the correction pass replays them with no model
forward/backward; otherwise it recomputes them. Either way the result is the same.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import InputError
from ..options import BATCH_SIZE, FISHER, MAX_EXAMPLES, MAX_LENGTH, MODULES, SEED, STRATEGY
from .arena import HostArena
from .budget import MemoryPlan, WorkerBudget, plan_fit, within_memory
from .capture import ModuleCapture, accumulation_dtype, describe_all
from .correction import CorrectionAccumulator, sequence_tokens
from .covariance import CovarianceAccumulator, Eigenbases
from .data import TokenizedSequence, tokenize_training
from .device import arithmetic_provenance, exact_arithmetic, to_device
from .factor_io import storage_dtype_for_model
from .factors import FactorSet, ModuleFactors
from .finite import check_module_weights
from .model_io import DTYPES, cached_fingerprint
from .modules import TrackedModule, check_selection, coverage, device_of, freeze_except, select_modules
from .passes import captured_batches
from .progress import Progress
from .records import TrainingExample
from .resources import MemoryBudget, default_cache_bytes, gib_to_bytes
from .strategies import FISHERS, Strategy, get_strategy
from .sums import Accumulator, reduce


@dataclass
class FitConfig:
    strategy: str = STRATEGY.default
    fisher: str = FISHER.default
    modules: str = MODULES.default
    batch_size: int = BATCH_SIZE.default
    max_length: int = MAX_LENGTH.default
    max_examples: int | None = MAX_EXAMPLES.default
    seed: int = SEED.default
    cache_gib: float | None = None  # capture-cache cap for this fit; None: the process's budget

    def validate(self) -> None:
        get_strategy(self.strategy)
        if self.fisher not in FISHERS:
            raise InputError(f"unknown fisher '{self.fisher}' (choose from {', '.join(FISHERS)})")
        BATCH_SIZE.check(self.batch_size)
        MAX_LENGTH.check(self.max_length)
        MAX_EXAMPLES.check(self.max_examples)
        if self.cache_gib is not None and not (math.isfinite(self.cache_gib) and self.cache_gib >= 0):
            raise InputError(f"--cache-gib must be a finite number >= 0, got {self.cache_gib}")
        check_selection(self.modules)

    @property
    def objective(self) -> str:
        return "sampled" if self.fisher == "sampled" else "true"

    @property
    def strategy_spec(self) -> Strategy:
        return get_strategy(self.strategy)


class CaptureCache:
    """Keeps a pass's captures (on the CPU, in a HostArena) within a shared `MemoryBudget` and an
    optional cap of its own; gives up as a whole (and frees what it held) once either is exceeded."""

    def __init__(self, budget: MemoryBudget | int, cap_bytes: int | None = None):
        self.budget = budget if isinstance(budget, MemoryBudget) else MemoryBudget(budget)
        self.cap_bytes = cap_bytes
        self.batches: list[tuple[dict[str, ModuleCapture], int]] | None = []
        self.arena = HostArena()
        self._reserved = 0

    @property
    def bytes(self) -> int:
        return self.arena.bytes

    def offer(self, captures: dict[str, ModuleCapture], n_sequences: int) -> None:
        if self.batches is None:
            return
        size = sum(c.a.numel() * c.a.element_size() + c.s.numel() * c.s.element_size() for c in captures.values())
        over_cap = self.cap_bytes is not None and self._reserved + size > self.cap_bytes
        if over_cap or not self.budget.reserve(size):
            self.release()
            return
        self._reserved += size
        kept = {
            name: ModuleCapture(self.arena.copy(c.a), self.arena.copy(c.s), c.token_mask.to("cpu"), c.calls)
            for name, c in captures.items()
        }
        self.batches.append((kept, n_sequences))

    @property
    def complete(self) -> bool:
        return self.batches is not None

    def release(self) -> None:
        """Drop everything kept and give its bytes back to the budget (incomplete from then on)."""
        self.batches = None
        self.arena.release()
        self.budget.free(self._reserved)
        self._reserved = 0


def plan_model_fit(model: nn.Module, config: FitConfig, budget: WorkerBudget) -> MemoryPlan:
    """The module groups and batch size of a fit of `model` under `budget` (budget.plan_fit): from
    its modules' shapes alone, so `model` may be a skeleton on the meta device (model_io.model_skeleton)."""
    tracked = describe_all(select_modules(model, config.modules))
    weights, vocab = weights_and_vocab(model)
    return plan_fit(tracked, weights, budget, config.batch_size, config.max_length, vocab)


def weights_and_vocab(model: nn.Module) -> tuple[int, int]:
    """What a plan needs of a model besides its tracked modules: its weights' bytes and its vocabulary."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights, getattr(getattr(model, "config", None), "vocab_size", 0) or 0


def prepare_model(model: nn.Module, selection: str) -> tuple[dict[str, nn.Module], dict[str, TrackedModule]]:
    """Select tracked modules, check their weights are finite, freeze every other parameter."""
    modules = select_modules(model, selection)
    check_module_weights(modules)
    freeze_except(model, modules)
    return modules, describe_all(modules)


@dataclass(frozen=True)
class FittedModel:
    """What a fit's model-free steps (eigendecompose, finalize) need of its model: the tracked
    modules (model order), the model's dtype and fingerprint, how its passes computed (device,
    GPU, torch and CUDA versions, TF32: device.arithmetic_provenance, taken where the passes ran)
    and what the modules cover of the model (`modules.Coverage.to_dict`).
    The tasks that run passes store it as JSON (`to_json`) for the tasks that do not load the model."""

    modules: dict[str, TrackedModule]
    dtype: torch.dtype
    fingerprint: str
    arithmetic: dict = field(default_factory=dict)
    coverage: dict = field(default_factory=dict)

    @property
    def storage_dtype(self) -> torch.dtype:
        return storage_dtype_for_model(self.dtype)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "modules": {name: asdict(module) for name, module in self.modules.items()},
                "dtype": str(self.dtype).removeprefix("torch."),
                "fingerprint": self.fingerprint,
                "arithmetic": self.arithmetic,
                "coverage": self.coverage,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> FittedModel:
        described = json.loads(data)
        return cls(
            modules={name: TrackedModule(**module) for name, module in described["modules"].items()},
            dtype=DTYPES[described["dtype"]],
            fingerprint=described["fingerprint"],
            arithmetic=described["arithmetic"],
            coverage=described.get("coverage", {}),  # absent in a job stored before coverage was recorded
        )


class FitModel:
    """A model ready for a fit's passes (see the module docstring): its tracked modules selected,
    their coverage of the model stated (a keyword selection that would leave out a weight matrix
    of its kind refused: InputError), their weights checked, everything else frozen, on the
    model's device. Built once per task.

    `batch_size`: what the passes run with (the plan's, budget.py; default the config's). A pass
    may run on a `group` of the tracked modules (names, model order): its captures, sums and
    eigenbases are that group's alone, and the same numbers as in a pass over all of them."""

    def __init__(self, model: nn.Module, tokenizer, config: FitConfig, batch_size: int | None = None):
        config.validate()
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.strategy = config.strategy_spec
        self.modules, self.tracked = prepare_model(model, config.modules)
        self.coverage = coverage(model, self.modules, config.modules)
        self.dtype = next(model.parameters()).dtype
        self.device = device_of(model)
        self.batch_size = batch_size or config.batch_size

    @property
    def fitted(self) -> FittedModel:
        """What eigendecompose and finalize need of this model (its fingerprint computed once per model)."""
        fingerprint = cached_fingerprint(self.model, list(self.tracked))
        return FittedModel(
            self.tracked, self.dtype, fingerprint, arithmetic_provenance(self.device), self.coverage.to_dict()
        )

    def plan(self, budget: WorkerBudget) -> MemoryPlan:
        """The module groups and batch size of this fit under `budget` (budget.plan_fit)."""
        return plan_model_fit(self.model, self.config, budget)

    def tokenize(self, examples: Sequence[TrainingExample]) -> list[TokenizedSequence]:
        """The fit's training sequences: the first `max_examples` examples, tokenised."""
        examples = list(examples)[: self.config.max_examples] if self.config.max_examples else list(examples)
        if not examples:
            raise InputError("no training examples to fit on")
        return tokenize_training(self.tokenizer, examples, self.config.max_length)

    def capture_cache(
        self, budget: MemoryBudget, sequences: Sequence[TokenizedSequence], group: Sequence[str] | None = None
    ) -> CaptureCache | None:
        """A cache for the covariance pass's captures, when the correction pass can replay them and
        they fit: within this fit's cap and what the budget has free. Decided up front from the
        captures' size (`capture_bytes`), so a pass whose captures cannot fit never fills memory
        only to give it back. Never on a GPU: copying captures to the host and back costs more
        than the GPU takes to recompute them."""
        if not self.strategy.reuses_captures or self.device.type == "cuda":
            return None
        cap = gib_to_bytes(self.config.cache_gib)
        needed = self.capture_bytes(sequences, group)
        free = budget.total - budget.used
        if needed > free or (cap is not None and needed > cap):
            return None
        return CaptureCache(budget, cap)

    def capture_bytes(self, sequences: Sequence[TokenizedSequence], group: Sequence[str] | None = None) -> int:
        """Bytes of the covariance pass's captures of `sequences`: per padded token position, a and
        s of every tracked module (of `group`) ((d_in (+1) + d_out) × element size), over the pass's
        length-bucketed batches (modules called more than once per forward count once here)."""
        lengths = sorted((sequence.length for sequence in sequences), reverse=True)
        batch = self.batch_size
        positions = sum(lengths[start] * len(lengths[start : start + batch]) for start in range(0, len(lengths), batch))
        element = torch.tensor([], dtype=accumulation_dtype(self.dtype)).element_size()
        modules = [self.tracked[name] for name in group] if group is not None else self.tracked.values()
        return positions * element * sum(m.d_in_full + m.d_out for m in modules)

    def _group(self, group: Sequence[str] | None) -> tuple[dict[str, nn.Module], dict[str, TrackedModule]]:
        if group is None:
            return self.modules, self.tracked
        unknown = [name for name in group if name not in self.tracked]
        if unknown:
            raise InputError(f"module group names modules the fit does not track: {', '.join(unknown[:3])}")
        return {name: self.modules[name] for name in group}, {name: self.tracked[name] for name in group}

    def _within_memory(self, run: Callable[[int], Accumulator], stage: str, cache: CaptureCache | None) -> Accumulator:
        """`run(batch_size)` under the budget's out-of-memory rule (budget.within_memory): a lowered
        batch size is kept for the task's later passes."""
        result, self.batch_size = within_memory(
            run, self.batch_size, stage, self.device, cache.release if cache is not None else None
        )
        return result

    def _passes(self, sequences, stage: str, progress: Progress | None, modules: dict[str, nn.Module], batch_size):
        return captured_batches(
            self.model,
            modules,
            sequences,
            batch_size=batch_size,
            pad_token_id=self.tokenizer.pad_token_id,
            stage=stage,
            objective=self.config.objective,
            seed=self.config.seed,
            progress=progress,
        )

    @exact_arithmetic()
    def covariance(
        self,
        sequences: Sequence[TokenizedSequence],
        progress: Progress | None = None,
        cache: CaptureCache | None = None,
        group: Sequence[str] | None = None,
    ) -> CovarianceAccumulator:
        """Σ a aᵀ and Σ s sᵀ over `sequences` (any shard of the data) of the tracked modules (of
        `group`), summed on the model's device and brought to the host once; `cache` keeps the captures."""
        modules, tracked = self._group(group)

        def run(batch_size: int) -> CovarianceAccumulator:
            accumulator = CovarianceAccumulator(tracked, self.device)
            for batch, captures in self._passes(sequences, "covariance", progress, modules, batch_size):
                accumulator.add(captures, len(batch.indices))
                if cache is not None:
                    cache.offer(captures, len(batch.indices))
            return accumulator.finish(batch_size)

        return self._within_memory(run, "covariance", cache)

    @exact_arithmetic()
    def correction(
        self,
        sequences: Sequence[TokenizedSequence],
        eigen: Eigenbases | None,
        progress: Progress | None = None,
        cache: CaptureCache | None = None,
        group: Sequence[str] | None = None,
    ) -> CorrectionAccumulator:
        """Σ_m (Q_Sᵀ DW_m Q_A)² over `sequences` in `eigen`'s bases (or Σ_m DW_m² with none) of the
        tracked modules (of `group`), summed on the model's device and brought to the host once;
        from `cache` when it holds the whole covariance pass of these sequences (then released).
        The bases (and replayed captures) are placed on the model's device here, once."""
        modules, tracked = self._group(group)
        bases = None
        if eigen is not None:
            work = accumulation_dtype(self.dtype)
            bases = to_device(
                {n: (q_s.to(work), q_a.to(work)) for n, (q_s, q_a) in eigen.bases().items() if n in tracked},
                self.device,
            )
        if cache is not None and cache.complete:
            accumulator = CorrectionAccumulator(tracked, bases, self.device)
            progress = progress or Progress()
            progress.stage("correction", len(cache.batches))
            try:
                for captures, n_sequences in cache.batches:
                    progress.check_cancelled()
                    accumulator.add(to_device(captures, self.device), n_sequences)
                    progress.advance(1, int(sequence_tokens(captures)))  # host captures
            finally:
                cache.release()  # single use: the memory goes back now, not when the caller drops it
            return accumulator.finish(self.batch_size)

        def run(batch_size: int) -> CorrectionAccumulator:
            accumulator = CorrectionAccumulator(tracked, bases, self.device)
            for batch, captures in self._passes(sequences, "correction", progress, modules, batch_size):
                accumulator.add(captures, len(batch.indices))
            return accumulator.finish(batch_size)

        return self._within_memory(run, "correction", None)


def finalize(
    fitted: FittedModel,
    config: FitConfig,
    eigen: Eigenbases | None,
    corrections: Iterable[CorrectionAccumulator],
    n_sequences: int,
    provenance: dict | None = None,
) -> FactorSet:
    """Reduce the correction partial sums and assemble the factor set: of each module's tensors
    the passes produced, the ones the strategy stores (`combine`). Needs no model: `fitted`
    describes it. The provenance records the fit's config, the model's dtype, how the passes
    computed (device, torch and CUDA versions, TF32: device.arithmetic_provenance) and what the
    modules cover of the model ("coverage": modules.Coverage.to_dict)."""
    strategy = config.strategy_spec
    correction = reduce(corrections) if strategy.correction else None
    n_tokens = eigen.n_tokens if eigen is not None else (correction.n_tokens if correction is not None else 0)
    batch_sizes = (eigen.batch_sizes if eigen is not None else set()) | (
        correction.batch_sizes if correction is not None else set()
    )
    return FactorSet(
        strategy=strategy.name,
        fisher=config.fisher,
        modules=fitted.modules,
        factors=combine(strategy, eigen, correction, fitted.modules),
        n_sequences=n_sequences,
        n_tokens=n_tokens,
        model_fingerprint=fitted.fingerprint,
        metadata={
            "fit_config": asdict(config),
            "model_dtype": str(fitted.dtype).removeprefix("torch."),
            **fitted.arithmetic,
            **({"coverage": fitted.coverage} if fitted.coverage else {}),
            **({"effective_batch_sizes": sorted(batch_sizes)} if batch_sizes else {}),
            **(provenance or {}),
        },
    )


def combine(
    strategy: Strategy,
    eigen: Eigenbases | None,
    correction: CorrectionAccumulator | None,
    names: Iterable[str],
) -> dict[str, ModuleFactors]:
    """Each module's factors from what the passes produced: Q_A, Q_S, λ_A, λ_S from the covariance
    pass (`eigen`), the corrected Λ [d_out, d_in] from the correction pass (the reduced
    `correction`), kept as the strategy declares (`Strategy.stores`)."""
    corrected = correction.eigenvalues() if correction is not None else {}
    factors = {}
    for name in names:
        produced = eigen.factors[name].tensors() if eigen is not None else {}
        if name in corrected:
            produced["eigenvalues"] = corrected[name]
        factors[name] = ModuleFactors.stored_by(strategy, produced)
    return factors


def eigendecompose(
    partials: Iterable[CovarianceAccumulator],
    dtype: torch.dtype,
    progress: Progress | None = None,
    device: torch.device | str = "cpu",
) -> Eigenbases:
    """Reduce covariance partial sums (in the order given; a generator is read one partial at a
    time) and eigendecompose them in float64 on `device` (a GPU's cuSOLVER when there is one), the
    result rounded to `dtype` (the factor set's storage dtype), the form every later step uses."""
    return reduce(partials).eigendecompose(progress, dtype=dtype, device=device)


def fit_in_memory(
    fit: FitModel,
    sequences: Sequence[TokenizedSequence],
    budget: MemoryBudget,
    progress: Progress | None = None,
    provenance: dict | None = None,
    n_sequences: int | None = None,
    groups: Sequence[Sequence[str]] | None = None,
) -> FactorSet:
    """The steps above on one shard, chained in memory, one module group after the other (`groups`,
    model order; default one group of every tracked module): each group's covariance, eigenbases
    and correction are computed and let go before the next group's, so a fit holds one group's
    state at a time; the factors are the same bytes whatever the grouping. The capture cache
    replays a group's covariance pass for its correction when it fits the budget. The time of each
    step goes into the factor set's provenance ("timings", seconds, summed over groups).
    `n_sequences`: what the factor set says it was fitted on (default: the sequences; an identity
    fit, which makes no pass, of a whole dataset)."""
    progress = progress or Progress()
    timings: dict[str, float] = {}
    replayed = []

    def timed(step: str, work, *arguments):
        started = time.perf_counter()
        result = work(*arguments)
        timings[step] = round(timings.get(step, 0.0) + time.perf_counter() - started, 3)
        return result

    eigen: Eigenbases | None = None
    corrections: list[CorrectionAccumulator] = []
    for group in groups or [list(fit.tracked)]:
        group = list(group)
        cache = fit.capture_cache(budget, sequences, group)
        try:
            group_eigen = None
            if fit.strategy.covariance:
                partial = timed("covariance", fit.covariance, sequences, progress, cache, group)
                group_eigen = timed(
                    "eigendecomposition",
                    eigendecompose,
                    [partial],
                    fit.fitted.storage_dtype,
                    progress,
                    eigen_device(fit.device),
                )
                del partial
                eigen = group_eigen if eigen is None else eigen.merged(group_eigen)
            if fit.strategy.correction:
                correction = timed("correction", fit.correction, sequences, group_eigen, progress, cache, group)
                if corrections:
                    corrections[0].merge_modules(correction)
                else:
                    corrections.append(correction)
        finally:
            if cache is not None:
                cache.release()
        replayed.append(cache is not None)
    provenance = {**(provenance or {}), "timings": timings, "correction_replayed_captures": all(replayed)}
    return finalize(fit.fitted, fit.config, eigen, corrections, n_sequences or len(sequences), provenance)


def eigen_device(device: torch.device) -> torch.device:
    """Where a fit's eigendecompositions run: on the GPU its passes ran on, else the CPU."""
    return device if device.type == "cuda" else torch.device("cpu")


def fit_factors(
    model: nn.Module,
    tokenizer,
    examples: Sequence[TrainingExample],
    config: FitConfig | None = None,
    progress: Progress | None = None,
    budget: MemoryBudget | None = None,
    worker_budget: WorkerBudget | None = None,
) -> FactorSet:
    """Fit the configured strategy's factors on `examples`: the steps above, the data as one shard,
    in the module groups and at the batch size `worker_budget` allows (default: this process's,
    budget.WorkerBudget.of_process)."""
    fit = FitModel(model, tokenizer, config or FitConfig())
    plan = fit.plan(worker_budget or WorkerBudget.of_process(fit.device))
    fit.batch_size = plan.batch_size
    progress = progress or Progress()
    factor_set = fit_in_memory(
        fit,
        fit.tokenize(examples),
        budget or MemoryBudget(default_cache_bytes()),
        progress,
        plan.to_provenance(),
        groups=plan.groups,
    )
    progress.close()
    return factor_set
