"""Curvature factors of the tracked modules and the accumulators that build them.

For a tracked module W ∈ R^{d_out × d_in} (d_in includes the bias coordinate) and sequences m:
    A = Σ_tokens a aᵀ / n_tokens                 activation covariance      [d_in, d_in]
    S = Σ_tokens s sᵀ / n_sequences              output-gradient covariance [d_out, d_out]
    A = Q_A diag(λ_A) Q_Aᵀ,  S = Q_S diag(λ_S) Q_Sᵀ   (float64 eigendecomposition)
so that, if tokens were independent, the per-sequence Fisher E_m[vec DW_m vec DW_mᵀ] ≈ A ⊗ S.
Every strategy (strategies.py) is "an eigenbasis + a diagonal Λ [d_out, d_in]"; `combine` builds
each module's factors from what the passes produced.

Accumulators hold unnormalised sums in float64 plus counts, so partial sums over data shards can
be added in any order (`merge`, `reduce`) and normalised once: `CovarianceAccumulator.eigendecompose`
gives the `Eigenbases`, `CorrectionAccumulator.eigenvalues` the corrected Λ.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from .capture import ModuleCapture
from .finite import require_finite
from .modules import TrackedModule
from .progress import Progress
from .resources import single_threaded_torch
from .strategies import Strategy, get_strategy


@dataclass
class ModuleFactors:
    """Factors of one module: exactly what preconditioning needs, per strategy (strategies.py).

        ekfac:     Q_A, Q_S and the corrected Λ
        kfac:      Q_A, Q_S, λ_A and λ_S (Λ = λ_S λ_Aᵀ is formed when used: d_out + d_in numbers stored
                   instead of d_out·d_in)
        diagonal:  Λ
        identity:  nothing
    The covariances A and S are never kept: once eigendecomposed, nothing reads them.
    """

    eigenvalues: torch.Tensor | None = None  # Λ: [d_out, d_in]
    activation_eigenvectors: torch.Tensor | None = None  # Q_A: [d_in, d_in]
    gradient_eigenvectors: torch.Tensor | None = None  # Q_S: [d_out, d_out]
    activation_eigenvalues: torch.Tensor | None = None  # λ_A: [d_in]
    gradient_eigenvalues: torch.Tensor | None = None  # λ_S: [d_out]

    TENSOR_FIELDS = (
        "eigenvalues",
        "activation_eigenvectors",
        "gradient_eigenvectors",
        "activation_eigenvalues",
        "gradient_eigenvalues",
    )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.TENSOR_FIELDS if getattr(self, name) is not None}

    @property
    def has_basis(self) -> bool:
        return self.gradient_eigenvectors is not None

    def diagonal(self) -> torch.Tensor:
        """Λ [d_out, d_in] in float64: stored (ekfac, diagonal) or λ_S λ_Aᵀ (kfac)."""
        if self.eigenvalues is not None:
            return self.eigenvalues.to(torch.float64)
        return torch.outer(self.gradient_eigenvalues.to(torch.float64), self.activation_eigenvalues.to(torch.float64))


@dataclass
class FactorSet:
    """Everything needed to precondition query gradients for one model."""

    strategy: str
    fisher: str
    modules: dict[str, TrackedModule]
    factors: dict[str, ModuleFactors]
    n_sequences: int = 0
    n_tokens: int = 0
    model_fingerprint: str = ""
    metadata: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Covariance pass


class CovarianceAccumulator:
    """Σ a aᵀ and Σ s sᵀ over real tokens, per module, in float64."""

    def __init__(self, modules: dict[str, TrackedModule], allocate: bool = True):
        self.modules = modules
        self.activation_sums = {
            n: torch.zeros(m.d_in_full, m.d_in_full, dtype=torch.float64) for n, m in modules.items() if allocate
        }
        self.gradient_sums = {
            n: torch.zeros(m.d_out, m.d_out, dtype=torch.float64) for n, m in modules.items() if allocate
        }
        self.token_counts = dict.fromkeys(modules, 0)
        self.n_sequences = 0

    def add(self, captures: dict[str, ModuleCapture], n_sequences: int) -> None:
        """Add one batch. Padding rows of a and s are zero, so plain matmuls skip them."""
        for name, capture in captures.items():
            a = capture.a.reshape(-1, capture.a.shape[-1])  # [B·N, d_in]
            s = capture.s.reshape(-1, capture.s.shape[-1])  # [B·N, d_out]
            accumulate(self.activation_sums[name], gram(a))
            accumulate(self.gradient_sums[name], gram(s))
            self.token_counts[name] += int(capture.token_mask.sum())
        self.n_sequences += n_sequences

    def merge(self, other: CovarianceAccumulator) -> None:
        for name in self.modules:
            self.activation_sums[name] += other.activation_sums[name]
            self.gradient_sums[name] += other.gradient_sums[name]
            self.token_counts[name] += other.token_counts[name]
        self.n_sequences += other.n_sequences

    def check_finite(self) -> None:
        """NonFiniteError naming the first module whose sums hold NaN or Inf."""
        for name in self.modules:
            for kind, sums in (("activation", self.activation_sums), ("output-gradient", self.gradient_sums)):
                require_finite(
                    sums[name],
                    f"the {kind} covariance of module {name} (covariance pass)",
                    "the model produces non-finite activations or gradients on this data",
                )

    def state(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict (for safetensors): counts, and each symmetric sum as its upper triangle
        (row-major, [d(d+1)/2]): half the bytes of a partial sum through the store."""
        state = {"n_sequences": torch.tensor([self.n_sequences], dtype=torch.int64)}
        for name in self.modules:
            state[f"{name}/activation_sum_upper"] = upper_triangle(self.activation_sums[name])
            state[f"{name}/gradient_sum_upper"] = upper_triangle(self.gradient_sums[name])
            state[f"{name}/token_count"] = torch.tensor([self.token_counts[name]], dtype=torch.int64)
        return state

    @classmethod
    def from_state(cls, modules: dict[str, TrackedModule], state: dict[str, torch.Tensor]) -> CovarianceAccumulator:
        accumulator = cls(modules, allocate=False)
        accumulator.n_sequences = int(state["n_sequences"][0])
        for name, module in modules.items():
            accumulator.activation_sums[name] = symmetric_from_upper(
                state[f"{name}/activation_sum_upper"].to(torch.float64), module.d_in_full
            )
            accumulator.gradient_sums[name] = symmetric_from_upper(
                state[f"{name}/gradient_sum_upper"].to(torch.float64), module.d_out
            )
            accumulator.token_counts[name] = int(state[f"{name}/token_count"][0])
        return accumulator

    def eigendecompose(
        self, progress: Progress | None = None, workers: int | None = None, dtype: torch.dtype = torch.float64
    ) -> Eigenbases:
        """Normalise and eigendecompose A and S (float64), module by module, keeping the result in
        `dtype`. Each module's sums are freed as soon as it is done, so the float64 work never
        holds more than `workers` modules beyond the sums themselves.

        LAPACK's symmetric eigensolver scales badly across threads on small CPUs (measured on 2
        cores: a 1536² eigh takes 1.3 s on one thread and 2.4 s on two), so the modules are
        spread over `workers` threads (default: the threads torch may use here) that each run one thread."""
        progress = progress or Progress()
        names = list(self.modules)
        progress.stage("eigendecomposition", len(names), "module")

        def one(name: str) -> tuple[str, ModuleFactors]:
            activation = self.activation_sums.pop(name) / max(self.token_counts[name], 1)
            gradient = self.gradient_sums.pop(name) / max(self.n_sequences, 1)
            activation_eigenvalues, activation_eigenvectors = symmetric_eigh(activation)
            del activation
            gradient_eigenvalues, gradient_eigenvectors = symmetric_eigh(gradient)
            del gradient
            factors = ModuleFactors(
                activation_eigenvectors=activation_eigenvectors.to(dtype),
                gradient_eigenvectors=gradient_eigenvectors.to(dtype),
                activation_eigenvalues=activation_eigenvalues.to(dtype),
                gradient_eigenvalues=gradient_eigenvalues.to(dtype),
            )
            for label, value in factors.tensors().items():
                require_finite(value, f"the {label.replace('_', ' ')} of module {name} (eigendecomposition)")
            return name, factors

        factors: dict[str, ModuleFactors] = {}
        workers = max(1, min(workers or torch.get_num_threads(), len(names)))
        with single_threaded_torch(), ThreadPoolExecutor(workers, thread_name_prefix="eigh") as pool:
            for name, module_factors in pool.map(one, names):
                progress.check_cancelled()
                factors[name] = module_factors
                progress.advance(1, 0)
        n_tokens = max(self.token_counts.values(), default=0)
        return Eigenbases({name: factors[name] for name in names}, n_tokens=n_tokens)


