"""Influence scores of training sequences on queries, with layer-wise and token-wise breakdowns.

    score(q, m) = Σ_modules ⟨P_q, DW_m⟩,   P_q = (G + λI)⁻¹ ∇θ log p(completion_q | prompt_q)
                                           DW_m = ∇θ log p(z_m)   (summed over z_m's tokens)
Sign: positive means up-weighting z_m in training makes the completion more likely. Units:
nats of the completion's log-probability per unit of up-weighting z_m's summed log-likelihood
(first order), with G the per-sequence Gauss-Newton/Fisher average over the fit data.

Pipeline: query gradients (one pass over the queries) → preconditioned once → stream training
batches, each one forward/backward, scored by the planned kernel (scoring.py) → top-k per query
→ optional per-token attribution for the top-k only (their sequences are recomputed).
Self-influence: ⟨P_m, DW_m⟩ with P_m preconditioned from z_m itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InputError, PreconditionError
from .capture import accumulation_dtype, capture
from .data import (
    Query,
    TokenizedSequence,
    TrainingExample,
    collate,
    tokenize_queries,
    tokenize_training,
)
from .factors import FactorSet, rotated_per_sequence_gradients
from .finite import first_non_finite, require_finite
from .fit import prepare_model
from .model_io import model_fingerprint
from .modules import device_of
from .passes import QUERY, captured_batches
from .precondition import Damping, low_rank, precondition, self_influence_terms
from .progress import Progress
from .scoring import ModuleQueries, module_scores, module_token_scores, plan_module_queries


@dataclass
class ScoreConfig:
    damping_factor: float = 0.1
    damping: float | None = None  # absolute; overrides damping_factor
    query_rank: int | None = None
    batch_size: int = 8
    max_length: int = 512
    top_k: int = 10
    per_module: bool = False
    per_token: bool = False

    def validate(self) -> None:
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.top_k < 0:
            raise InputError(f"--top-k must be >= 0, got {self.top_k}")
        if self.query_rank is not None and self.query_rank < 1:
            raise InputError(f"--query-rank must be >= 1, got {self.query_rank}")
        if self.max_length < 2:
            raise InputError(f"--max-length must be >= 2, got {self.max_length}")

    @property
    def damping_policy(self) -> Damping:
        return Damping(factor=self.damping_factor, absolute=self.damping)


@dataclass
class TopEntry:
    """One of a query's top-k training sequences."""

    index: int
    score: float
    per_module: dict[str, float] | None = None
    tokens: list[str] | None = None
    token_scores: list[float] | None = None


@dataclass
class ScoreResult:
    scores: torch.Tensor  # [n_queries, n_train] float32
    module_names: list[str]
    per_module: torch.Tensor | None = None  # [n_modules, n_queries, n_train] float32
    top: list[list[TopEntry]] = field(default_factory=list)
    kernels: dict[str, str] = field(default_factory=dict)


def check_factors_match(model: nn.Module, modules: dict[str, nn.Module], factors: FactorSet) -> None:
    missing = [name for name in factors.modules if name not in modules]
    if missing:
        raise PreconditionError(f"factors were fitted for modules this model does not have: {', '.join(missing[:3])}")
    fingerprint = model_fingerprint(model, list(factors.modules))
    if factors.model_fingerprint and fingerprint != factors.model_fingerprint:
        raise PreconditionError(
            "factors were fitted for another model (model fingerprint differs); refit them for this model"
        )


def module_pattern(factors: FactorSet) -> str:
    """A --modules regex selecting exactly the factors' modules."""
    names = list(factors.modules)
    return "^(" + "|".join(name.replace(".", r"\.") for name in names) + ")$"


def query_gradients(
    model: nn.Module,
    modules: dict[str, nn.Module],
    sequences: Sequence[TokenizedSequence],
    batch_size: int,
    pad_token_id: int,
    progress: Progress,
) -> dict[str, torch.Tensor]:
    """∇ log p(completion | prompt) per query and module: {name: [Q, d_out, d_in]} in query order."""
    device = device_of(model)
    gradients: dict[str, torch.Tensor] = {}
    for batch, captures in captured_batches(
        model,
        modules,
        sequences,
        batch_size=batch_size,
        pad_token_id=pad_token_id,
        stage="queries",
        progress=progress,
        subject=QUERY,
    ):
        for name, module_capture in captures.items():
            per_query = module_capture.per_sequence_gradients()
            if name not in gradients:
                gradients[name] = torch.zeros(
                    (len(sequences), *per_query.shape[1:]), dtype=per_query.dtype, device=device
                )
            gradients[name][batch.indices.to(device)] = per_query
    return gradients


