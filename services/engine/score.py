"""Influence scores of training sequences on queries, with layer-wise and token-wise breakdowns,
as shard-level steps and the one orchestration that chains them.

    score(q, m) = Σ_modules ⟨P_q, DW_m⟩,   P_q = (G + λI)⁻¹ ∇θ log p(completion_q | prompt_q)
                                           DW_m = ∇θ log p(z_m)   (summed over z_m's tokens)
Sign: positive means up-weighting z_m in training makes the completion more likely. Units:
nats of the completion's log-probability per unit of up-weighting z_m's summed log-likelihood
(first order), with G the per-sequence Gauss-Newton/Fisher average over the fit data.

    scorer   = Scorer(model, tokenizer, factors, config)   # modules matched, fingerprint checked, once
    prepared = scorer.prepare(queries, mean_tokens)         # query gradients, IHVPs, kernels: once per job
    mask     = scorer.lexical_mask(queries, sequences)      # [Q, N] BM25/TF-IDF candidates (None: all), once
    partial  = scorer.score(prepared, shard, mask=mask)     # per data shard: per-module scores [M, Q, n]
    partial  = joined([partial])                            # (a shard's module groups' rows, in model order)
    result   = merge(partials, scorer.all_names, config, mask)  # scores, top-k and bottom-k (no model)
    scorer.attach_token_scores(prepared, result.ranked, sequence_of)  # per-token for them (--per-token)
    partial  = scorer.self_influence(shard)                 # per data shard: ⟨P_m, DW_m⟩ [n]
    scores   = merge_self_influence(partials)               # [N]

`score_in_memory` chains prepare, lexical_mask, score and merge on one shard with every
intermediate in memory: `compute_scores` (the in-process API) runs it on the whole data, and so
does the service system's one-task scoring of a one-shard dataset (the `score_one_shard` stage).
The multi-shard score stages (services/query_svc/stages.py) run the same steps per shard with the
prepared queries and the mask stored between tasks; `compute_self_influence` and the self stages
share `self_influence` and `merge_self_influence` alike.

The Scorer computes on its model's device (`scorer.device`): the factors (as preconditioners) are
placed there once, prepared queries handed to `score`, `token_scores` or `attach_token_scores`
(from the store: CPU) on each call (device.py's placement rule).

**Module groups** (engine/budget.py's `plan_score`: when the preconditioners and prepared queries
of every module exceed a worker's budget): `Scorer(..., group=names)` prepares, scores and
attributes tokens for that group's modules alone. A module's per-module scores never depend on the
other modules of its batch, so `joined` puts the groups' rows side by side in model order and the
merge sums them as it sums one group's; token scores accumulate group after group in model order
(`attach_token_scores` continues each entry's running sum), so grouped results are the same numbers
as one group's. Every pass runs under the budget's out-of-memory rule (budget.within_memory): a
lowered batch size is kept for the Scorer's later passes and reported in `batch_sizes`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from ..errors import InputError, PreconditionError
from ..options import BATCH_SIZE, BM25, BOTTOM_K, DAMPING, DAMPING_FACTOR, MAX_LENGTH, QUERY_RANK, TFIDF, TOP_K
from .budget import MemoryPlan, WorkerBudget, plan_score, within_memory
from .capture import ModuleCapture, accumulation_dtype, capture, describe_all
from .data import TokenizedSequence, collate, tokenize_queries, tokenize_training
from .device import exact_arithmetic, host_to_device, to_device
from .factors import FactorSet
from .finite import first_non_finite, require_finite
from .fit import prepare_model, weights_and_vocab
from .lexical import Bm25Index, lexical_candidates
from .model_io import cached_fingerprint
from .modules import device_of, module_names, select_modules
from .passes import QUERY, captured_batches
from .precondition import Damping, Preconditioner, divided, low_rank, preconditioner, self_influence_terms
from .progress import Progress
from .records import Query, TrainingExample
from .rotation import rotate, rotated_per_sequence_gradients, rotation_costs
from .scoring import ModuleQueries, module_scores, module_token_scores, plan_module_queries

DAMPING_CHECK_SCALES = (0.1, 10.0)  # --damping-check: the dampings, as multiples of the chosen one


@dataclass
class ScoreConfig:
    damping_factor: float = DAMPING_FACTOR.default
    damping: float | None = DAMPING.default  # absolute; overrides damping_factor
    query_rank: int | None = QUERY_RANK.default
    batch_size: int = BATCH_SIZE.default
    max_length: int = MAX_LENGTH.default
    top_k: int = TOP_K.default
    bottom_k: int = BOTTOM_K.default  # also each query's bottom_k most negative sequences (0: none)
    per_module: bool = False
    per_token: bool = False
    tfidf: int = TFIDF.default  # score only each query's tfidf nearest training sequences by TF-IDF (0: all)
    bm25: int = BM25.default  # score only each query's bm25 best training sequences by BM25 (0: all)
    damping_check: bool = False  # also score at DAMPING_CHECK_SCALES x the damping, in the same pass

    def validate(self) -> None:
        BATCH_SIZE.check(self.batch_size)
        TOP_K.check(self.top_k)
        BOTTOM_K.check(self.bottom_k)
        QUERY_RANK.check(self.query_rank)
        MAX_LENGTH.check(self.max_length)
        TFIDF.check(self.tfidf)
        BM25.check(self.bm25)
        if self.tfidf and self.bm25:
            raise InputError("give one lexical pre-filter: --bm25 or --tfidf, not both")
        _ = self.damping_policy  # validates the damping values

    @property
    def lexical(self) -> tuple[str, int] | None:
        """The lexical pre-filter: (method, candidates per query), or None (every sequence is scored)."""
        if self.bm25:
            return "bm25", self.bm25
        return ("tfidf", self.tfidf) if self.tfidf else None

    @property
    def damping_policy(self) -> Damping:
        return Damping(factor=self.damping_factor, absolute=self.damping)


@dataclass
class TopEntry:
    """One of a query's top-k (or bottom-k) training sequences."""

    index: int
    score: float
    per_module: dict[str, float] | None = None
    tokens: list[str] | None = None
    token_scores: list[float] | None = None
    approximate: bool = False  # an index score, not rescored exactly