@dataclass
class Eigenbases:
    """The covariance pass over all the data, eigendecomposed: per module Q_A, Q_S, λ_A, λ_S
    (a ModuleFactors without Λ), and the number of tokens it saw."""

    factors: dict[str, ModuleFactors]
    n_tokens: int

    def bases(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(Q_S, Q_A) per module: the basis the correction pass measures Λ in."""
        return {name: (f.gradient_eigenvectors, f.activation_eigenvectors) for name, f in self.factors.items()}

    def to_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Flat tensors in `dtype` (the factor set's storage dtype, which the correction rotates in):
        "{module}/{field}" and "n_tokens"."""
        tensors = {
            f"{name}/{key}": value.to(dtype).contiguous()
            for name, factors in self.factors.items()
            for key, value in factors.tensors().items()
        }
        tensors["n_tokens"] = torch.tensor([self.n_tokens])
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], modules: Iterable[str]) -> Eigenbases:
        factors = {
            name: ModuleFactors(
                **{key: tensors[f"{name}/{key}"] for key in ModuleFactors.TENSOR_FIELDS if f"{name}/{key}" in tensors}
            )
            for name in modules
        }
        return cls(factors, int(tensors["n_tokens"][0]))


def accumulate(total: torch.Tensor, value: torch.Tensor) -> None:
    """total += value, with total a float64 CPU sum: the cast is fused into the add (no float64
    copy of value), and a device value is copied to the CPU once."""
    total.add_(value if value.device == total.device else value.to(total.device))