def prepare_queries(
    gradients: dict[str, torch.Tensor],
    factors: FactorSet,
    config: ScoreConfig,
    expected_tokens: float,
    dtype: torch.dtype,
) -> dict[str, ModuleQueries]:
    """Precondition each module's query gradients once and plan its scoring kernel."""
    prepared = {}
    for name, gradient in gradients.items():
        preconditioned = precondition(gradient, factors.factors[name], factors.strategy, config.damping_policy, dtype)
        require_finite(preconditioned, f"the preconditioned query gradients of module {name}", "damping too small?")
        factor_pair = low_rank(preconditioned, config.query_rank) if config.query_rank else None
        prepared[name] = plan_module_queries(preconditioned, factor_pair, expected_tokens, dtype)
    return prepared


def score_sequences(
    model: nn.Module,
    modules: dict[str, nn.Module],
    sequences: Sequence[TokenizedSequence],
    prepared: dict[str, ModuleQueries],
    *,
    batch_size: int,
    pad_token_id: int,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Per-module scores of every prepared query against `sequences` (any shard of the data).

    Returns float64 [n_modules, Q, len(sequences)]; column j belongs to sequences[j].
    """
    names = list(modules)
    column = {sequence.index: position for position, sequence in enumerate(sequences)}
    n_queries = next(iter(prepared.values())).n_queries
    per_module = torch.zeros((len(names), n_queries, len(sequences)), dtype=torch.float64)
    for batch, captures in captured_batches(
        model,
        modules,
        sequences,
        batch_size=batch_size,
        pad_token_id=pad_token_id,
        stage="scores",
        progress=progress,
    ):
        columns = torch.tensor([column[int(index)] for index in batch.indices])
        for position, name in enumerate(names):
            per_module[position][:, columns] = module_scores(captures[name], prepared[name]).to("cpu", torch.float64)
    _check_scores(per_module, sequences, names)
    return per_module


def _check_scores(per_module: torch.Tensor, sequences: Sequence[TokenizedSequence], names: list[str]) -> None:
    """NonFiniteError naming the first training sequence (and module) whose score is not finite.
    per_module: [M, Q, N] or [N]."""
    column = first_non_finite(per_module, -1)
    if column is None:
        return
    where = ""
    if per_module.dim() == 3:
        module = first_non_finite(per_module[..., column], 0)
        where = f", module {names[module]}"
    require_finite(
        per_module[..., column],
        f"the score of training sequence {sequences[column].index + 1} (in file order{where})",
        "the model produces non-finite gradients on this sequence",
    )


def token_scores(
    model: nn.Module,
    modules: dict[str, nn.Module],
    sequence: TokenizedSequence,
    prepared: dict[str, ModuleQueries],
    queries: Sequence[int],
    pad_token_id: int,
) -> torch.Tensor:
    """Per-token attribution of one training sequence to the given queries: float64 [len(queries), T]."""
    batch = collate([sequence], pad_token_id).to(device_of(model))
    captures = capture(model, modules, batch, "true")
    rows = [
        sum(module_token_scores(captures[name], 0, prepared[name], query).to("cpu", torch.float64) for name in modules)
        for query in queries
    ]
    return torch.stack(rows)[:, : sequence.length] if rows else torch.zeros(0, sequence.length, dtype=torch.float64)


def top_k_entries(
    scores: torch.Tensor, per_module: torch.Tensor | None, names: list[str], k: int
) -> list[list[TopEntry]]:
    """The k highest-scoring training sequences per query. scores: [Q, N]; per_module: [M, Q, N]."""
    k = min(k, scores.shape[1])
    top = []
    for query in range(scores.shape[0]):
        values, indices = torch.topk(scores[query], k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
        entries = []
        for value, index in zip(values.tolist(), indices.tolist(), strict=True):
            breakdown = None
            if per_module is not None:
                breakdown = {name: float(per_module[m, query, index]) for m, name in enumerate(names)}
            entries.append(TopEntry(index=index, score=float(value), per_module=breakdown))
        top.append(entries)
    return top


def attach_token_scores(
    model: nn.Module,
    modules: dict[str, nn.Module],
    tokenizer,
    sequence_of,
    prepared: dict[str, ModuleQueries],
    top: list[list[TopEntry]],
    progress: Progress | None = None,
) -> None:
    """Fill each top-k entry's tokens and token scores; `sequence_of(index)` gives its sequence.

    Each distinct training sequence is recomputed once, for all queries that rank it.
    """
    progress = progress or Progress()
    wanted = sorted({entry.index for entries in top for entry in entries})
    progress.stage("token scores", len(wanted))
    for index in wanted:
        progress.check_cancelled()
        sequence = sequence_of(index)
        asking = [(query, entry) for query, entries in enumerate(top) for entry in entries if entry.index == index]
        rows = token_scores(model, modules, sequence, prepared, [query for query, _ in asking], tokenizer.pad_token_id)
        tokens = [str(token) for token in tokenizer.convert_ids_to_tokens(sequence.input_ids.tolist())]
        for row, (_, entry) in zip(rows, asking, strict=True):
            entry.tokens = tokens
            entry.token_scores = row.tolist()
        progress.advance(1, sequence.length)


def compute_scores(
    model: nn.Module,
    tokenizer,
    factors: FactorSet,
    examples: Sequence[TrainingExample],
    queries: Sequence[Query],
    config: ScoreConfig | None = None,
    progress: Progress | None = None,
) -> ScoreResult:
    """Pairwise influence scores [n_queries, n_train] plus top-k (see the module docstring)."""
    config = config or ScoreConfig()
    config.validate()
    progress = progress or Progress()
    if not queries:
        raise InputError("no queries to score")
    if not examples:
        raise InputError("no training examples to score")
    modules, _ = prepare_model(model, module_pattern(factors))
    check_factors_match(model, modules, factors)
    dtype = accumulation_dtype(next(model.parameters()).dtype)
    query_sequences = tokenize_queries(tokenizer, queries, config.max_length)
    train_sequences = tokenize_training(tokenizer, examples, config.max_length)
    pad = tokenizer.pad_token_id

    gradients = query_gradients(model, modules, query_sequences, config.batch_size, pad, progress)
    mean_tokens = sum(s.length for s in train_sequences) / len(train_sequences)
    prepared = prepare_queries(gradients, factors, config, mean_tokens, dtype)
    del gradients

    per_module = score_sequences(
        model, modules, train_sequences, prepared, batch_size=config.batch_size, pad_token_id=pad, progress=progress
    )
    names = list(modules)
    scores = per_module.sum(0)
    result = ScoreResult(
        scores=scores.to(torch.float32),
        module_names=names,
        per_module=per_module.to(torch.float32) if config.per_module else None,
        kernels={name: prepared[name].kernel for name in names},
    )
    result.top = top_k_entries(scores, per_module if config.per_module else None, names, config.top_k)
    if config.per_token and config.top_k:
        attach_token_scores(model, modules, tokenizer, train_sequences.__getitem__, prepared, result.top, progress)
    progress.close()
    return result


def self_influence_sequences(
    model: nn.Module,
    modules: dict[str, nn.Module],
    sequences: Sequence[TokenizedSequence],
    factors: FactorSet,
    damping: Damping,
    *,
    batch_size: int,
    pad_token_id: int,
    progress: Progress | None = None,
) -> torch.Tensor:
    """⟨P_m, DW_m⟩ for `sequences` (any shard): float64 [len(sequences)], in list order."""
    column = {sequence.index: position for position, sequence in enumerate(sequences)}
    scores = torch.zeros(len(sequences), dtype=torch.float64)
    for batch, captures in captured_batches(
        model,
        modules,
        sequences,
        batch_size=batch_size,
        pad_token_id=pad_token_id,
        stage="self",
        progress=progress,
    ):
        columns = torch.tensor([column[int(index)] for index in batch.indices])
        for name, module_capture in captures.items():
            module_factors = factors.factors[name]
            gradient_basis = activation_basis = None
            if module_factors.has_basis:
                gradient_basis = module_factors.gradient_eigenvectors.to(module_capture.a)
                activation_basis = module_factors.activation_eigenvectors.to(module_capture.a)
            rotated = rotated_per_sequence_gradients(module_capture, gradient_basis, activation_basis)
            scores[columns] += self_influence_terms(rotated, module_factors, factors.strategy, damping).to("cpu")
    _check_scores(scores, sequences, list(modules))
    return scores


def compute_self_influence(
    model: nn.Module,
    tokenizer,
    factors: FactorSet,
    examples: Sequence[TrainingExample],
    config: ScoreConfig | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """⟨P_m, DW_m⟩ for every training sequence: [n_train] float32."""
    config = config or ScoreConfig()
    config.validate()
    progress = progress or Progress()
    if not examples:
        raise InputError("no training examples to score")
    modules, _ = prepare_model(model, module_pattern(factors))
    check_factors_match(model, modules, factors)
    sequences = tokenize_training(tokenizer, examples, config.max_length)
    scores = self_influence_sequences(
        model,
        modules,
        sequences,
        factors,
        config.damping_policy,
        batch_size=config.batch_size,
        pad_token_id=tokenizer.pad_token_id,
        progress=progress,
    )
    progress.close()
    return scores.to(torch.float32)