@dataclass
class ScoreResult:
    scores: torch.Tensor  # [n_queries, n_train] float32
    module_names: list[str]
    per_module: torch.Tensor | None = None  # [n_modules, n_queries, n_train] float32
    top: list[list[TopEntry]] = field(default_factory=list)
    bottom: list[list[TopEntry]] = field(default_factory=list)  # --bottom-k: most negative first ([] per query: off)
    kernels: dict[str, str] = field(default_factory=dict)
    # --damping-check: per scale ("0.1x", "10x"), each query's top-k overlap (share of its top-k
    # also in the top-k at that damping, among the same scored sequences): [Q] floats
    damping_overlap: dict[str, list[float]] | None = None
    query_tokens: list[list[tuple[str, float | None]]] | None = None  # Scorer.query_tokens (--per-token)
    batch_sizes: list[int] = field(default_factory=list)  # what the scoring passes ran at (budget.within_memory)

    @property
    def ranked(self) -> list[list[TopEntry]]:
        """Each query's top-k entries, then its bottom-k ones (the entries token scores are attached to)."""
        return [top + bottom for top, bottom in zip(self.top, self.bottom or [[]] * len(self.top), strict=True)]


@dataclass
class PreparedQueries:
    """The queries' preconditioned gradients per module, in each module's kernel representation."""

    modules: dict[str, ModuleQueries]

    @property
    def n_queries(self) -> int:
        return next(iter(self.modules.values())).n_queries

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, module_queries in self.modules.items():
            tensors.update(module_queries.to_tensors(name))
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], names: Sequence[str]) -> PreparedQueries:
        return cls({name: ModuleQueries.from_tensors(name, tensors) for name in names})


@dataclass
class QueryFactors:
    """One module's query gradients as per-token factors: for each query batch, the positions of
    its queries [B] and its capture (s [B, N, d_out], a [B, N, d_in]: ∇ = sᵀ a per query)."""

    n_queries: int
    parts: list[tuple[torch.Tensor, ModuleCapture]] = field(default_factory=list)

    def rotated(self, gradient_basis: torch.Tensor | None, activation_basis: torch.Tensor | None) -> torch.Tensor:
        """Q_Sᵀ ∇ Q_A per query: [Q, d_out, d_in] (no basis: ∇ itself), in the captures' dtype."""
        gradients = None
        for indices, module_capture in self.parts:
            rotated = rotated_per_sequence_gradients(module_capture, gradient_basis, activation_basis)
            if gradients is None:
                gradients = rotated.new_zeros((self.n_queries, *rotated.shape[1:]))
            gradients[indices] = rotated
        return gradients

    def gradients(self) -> torch.Tensor:
        """∇ per query, materialised in the parameter basis: [Q, d_out, d_in]."""
        return self.rotated(None, None)


@dataclass
class ShardScores:
    """One shard's scores: per_module float64 [M, Q, n] (self-influence: [n]) and the sequences'
    global indices [n] (ascending: shards hold consecutive sequences); with --damping-check, the
    totals at the other dampings, float64 [len(DAMPING_CHECK_SCALES), Q, n] (`joined` splits them off
    the rows `Scorer.score` computes: [M, C·Q, n]); `batch_sizes`: the batch sizes its passes ran at."""

    scores: torch.Tensor
    index: torch.Tensor
    alternates: torch.Tensor | None = None
    batch_sizes: set[int] = field(default_factory=set)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"scores": self.scores.contiguous(), "index": self.index.contiguous()}
        if self.alternates is not None:
            tensors["alternates"] = self.alternates.contiguous()
        if self.batch_sizes:
            tensors["batch_sizes"] = torch.tensor(sorted(self.batch_sizes), dtype=torch.int64)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ShardScores:
        batch_sizes = set(tensors["batch_sizes"].tolist()) if "batch_sizes" in tensors else set()
        return cls(tensors["scores"], tensors["index"], tensors.get("alternates"), batch_sizes)