def gram(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """xᵀx: [n, d] -> [d, d], exactly symmetric.

    For d ≥ 2·block only the blocks on and above the diagonal are multiplied and the rest is
    mirrored: ≈ (k+1)/2k of the multiply-adds for k blocks (0.56 at d = 1024, block 128), with
    each block still a large GEMM. Below that one GEMM is faster.
    """
    d = x.shape[1]
    if d < 2 * block:
        return x.T @ x
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    for start in range(0, d, block):
        stop = min(start + block, d)
        rows = x[:, start:stop].T @ x[:, start:]  # [stop - start, d - start]
        out[start:stop, start:] = rows
        out[stop:, start:stop] = rows[:, stop - start :].T
    return out


def _upper_mask(d: int, device: torch.device) -> torch.Tensor:
    return torch.ones(d, d, dtype=torch.bool, device=device).triu_()


def upper_triangle(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle of ½(M + Mᵀ), row by row: [d, d] -> [d(d+1)/2]. (Symmetrising first
    keeps exactly what `symmetric_eigh` would use.)"""
    return torch.masked_select(0.5 * (matrix + matrix.T), _upper_mask(matrix.shape[0], matrix.device))


def symmetric_from_upper(upper: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of `upper_triangle`: [d(d+1)/2] -> the symmetric [d, d]."""
    if upper.numel() != d * (d + 1) // 2:
        raise ValueError(f"a packed symmetric {d} x {d} matrix has {d * (d + 1) // 2} entries, got {upper.numel()}")
    mask = _upper_mask(d, upper.device)
    matrix = torch.zeros(d, d, dtype=upper.dtype, device=upper.device).masked_scatter_(mask, upper)
    return torch.where(mask, matrix, matrix.T)


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending, clamped at 0) and eigenvectors of a symmetric PSD matrix, in float64."""
    matrix = matrix.to(torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return eigenvalues.clamp_min(0.0), eigenvectors


# --------------------------------------------------------------------------------------------
# Eigenvalue-correction pass (also the diagonal strategy's only pass)


def rotated_per_sequence_gradients(
    capture: ModuleCapture, gradient_basis: torch.Tensor | None, activation_basis: torch.Tensor | None
) -> torch.Tensor:
    """G̃ = Q_Sᵀ DW Q_A per sequence: [B, d_out, d_in], DW = sᵀ a (s [B, N, d_out], a [B, N, d_in]).

    The four products are associated in the order that costs the fewest multiply-adds for this
    batch's padded length N (`rotation_order`): short sequences rotate their tokens, N·(d_out² +
    d_in²) per sequence; long ones rotate the materialised gradient, d_out·d_in·(d_out + d_in),
    independent of N (3x fewer for a 2,048-token sequence through a 576 x 1536 MLP). With no
    basis (diagonal strategy) it is DW itself.
    """
    s, a = capture.s, capture.a
    if gradient_basis is None:
        return torch.bmm(s.transpose(1, 2), a)
    q_s, q_a = gradient_basis.to(s), activation_basis.to(a)
    return rotate_in_order(s, a, q_s, q_a, rotation_order(s.shape[1], s.shape[2], a.shape[2]))


def rotate(gradient: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """leftᵀ G right for a stack of matrices, as two 2-D matmuls (no broadcast copies).

    gradient: [Q, d_out, d_in]; left: [d_out, d_out]; right: [d_in, d_in] -> [Q, d_out, d_in].
    """
    n, d_out, d_in = gradient.shape
    rotated = (gradient.reshape(n * d_out, d_in) @ right).reshape(n, d_out, d_in)
    rotated = (left.T @ rotated.transpose(0, 1).reshape(d_out, n * d_in)).reshape(d_out, n, d_in)
    return rotated.transpose(0, 1)


ROTATION_ORDERS = ("tokens", "outputs", "inputs", "gradient")


def rotation_order(tokens: int, d_out: int, d_in: int) -> str:
    """The cheapest association of Q_Sᵀ sᵀ a Q_A, by multiply-adds per sequence beyond the
    N·d_out·d_in of the product itself: rotate both token sides ("tokens"), rotate the output side
    and then the product's inputs ("outputs"), the reverse ("inputs"), or neither token side
    ("gradient": rotate sᵀ a)."""
    costs = {
        "tokens": tokens * (d_out * d_out + d_in * d_in),
        "outputs": tokens * d_out * d_out + d_out * d_in * d_in,
        "inputs": tokens * d_in * d_in + d_out * d_out * d_in,
        "gradient": d_out * d_in * (d_out + d_in),
    }
    return min(ROTATION_ORDERS, key=costs.__getitem__)


def rotate_in_order(s: torch.Tensor, a: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor, order: str) -> torch.Tensor:
    """Q_Sᵀ sᵀ a Q_A [B, d_out, d_in] associated as `order` (see `rotation_order`)."""
    if order == "tokens":
        return torch.bmm((s @ q_s).transpose(1, 2), a @ q_a)
    if order == "outputs":
        return torch.bmm((s @ q_s).transpose(1, 2), a) @ q_a
    if order == "inputs":
        return q_s.T @ torch.bmm(s.transpose(1, 2), a @ q_a)
    return rotate(torch.bmm(s.transpose(1, 2), a), q_s, q_a)


class CorrectionAccumulator:
    """Σ_m (Q_Sᵀ DW_m Q_A)^⊙2 per module (or Σ_m DW_m^⊙2 with no basis)."""

    def __init__(self, modules: dict[str, TrackedModule], bases: dict[str, tuple[torch.Tensor, torch.Tensor]] | None):
        self.modules = modules
        self.bases = bases
        self.squared_sums = {n: torch.zeros(m.d_out, m.d_in_full, dtype=torch.float64) for n, m in modules.items()}
        self.n_sequences = 0
        self.n_tokens = 0
        self._device_bases: dict = {}

    def _basis(self, name: str, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.bases is None:
            return None, None
        key = (name, like.device, like.dtype)
        if key not in self._device_bases:
            gradient_basis, activation_basis = self.bases[name]
            self._device_bases[key] = (gradient_basis.to(like), activation_basis.to(like))
        return self._device_bases[key]

    def add(self, captures: dict[str, ModuleCapture], n_sequences: int) -> None:
        for name, capture in captures.items():
            rotated = rotated_per_sequence_gradients(capture, *self._basis(name, capture.a))
            accumulate(self.squared_sums[name], rotated.square_().sum(0))
        self.n_sequences += n_sequences
        self.n_tokens += sequence_tokens(captures)

    def check_finite(self) -> None:
        for name, value in self.squared_sums.items():
            require_finite(
                value,
                f"the eigenvalue-correction sums of module {name} (correction pass)",
                "the model produces non-finite gradients on this data",
            )

    def merge(self, other: CorrectionAccumulator) -> None:
        for name in self.modules:
            self.squared_sums[name] += other.squared_sums[name]
        self.n_sequences += other.n_sequences
        self.n_tokens += other.n_tokens

    def state(self) -> dict[str, torch.Tensor]:
        state = {
            "n_sequences": torch.tensor([self.n_sequences], dtype=torch.int64),
            "n_tokens": torch.tensor([self.n_tokens], dtype=torch.int64),
        }
        state.update({f"{name}/squared_sum": value for name, value in self.squared_sums.items()})
        return state

    @classmethod
    def from_state(cls, modules, bases, state: dict[str, torch.Tensor]) -> CorrectionAccumulator:
        accumulator = cls(modules, bases)
        accumulator.n_sequences = int(state["n_sequences"][0])
        accumulator.n_tokens = int(state["n_tokens"][0])
        for name in modules:
            accumulator.squared_sums[name] = state[f"{name}/squared_sum"].to(torch.float64)
        return accumulator

    def eigenvalues(self) -> dict[str, torch.Tensor]:
        """Λ per module: [d_out, d_in] = mean over sequences."""
        return {name: value / max(self.n_sequences, 1) for name, value in self.squared_sums.items()}


Accumulator = TypeVar("Accumulator", "CovarianceAccumulator", "CorrectionAccumulator")


def reduce(partials: Iterable[Accumulator]) -> Accumulator:
    """The sum of shards' partial accumulators (merged into the first, in the given order)."""
    total = None
    for partial in partials:
        if total is None:
            total = partial
        else:
            total.merge(partial)
    if total is None:
        raise ValueError("nothing to reduce: no partial sums")
    return total


