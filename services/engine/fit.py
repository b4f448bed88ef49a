"""Fitting curvature factors: the covariance pass, eigendecomposition, the eigenvalue-correction pass.

Pass structure per strategy:
    identity:  nothing
    diagonal:  one pass: Σ_m DW_m²
    kfac:      covariance pass, eigendecomposition
    ekfac:     covariance pass, eigendecomposition, correction pass
The correction pass needs the same (a, s) as the covariance pass (the same sampled labels: each
sequence's labels come from its own seeded generator). When they fit in `cache_gib`, the
covariance pass keeps them and the correction pass reuses them with no model forward/backward;
otherwise the correction pass recomputes them. Either way the result is the same.

`accumulate_covariance` and `accumulate_correction` run over any subset of the data and return
mergeable accumulators: a distributed fit runs them per shard and merges.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import InputError
from .arena import HostArena
from .capture import ModuleCapture, describe_all
from .data import TokenizedSequence, TrainingExample, tokenize_training
from .factors import (
    FISHERS,
    STRATEGIES,
    CorrectionAccumulator,
    CovarianceAccumulator,
    FactorSet,
    ModuleFactors,
    bases_of,
    needs_correction,
    needs_covariance,
)
from .finite import check_module_weights
from .model_io import model_fingerprint
from .modules import TrackedModule, check_selection, device_of, freeze_except, select_modules
from .passes import captured_batches
from .progress import Progress


@dataclass
class FitConfig:
    strategy: str = "ekfac"
    fisher: str = "sampled"
    modules: str = "mlp"
    batch_size: int = 8
    max_length: int = 512
    max_examples: int | None = None
    seed: int = 0
    cache_gib: float | None = None  # None: a quarter of physical memory

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InputError(f"unknown strategy '{self.strategy}' (choose from {', '.join(STRATEGIES)})")
        if self.fisher not in FISHERS:
            raise InputError(f"unknown fisher '{self.fisher}' (choose from {', '.join(FISHERS)})")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_length < 2:
            raise InputError(f"--max-length must be >= 2, got {self.max_length}")
        if self.max_examples is not None and self.max_examples < 1:
            raise InputError(f"--max-examples must be >= 1, got {self.max_examples}")
        check_selection(self.modules)

    @property
    def objective(self) -> str:
        return "sampled" if self.fisher == "sampled" else "true"


def default_cache_bytes() -> int:
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 * 2**30
    return physical // 4


class CaptureCache:
    """Keeps captures (on the CPU, in a HostArena) within a byte budget; gives up as a whole once over it."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.batches: list[tuple[dict[str, ModuleCapture], int]] | None = []
        self.arena = HostArena()

    @property
    def bytes(self) -> int:
        return self.arena.bytes

    def offer(self, captures: dict[str, ModuleCapture], n_sequences: int) -> None:
        if self.batches is None:
            return
        size = sum(c.a.numel() * c.a.element_size() + c.s.numel() * c.s.element_size() for c in captures.values())
        if self.bytes + size > self.budget_bytes:
            self.release()
            return
        kept = {
            name: ModuleCapture(self.arena.copy(c.a), self.arena.copy(c.s), c.token_mask.to("cpu"), c.calls)
            for name, c in captures.items()
        }
        self.batches.append((kept, n_sequences))

    @property
    def complete(self) -> bool:
        return self.batches is not None

    def release(self) -> None:
        """Drop everything kept (the cache is incomplete from then on)."""
        self.batches = None
        self.arena.release()