def joined(groups: Sequence[ShardScores], damping_check: bool = False) -> ShardScores:
    """One shard's scores from its module groups' (`Scorer.score` of each group, model order): the
    per-module rows side by side [M, C·Q, n], then with `damping_check` the other dampings' totals
    (rows Q.. summed over every module) split off the chosen damping's rows [M, Q, n]."""
    index = groups[0].index
    if any(not torch.equal(group.index, index) for group in groups[1:]):
        raise PreconditionError("the module groups' scores are not of the same sequences")
    per_module = torch.cat([group.scores for group in groups]) if len(groups) > 1 else groups[0].scores
    batch_sizes = set().union(*(group.batch_sizes for group in groups))
    if not damping_check:
        return ShardScores(per_module, index, batch_sizes=batch_sizes)
    n_queries = per_module.shape[1] // (1 + len(DAMPING_CHECK_SCALES))  # rows: the chosen damping first
    alternates = per_module.sum(0)[n_queries:].reshape(len(DAMPING_CHECK_SCALES), n_queries, per_module.shape[-1])
    return ShardScores(per_module[:, :n_queries].contiguous(), index, alternates, batch_sizes)


def concatenate(partials: Sequence[ShardScores], part: str = "scores") -> torch.Tensor:
    """The shards' scores (or `part`: "alternates") side by side in global index order: [..., N];
    every index 0..N-1 once."""
    index = torch.cat([partial.index for partial in partials])
    if not torch.equal(index, torch.arange(index.numel())):
        raise PreconditionError("the shards' scores do not cover the dataset's sequences once each, in order")
    return torch.cat([getattr(partial, part) for partial in partials], dim=-1)


def module_pattern(names: Sequence[str]) -> str:
    """A --modules regex selecting exactly the modules `names` (a factor set's)."""
    return "^(" + "|".join(name.replace(".", r"\.") for name in names) + ")$"


def require_modules(names: Sequence[str], present: set[str]) -> None:
    """PreconditionError unless a model with modules `present` has every module `names` the factors
    were fitted for: another architecture is told so, before module selection could speak of a
    --modules never given."""
    missing = [name for name in names if name not in present]
    if missing:
        raise PreconditionError(
            "factors were fitted for another model (model fingerprint differs: this model has no module "
            f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); refit them for this model"
        )


def require_fingerprint(factors: FactorSet, fingerprint: str) -> None:
    """PreconditionError unless the model of `fingerprint` (model_io.model_fingerprint over the
    factors' modules) is the one the factors were fitted for (factors that recorded none pass)."""
    if factors.model_fingerprint and fingerprint != factors.model_fingerprint:
        raise PreconditionError(
            "factors were fitted for another model (model fingerprint differs); refit them for this model"
        )


def plan_model_score(
    model: nn.Module, names: Sequence[str], config: ScoreConfig, n_queries: int, budget: WorkerBudget
) -> MemoryPlan:
    """The module groups and batch size of a score of `n_queries` queries against factors of the
    modules `names` of `model` under `budget` (budget.plan_score): from the modules' shapes alone,
    so `model` may be a skeleton on the meta device (model_io.model_skeleton). Factors of modules
    the skeleton lacks (an adapter's LoRA matrices exist only once peft applies them; another
    model's, which the Scorer refuses) are planned as one group at the requested batch size."""
    if not set(names) <= module_names(model):
        return MemoryPlan([list(names)], config.batch_size, budget)
    tracked = describe_all(select_modules(model, module_pattern(names)))
    weights, vocab = weights_and_vocab(model)
    rows = n_queries * (1 + len(DAMPING_CHECK_SCALES) if config.damping_check else 1)
    return plan_score(tracked, weights, budget, config.batch_size, config.max_length, vocab, rows)