def sequence_tokens(captures: dict[str, ModuleCapture]) -> int:
    """Real tokens of a batch's sequences (one call of the first module's positions)."""
    first = next(iter(captures.values()))
    return int(first.token_mask[:, : first.token_mask.shape[1] // first.calls].sum())


def combine(
    strategy: str | Strategy,
    eigenbases: Eigenbases | None,
    correction: CorrectionAccumulator | None,
    tracked: dict[str, TrackedModule],
) -> dict[str, ModuleFactors]:
    """Each module's factors from what the strategy's passes produced (see ModuleFactors for what
    each strategy keeps): the eigenbasis when there was a covariance pass, with λ_A and λ_S when Λ
    is theirs (K-FAC), and the corrected Λ when there was a correction pass."""
    strategy = get_strategy(strategy)
    corrected = correction.eigenvalues() if strategy.correction else {}
    factors = {}
    for name in tracked:
        module = ModuleFactors()
        if strategy.covariance:
            basis = eigenbases.factors[name]
            module.activation_eigenvectors = basis.activation_eigenvectors
            module.gradient_eigenvectors = basis.gradient_eigenvectors
            if not strategy.correction:
                module.activation_eigenvalues = basis.activation_eigenvalues
                module.gradient_eigenvalues = basis.gradient_eigenvalues
        if strategy.correction:
            module.eigenvalues = corrected[name]
        factors[name] = module
    return factors