def _tokens(captures: dict[str, ModuleCapture]) -> int:
    first = next(iter(captures.values()))
    return int(first.token_mask[:, : first.token_mask.shape[1] // first.calls].sum())


def prepare_model(model: nn.Module, selection: str) -> tuple[dict[str, nn.Module], dict[str, TrackedModule]]:
    """Select tracked modules and freeze every other parameter."""
    modules = select_modules(model, selection)
    check_module_weights(modules)
    freeze_except(model, modules)
    return modules, describe_all(modules)


def accumulate_covariance(
    model: nn.Module,
    modules: dict[str, nn.Module],
    sequences: Sequence[TokenizedSequence],
    *,
    objective: str,
    batch_size: int,
    pad_token_id: int,
    seed: int = 0,
    progress: Progress | None = None,
    cache: CaptureCache | None = None,
) -> CovarianceAccumulator:
    """Σ a aᵀ and Σ s sᵀ over `sequences` (any shard of the data)."""
    accumulator = CovarianceAccumulator(describe_all(modules))
    for batch, captures in captured_batches(
        model,
        modules,
        sequences,
        batch_size=batch_size,
        pad_token_id=pad_token_id,
        stage="covariance",
        objective=objective,
        seed=seed,
        progress=progress,
    ):
        accumulator.add(captures, len(batch.indices))
        if cache is not None:
            cache.offer(captures, len(batch.indices))
    accumulator.check_finite()
    return accumulator


def accumulate_correction(
    model: nn.Module,
    modules: dict[str, nn.Module],
    sequences: Sequence[TokenizedSequence],
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
    *,
    objective: str,
    batch_size: int,
    pad_token_id: int,
    seed: int = 0,
    progress: Progress | None = None,
    cache: CaptureCache | None = None,
) -> CorrectionAccumulator:
    """Σ_m (Q_Sᵀ DW_m Q_A)² over `sequences`; from `cache` when it holds the whole covariance pass."""
    progress = progress or Progress()
    accumulator = CorrectionAccumulator(describe_all(modules), bases)
    device = device_of(model)
    if cache is not None and cache.complete:
        progress.stage("correction", len(cache.batches))
        try:
            for captures, n_sequences in cache.batches:
                progress.check_cancelled()
                accumulator.add({name: c.to(device) for name, c in captures.items()}, n_sequences)
                progress.advance(1, _tokens(captures))
        finally:
            cache.release()  # single use: the memory goes back now, not when the caller drops it
        accumulator.check_finite()
        return accumulator
    for batch, captures in captured_batches(
        model,
        modules,
        sequences,
        batch_size=batch_size,
        pad_token_id=pad_token_id,
        stage="correction",
        objective=objective,
        seed=seed,
        progress=progress,
    ):
        accumulator.add(captures, len(batch.indices))
    accumulator.check_finite()
    return accumulator


def finalize_factors(
    strategy: str,
    covariance_factors: dict[str, ModuleFactors] | None,
    correction: CorrectionAccumulator | None,
    tracked: dict[str, TrackedModule],
) -> dict[str, ModuleFactors]:
    """Combine the passes' results into each module's factors (see factors.py)."""
    if strategy == "identity":
        return {name: ModuleFactors() for name in tracked}
    if strategy == "kfac":
        return covariance_factors
    eigenvalues = correction.eigenvalues()
    if strategy == "diagonal":
        return {name: ModuleFactors(eigenvalues=eigenvalues[name]) for name in tracked}
    for name, factors in covariance_factors.items():
        factors.eigenvalues = eigenvalues[name]
    return covariance_factors


def fit_factors(
    model: nn.Module,
    tokenizer,
    examples: Sequence[TrainingExample],
    config: FitConfig | None = None,
    progress: Progress | None = None,
) -> FactorSet:
    """Fit the configured strategy's factors on `examples` (see the module docstring)."""
    config = config or FitConfig()
    config.validate()
    progress = progress or Progress()
    modules, tracked = prepare_model(model, config.modules)
    examples = list(examples)[: config.max_examples] if config.max_examples else list(examples)
    if not examples:
        raise InputError("no training examples to fit on")
    sequences = tokenize_training(tokenizer, examples, config.max_length)
    common = dict(
        objective=config.objective,
        batch_size=config.batch_size,
        pad_token_id=tokenizer.pad_token_id,
        seed=config.seed,
        progress=progress,
    )
    covariance_factors, correction, n_tokens, cache = None, None, 0, None
    if needs_covariance(config.strategy):
        budget = default_cache_bytes() if config.cache_gib is None else int(config.cache_gib * 2**30)
        cache = CaptureCache(budget) if config.strategy == "ekfac" else None
        covariance = accumulate_covariance(model, modules, sequences, cache=cache, **common)
        covariance_factors = covariance.eigendecompose()
        n_tokens = max(covariance.token_counts.values())
    if needs_correction(config.strategy):
        bases = bases_of(covariance_factors) if config.strategy == "ekfac" else None
        correction = accumulate_correction(model, modules, sequences, bases, cache=cache, **common)
        if not n_tokens:
            n_tokens = sum(sequence.length for sequence in sequences)
    progress.close()
    return FactorSet(
        strategy=config.strategy,
        fisher=config.fisher,
        modules=tracked,
        factors=finalize_factors(config.strategy, covariance_factors, correction, tracked),
        n_sequences=len(sequences),
        n_tokens=n_tokens,
        model_fingerprint=model_fingerprint(model, list(tracked)),
        metadata={
            "fit_config": asdict(config),
            "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        },
    )