class Scorer:
    """A model ready to be scored against a factor set (see the module docstring): the factors'
    modules selected in model order, their weights checked, the model's fingerprint matched to
    the factors'. Built once per task. `group`: the module group it computes (names, model order;
    None: every module of the factors); `batch_size`: what its passes run with (the plan's,
    budget.py; default the config's)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        factors: FactorSet,
        config: ScoreConfig,
        group: Sequence[str] | None = None,
        batch_size: int | None = None,
    ):
        config.validate()
        self.model, self.tokenizer, self.factors, self.config = model, tokenizer, factors, config
        require_modules(list(factors.modules), module_names(model))
        self.modules, _ = prepare_model(model, module_pattern(list(factors.modules)))
        require_fingerprint(factors, cached_fingerprint(model, list(self.modules)))
        self.all_names = list(self.modules)  # model order: the row order of per-module scores
        if group is not None:
            unknown = [name for name in group if name not in self.modules]
            if unknown:
                raise InputError(f"module group names modules the factors do not have: {', '.join(unknown[:3])}")
            self.modules = {name: self.modules[name] for name in self.all_names if name in set(group)}
        self.names = list(self.modules)  # the group's (all_names without a group)
        self.batch_size = batch_size or config.batch_size
        self.batch_sizes: set[int] = set()  # what the passes ran at (a lowered one after out-of-memory)
        self.dtype = accumulation_dtype(next(model.parameters()).dtype)
        self.device = device_of(model)
        self.pad_token_id = tokenizer.pad_token_id

    @cached_property
    def preconditioners(self) -> dict[str, Preconditioner]:
        """Each module's preconditioner (λ, Λ + λ, bases in the scoring dtype), prepared on the host
        from the factors and placed on the model's device: once per Scorer, when first needed."""
        return self._preconditioners_at(self.config.damping_policy)

    def _preconditioners_at(self, damping: Damping) -> dict[str, Preconditioner]:
        strategy = self.factors.strategy
        return {
            name: to_device(preconditioner(self.factors.factors[name], strategy, damping, self.dtype), self.device)
            for name in self.names
        }

    def curvatures(self) -> list[dict[str, Preconditioner]]:
        """The preconditioners queries are prepared with: the chosen damping's, then (--damping-check)
        those at DAMPING_CHECK_SCALES x it, from the same factors."""
        if not self.config.damping_check:
            return [self.preconditioners]
        policy = self.config.damping_policy
        return [self.preconditioners, *(self._preconditioners_at(policy.scaled(s)) for s in DAMPING_CHECK_SCALES)]

    def for_group(self, group: Sequence[str]) -> Scorer:
        """This model and factor set scored for module group `group` alone (names, model order)."""
        return Scorer(self.model, self.tokenizer, self.factors, self.config, group, self.batch_size)

    def tokenize_training(self, examples: Sequence[TrainingExample]) -> list[TokenizedSequence]:
        if not examples:
            raise InputError("no training examples to score")
        return tokenize_training(self.tokenizer, examples, self.config.max_length)

    def _passes(self, sequences, stage: str, progress: Progress | None, batch_size: int, subject=None):
        extra = {"subject": subject} if subject else {}
        return captured_batches(
            self.model,
            self.modules,
            sequences,
            batch_size=batch_size,
            pad_token_id=self.pad_token_id,
            stage=stage,
            progress=progress,
            **extra,
        )

    def _within_memory(self, run: Callable[[int], object], stage: str):
        """`run(batch_size)` under the budget's out-of-memory rule (budget.within_memory); the batch
        size it ran at is kept for the later passes and recorded."""
        result, self.batch_size = within_memory(run, self.batch_size, stage, self.device)
        self.batch_sizes.add(self.batch_size)
        return result

    @exact_arithmetic()
    def query_factors(self, queries: Sequence[Query], progress: Progress | None = None) -> dict[str, QueryFactors]:
        """∇ log p(completion | prompt) per query and module as per-token factors (the captures of
        the query batches, on the model's device): a query has tens of tokens, so its gradient is
        kept as the sum of tens of outer products and never materialised in the parameter basis."""
        if not queries:
            raise InputError("no queries to score")
        sequences = tokenize_queries(self.tokenizer, queries, self.config.max_length)

        def run(batch_size: int) -> dict[str, QueryFactors]:
            factors = {name: QueryFactors(len(sequences)) for name in self.names}
            for batch, captures in self._passes(sequences, "queries", progress, batch_size, subject=QUERY):
                for name, module_capture in captures.items():
                    factors[name].parts.append((batch.indices.to(self.device), module_capture))
            return factors

        return self._within_memory(run, "query")

    def rotated_query_gradients(self, name: str, factors: QueryFactors) -> torch.Tensor:
        """G̃ = Q_Sᵀ ∇ Q_A of every query for module `name`: [Q, d_out, d_in] on the model's device,
        each batch's per-token factors rotated in the cheapest order for its length (rotation.py;
        2·T·(d_out² + d_in²) per query instead of 2·d_out·d_in·(d_out + d_in) for a materialised
        gradient). Without a basis (diagonal, identity): the gradient itself."""
        curvature = self.preconditioners[name]
        return factors.rotated(curvature.gradient_basis, curvature.activation_basis)

    @exact_arithmetic()
    @torch.no_grad()
    def query_tokens(self, queries: Sequence[Query]) -> list[list[tuple[str, float | None]]]:
        """Each query's tokens as scored (prompt, then completion) with the log-probability the model
        gives each completion token, log p(token t | tokens before t) in nats (None on prompt tokens,
        which are not targets). One forward per query, on the model's device."""
        tokens = []
        for sequence in tokenize_queries(self.tokenizer, queries, self.config.max_length):
            ids = sequence.input_ids.to(self.device)  # [T]
            logits = self.model(input_ids=ids.unsqueeze(0)).logits[0, :-1].to(torch.float64)  # [T - 1, V]
            # position t predicts token t + 1: its log-probability belongs to the predicted token
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, ids[1:, None])[:, 0].to("cpu").tolist()
            targets = sequence.target_mask.tolist()
            names = self.tokenizer.convert_ids_to_tokens(sequence.input_ids.tolist())
            tokens.append([(str(name), logprobs[t - 1] if targets[t] else None) for t, name in enumerate(names)])
        return tokens

    def prepare(
        self, queries: Sequence[Query], mean_tokens: float, progress: Progress | None = None
    ) -> PreparedQueries:
        """Query gradients, preconditioned once, each module's kernel planned for training sequences
        of `mean_tokens` tokens on average (scoring.py), for scoring a whole corpus (settled: in the
        parameter basis)."""
        factors = self.query_factors(queries, progress)
        return PreparedQueries(
            {
                name: self._settled(name, self.prepare_module(name, factors.pop(name), mean_tokens), None, mean_tokens)
                for name in self.names
            }
        )

    @exact_arithmetic()
    def prepare_module(self, name: str, factors: QueryFactors | torch.Tensor, mean_tokens: float) -> ModuleQueries:
        """One module's prepared queries from its query factors (or its rotated query gradients
        G̃ [Q, d_out, d_in], `rotated_query_gradients`): P̃ = G̃ ⊘ (Λ + λ) in the eigenbasis, then
        its low-rank factors rotated back (--query-rank, kernel planned for `mean_tokens`), or P̃
        itself, kept in the eigenbasis until `settle` knows how many sequences it will score. On
        the model's device."""
        rotated = factors if isinstance(factors, torch.Tensor) else self.rotated_query_gradients(name, factors)
        curvature = self.preconditioners[name]
        # [C·Q, d_out, d_in]: the queries at each damping, the chosen one first (C = 1 without
        # --damping-check); every damping shares the factors' eigenbasis
        preconditioned = torch.cat([divided(rotated, c[name], self.dtype) for c in self.curvatures()])
        require_finite(preconditioned, f"the preconditioned query gradients of module {name}", "damping too small?")
        basis = (curvature.gradient_basis, curvature.activation_basis)
        if self.config.query_rank:
            left, right = low_rank(preconditioned, self.config.query_rank)  # of P̃: rotated back, of P
            if basis[0] is not None:
                left, right = basis[0] @ left, basis[1] @ right
            return plan_module_queries(preconditioned, (left, right), mean_tokens, self.dtype)
        if basis[0] is None:
            return plan_module_queries(preconditioned, None, mean_tokens, self.dtype)
        n_queries = preconditioned.shape[0]
        return ModuleQueries(n_queries, None, full=preconditioned.reshape(n_queries, -1), eigenbasis=True)

    @exact_arithmetic()
    def settle(self, prepared: PreparedQueries, sequences: int | None, mean_tokens: float) -> PreparedQueries:
        """The prepared queries placed on the model's device, each module's full-rank queries in
        the eigenbasis rotated back to the parameter basis where that costs less than rotating
        `sequences` training sequences of `mean_tokens` tokens to meet them (Q·d_out·d_in·(d_out +
        d_in) once against the cheapest per-sequence rotation, rotation.py; None: a whole corpus,
        always rotated back)."""
        prepared = to_device(prepared, self.device)
        return PreparedQueries(
            {name: self._settled(name, queries, sequences, mean_tokens) for name, queries in prepared.modules.items()}
        )

    def _settled(self, name: str, queries: ModuleQueries, sequences: int | None, mean_tokens: float) -> ModuleQueries:
        if not queries.eigenbasis:
            return queries
        curvature = self.preconditioners[name]
        q_s, q_a = curvature.gradient_basis, curvature.activation_basis
        d_out, d_in = q_s.shape[0], q_a.shape[0]
        back = queries.n_queries * d_out * d_in * (d_out + d_in)
        tokens = max(1, math.ceil(mean_tokens))
        if sequences is not None and sequences * min(rotation_costs(tokens, d_out, d_in).values()) < back:
            return queries
        full = rotate(queries.full.reshape(-1, d_out, d_in), q_s.T, q_a.T)
        return ModuleQueries(queries.n_queries, None, full=full.reshape(queries.n_queries, -1))

    @exact_arithmetic()
    def score(
        self,
        prepared: PreparedQueries,
        sequences: Sequence[TokenizedSequence],
        progress: Progress | None = None,
        mask: torch.Tensor | None = None,
    ) -> ShardScores:
        """Per-module scores of every prepared query against `sequences` (any shard of the data),
        for this Scorer's modules (its group's): float64 [M, C·Q, len(sequences)] (C = 3 with
        --damping-check: `joined` splits those rows off), column j for sequences[j]. With `mask`
        [Q, N] (bool over global indices, on the host: the sequences each query scores,
        `lexical_mask`), just the sequences some query asks for are computed; the other columns
        are 0. `prepared` may be anywhere (e.g. read from the store): it is placed on the model's
        device here."""
        prepared = to_device(prepared, self.device)
        column = {sequence.index: position for position, sequence in enumerate(sequences)}
        wanted = None if mask is None else mask.any(0)  # [N] bool: some query scores the sequence
        scored = sequences if wanted is None else [sequence for sequence in sequences if bool(wanted[sequence.index])]

        def run(batch_size: int) -> torch.Tensor:
            per_module = torch.zeros((len(self.names), prepared.n_queries, len(sequences)), dtype=torch.float64)
            for batch, captures in self._passes(scored, "scores", progress, batch_size):
                columns = torch.tensor([column[int(index)] for index in batch.indices])
                for position, name in enumerate(self.names):
                    scores = module_scores(captures[name], prepared.modules[name], self._basis(name))
                    per_module[position][:, columns] = scores.to("cpu", torch.float64)
            return per_module

        per_module = self._within_memory(run, "score")
        _check_scores(per_module, sequences, self.names)
        index = torch.tensor([sequence.index for sequence in sequences])
        return ShardScores(per_module, index, batch_sizes={self.batch_size})

    def _basis(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        curvature = self.preconditioners[name]
        return curvature.gradient_basis, curvature.activation_basis

    def lexical_mask(self, queries: Sequence[Query], sequences: Sequence[TokenizedSequence]) -> torch.Tensor | None:
        """[Q, len(sequences)] bool: each query's candidates among `sequences` (the whole data, whose
        document frequencies it needs, in global index order) by the config's lexical pre-filter
        (`config.lexical`: BM25 or TF-IDF, engine/lexical.py); None without one (every sequence is scored)."""
        if self.config.lexical is None:
            return None
        method, k = self.config.lexical
        mask = torch.zeros(len(queries), len(sequences), dtype=torch.bool)
        for query, columns in enumerate(self.lexical_candidates(method, queries, sequences, k)):
            mask[query, columns] = True
        return mask

    def lexical_candidates(
        self, method: str, queries: Sequence[Query], sequences: Sequence[TokenizedSequence], k: int
    ) -> list[list[int]]:
        """Each query's k best positions in `sequences` by `method` ("bm25" or "tfidf",
        engine/lexical.py), ascending; a query read as its prompt ⊕ completion tokens."""
        query_sequences = tokenize_queries(self.tokenizer, queries, self.config.max_length)
        return lexical_candidates(method, query_sequences, sequences, k)

    def bm25_candidates(self, bm25: Bm25Index, queries: Sequence[Query], k: int) -> list[list[int]]:
        """Each query's k best positions by a BM25 built before (over an index's sequences, kept
        on the worker), ascending: `lexical_candidates("bm25", ...)` without building it again."""
        return bm25.candidates(tokenize_queries(self.tokenizer, queries, self.config.max_length), k)

    @exact_arithmetic()
    def token_scores(
        self,
        sequence: TokenizedSequence,
        prepared: PreparedQueries,
        queries: Sequence[int],
        so_far: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Per-token attribution of one training sequence to the given queries: float64 [len(queries), T]
        on the host (`prepared` placed on the model's device here), summed over this Scorer's
        modules in model order, each query's sum continuing `so_far` (an earlier module group's rows
        [T]; None: from 0)."""
        prepared = to_device(prepared, self.device)
        batch = collate([sequence], self.pad_token_id).to(self.device)
        captures = capture(self.model, self.modules, batch, "true")
        so_far = so_far or [None] * len(queries)
        rows = [
            sum(
                (
                    module_token_scores(captures[name], 0, prepared.modules[name], query, self._basis(name)).to(
                        "cpu", torch.float64
                    )[: sequence.length]
                    for name in self.names
                ),
                start if start is not None else 0,
            )
            for query, start in zip(queries, so_far, strict=True)
        ]
        if not rows:
            return torch.zeros(0, sequence.length, dtype=torch.float64)
        return torch.stack(rows)

    def attach_token_scores(
        self,
        prepared: PreparedQueries,
        top: list[list[TopEntry]],
        sequence_of: Callable[[int], TokenizedSequence],
        progress: Progress | None = None,
    ) -> None:
        """Fill each top-k entry's tokens and token scores; each distinct training sequence is
        recomputed once, for all queries that rank it. `prepared` is placed on the model's device
        once, here. Entries that hold token scores already (an earlier module group's) get this
        group's added, module by module in model order."""
        prepared = to_device(prepared, self.device)
        progress = progress or Progress()
        wanted = sorted({entry.index for entries in top for entry in entries})
        progress.stage("token scores", len(wanted), "sequence")
        for index in wanted:
            progress.check_cancelled()
            sequence = sequence_of(index)
            asking = [(query, entry) for query, entries in enumerate(top) for entry in entries if entry.index == index]
            so_far = [
                None if entry.token_scores is None else torch.tensor(entry.token_scores, dtype=torch.float64)
                for _, entry in asking
            ]
            rows = self.token_scores(sequence, prepared, [query for query, _ in asking], so_far)
            require_finite(rows, f"the token scores of training sequence {index + 1} (in file order)")
            tokens = [str(token) for token in self.tokenizer.convert_ids_to_tokens(sequence.input_ids.tolist())]
            for row, (_, entry) in zip(rows, asking, strict=True):
                entry.tokens = tokens
                entry.token_scores = row.tolist()
            progress.advance(1, sequence.length)

    @exact_arithmetic()
    def self_influence(self, sequences: Sequence[TokenizedSequence], progress: Progress | None = None) -> ShardScores:
        """⟨P_m, DW_m⟩ for `sequences` (any shard): float64 [len(sequences)], in list order. The
        scores add up on the model's device and reach the host once, after the pass."""
        column = {sequence.index: position for position, sequence in enumerate(sequences)}

        def run(batch_size: int) -> torch.Tensor:
            scores = torch.zeros(len(sequences), dtype=torch.float64, device=self.device)
            for batch, captures in self._passes(sequences, "self", progress, batch_size):
                columns = host_to_device(torch.tensor([column[int(index)] for index in batch.indices]), self.device)
                for name, module_capture in captures.items():
                    curvature = self.preconditioners[name]
                    rotated = rotated_per_sequence_gradients(
                        module_capture, curvature.gradient_basis, curvature.activation_basis
                    )
                    scores[columns] += self_influence_terms(rotated, curvature)
            return scores.to("cpu")

        scores = self._within_memory(run, "self-influence")
        _check_scores(scores, sequences, self.names)
        index = torch.tensor([sequence.index for sequence in sequences])
        return ShardScores(scores, index, batch_sizes={self.batch_size})


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


def merge(
    partials: Sequence[ShardScores], names: list[str], config: ScoreConfig, mask: torch.Tensor | None = None
) -> ScoreResult:
    """The shards' scores as one result (no model needed): totals, and the top-k per query. With
    `mask` [Q, N] (bool: which sequences each query scored, e.g. its lexical candidates), the others
    are 0 in the result and never in a top-k. `names`: the per-module rows' modules (Scorer.names).
    Token-wise attribution of the top-k is the Scorer's (`attach_token_scores`: it needs the model)."""
    per_module = concatenate(partials)  # [M, Q, N]
    if mask is not None:
        per_module = per_module * mask
    scores = per_module.sum(0)
    result = ScoreResult(
        scores=scores.to(torch.float32),
        module_names=names,
        per_module=per_module.to(torch.float32) if config.per_module else None,
        batch_sizes=sorted(set().union(*(partial.batch_sizes for partial in partials))),
    )
    ranked = scores if mask is None else scores.masked_fill(~mask, float("-inf"))
    result.top = top_k_entries(ranked, per_module if config.per_module else None, names, config.top_k)
    if config.bottom_k:
        lowest = scores if mask is None else scores.masked_fill(~mask, float("inf"))
        result.bottom = top_k_entries(
            lowest, per_module if config.per_module else None, names, config.bottom_k, largest=False
        )
    if partials and partials[0].alternates is not None:
        result.damping_overlap = damping_overlap(ranked, concatenate(partials, "alternates"), mask, config.top_k)
    return result


def damping_overlap(
    ranked: torch.Tensor, alternates: torch.Tensor, mask: torch.Tensor | None, k: int
) -> dict[str, list[float]]:
    """How much each query's top-k moves with the damping: per scale of DAMPING_CHECK_SCALES, the
    share of the top-k (by `ranked` [Q, N], -inf where not scored) that is also in the top-k by
    that damping's totals (`alternates` [S, Q, N], the same sequences scored). Ties by index."""
    k = min(k, ranked.shape[1])
    if mask is not None:
        k = min(k, int(mask.sum(1).min()))
    if k == 0:
        return {f"{scale:g}x": [1.0] * ranked.shape[0] for scale in DAMPING_CHECK_SCALES}

    def top(scores: torch.Tensor) -> torch.Tensor:
        return torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]

    chosen = top(ranked)
    overlap = {}
    for scale, other in zip(DAMPING_CHECK_SCALES, alternates, strict=True):
        other = other if mask is None else other.masked_fill(~mask, float("-inf"))
        moved = top(other)
        overlap[f"{scale:g}x"] = [
            len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(chosen, moved, strict=True)
        ]
    return overlap


def top_k_entries(
    scores: torch.Tensor, per_module: torch.Tensor | None, names: list[str], k: int, largest: bool = True
) -> list[list[TopEntry]]:
    """The k highest-scoring training sequences per query, highest first, or with largest=False the
    k lowest, lowest first (entries scored -inf, resp. +inf, i.e. not scored, never rank).
    scores: [Q, N]; per_module: [M, Q, N]."""
    k = min(k, scores.shape[1])
    unscored = float("-inf") if largest else float("inf")
    top = []
    for query in range(scores.shape[0]):
        if k:
            values, indices = torch.topk(scores[query], k, largest=largest)
        else:
            values, indices = torch.empty(0), torch.empty(0, dtype=torch.long)
        entries = []
        for value, index in zip(values.tolist(), indices.tolist(), strict=True):
            if value == unscored:
                break
            breakdown = None
            if per_module is not None:
                breakdown = {name: float(per_module[m, query, index]) for m, name in enumerate(names)}
            entries.append(TopEntry(index=index, score=float(value), per_module=breakdown))
        top.append(entries)
    return top


def mean_length(sequences: Sequence[TokenizedSequence]) -> float:
    return sum(sequence.length for sequence in sequences) / max(len(sequences), 1)


@dataclass
class InMemoryScores:
    """What `score_in_memory` produced: the result and what was merged into it."""

    result: ScoreResult
    partial: ShardScores  # float64 [M, Q, N] per-module scores, before the mask (0 for sequences no query scores)
    mask: torch.Tensor | None  # [Q, N] bool: the sequences each query scored (its lexical candidates); None: all


def score_in_memory(
    scorer: Scorer,
    queries: Sequence[Query],
    sequences: Sequence[TokenizedSequence],
    progress: Progress | None = None,
    groups: Sequence[Sequence[str]] | None = None,
) -> InMemoryScores:
    """The steps above on one shard, chained in memory: `sequences` are the whole data (global
    indices 0..N-1 in order); the queries are prepared for their mean length, and the prepared
    queries, a score job's largest intermediate, never leave memory. In module `groups` (model
    order; default one of every module) each group's queries are prepared and scored and let go
    before the next group's (prepared once more for --per-token), the same numbers as one group."""
    mean_tokens = mean_length(sequences)
    mask = scorer.lexical_mask(queries, sequences)
    scorers = [scorer] if not groups else [scorer.for_group(group) for group in groups]
    parts, kernels, kept = [], {}, None
    for group in scorers:
        prepared = group.prepare(queries, mean_tokens, progress)
        parts.append(group.score(prepared, sequences, progress, mask))
        kernels.update({name: prepared.modules[name].kernel for name in group.names})
        kept = prepared if len(scorers) == 1 else None  # one group's is attributed without preparing again
    partial = joined(parts, scorer.config.damping_check)
    result = merge([partial], scorer.all_names, scorer.config, mask)
    if scorer.config.per_token and scorer.config.top_k:
        for group in scorers:
            prepared = kept or group.prepare(queries, mean_tokens, progress)
            group.attach_token_scores(prepared, result.ranked, sequences.__getitem__, progress)
    result.kernels = kernels
    return InMemoryScores(result, partial, mask)


def merge_self_influence(partials: Sequence[ShardScores]) -> torch.Tensor:
    """The shards' self-influence as one vector: float32 [N], in global index order."""
    return concatenate(partials).to(torch.float32)


def compute_scores(
    model: nn.Module,
    tokenizer,
    factors: FactorSet,
    examples: Sequence[TrainingExample],
    queries: Sequence[Query],
    config: ScoreConfig | None = None,
    progress: Progress | None = None,
) -> ScoreResult:
    """Pairwise influence scores [n_queries, n_train] plus top-k: `score_in_memory` on the whole data."""
    progress = progress or Progress()
    scorer = Scorer(model, tokenizer, factors, config or ScoreConfig())
    if not queries:
        raise InputError("no queries to score")
    result = score_in_memory(scorer, queries, scorer.tokenize_training(examples), progress).result
    progress.close()
    return result


def compute_self_influence(
    model: nn.Module,
    tokenizer,
    factors: FactorSet,
    examples: Sequence[TrainingExample],
    config: ScoreConfig | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """⟨P_m, DW_m⟩ for every training sequence: [n_train] float32 (the steps above, the data as one shard)."""
    progress = progress or Progress()
    scorer = Scorer(model, tokenizer, factors, config or ScoreConfig())
    scores = merge_self_influence([scorer.self_influence(scorer.tokenize_training(examples), progress)])
    progress.close()
    return scores
