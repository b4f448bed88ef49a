"""The covariance pass's sums and their eigendecomposition: the Kronecker eigenbasis.

For a tracked module W ∈ R^{d_out × d_in} (d_in includes the bias coordinate), over the real
tokens of sequences m, with a [B, N, d_in] and s [B, N, d_out] as captured (capture.py):
    A = Σ_tokens a aᵀ / n_tokens                 activation covariance      [d_in, d_in]
    S = Σ_tokens s sᵀ / n_sequences              output-gradient covariance [d_out, d_out]
    A = Q_A diag(λ_A) Q_Aᵀ,  S = Q_S diag(λ_S) Q_Sᵀ   (float64 eigendecomposition)
so that, if tokens were independent, the per-sequence Fisher E_m[vec DW_m vec DW_mᵀ] ≈ A ⊗ S.

`CovarianceAccumulator` holds the unnormalised float64 sums Σ a aᵀ, Σ s sᵀ and the counts of one
shard (mergeable, sums.py); through the store each symmetric sum travels as its packed upper
triangle [d(d+1)/2] (row-major). `eigendecompose` normalises the reduced sums and gives the
`Eigenbases`: per module Q_A, Q_S, λ_A, λ_S (a ModuleFactors without Λ).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from .capture import ModuleCapture
from .factors import ModuleFactors
from .finite import require_finite
from .modules import TrackedModule
from .progress import Progress
from .resources import available_cores, single_threaded_torch
from .sums import RunningSums


class CovarianceAccumulator:
    """Σ a aᵀ and Σ s sᵀ over real tokens, per module: during a pass on its device (`sums.RunningSums`,
    token counts as device tensors: adding a batch never waits for the device), after `finish`
    (once per task) and when read from the store in float64 on the host. `batch_sizes`: the batch
    sizes the passes ran with (a task that ran out of memory lowered its own)."""

    def __init__(self, modules: dict[str, TrackedModule], device: torch.device | str | None = "cpu"):
        """`device`: where a pass adds its batches; None for a partial sum read from the store."""
        self.modules = modules
        self.activation_sums: dict[str, torch.Tensor] = {}
        self.gradient_sums: dict[str, torch.Tensor] = {}
        self.token_counts = dict.fromkeys(modules, 0)
        self.n_sequences = 0
        self.batch_sizes: set[int] = set()
        self._running = None
        if device is not None:
            shapes = {}
            for name, module in modules.items():
                shapes[f"{name}/activation"] = (module.d_in_full, module.d_in_full)
                shapes[f"{name}/gradient"] = (module.d_out, module.d_out)
            self._running = RunningSums(shapes, device)
            self._tokens = {name: torch.zeros((), dtype=torch.int64, device=device) for name in modules}

    def add(self, captures: dict[str, ModuleCapture], n_sequences: int) -> None:
        """Add one batch on its device. Padding rows of a and s are zero, so plain matmuls skip them."""
        for name, capture in captures.items():
            covariance_update(self._running, name, capture)
            self._tokens[name] += capture.token_mask.sum()
        self.n_sequences += n_sequences

    def finish(self, batch_size: int) -> CovarianceAccumulator:
        """The pass's sums and counts to the host (float64), once, checked for NaN and Inf."""
        host = self._running.to_host()
        for name in self.modules:
            self.activation_sums[name] = host.pop(f"{name}/activation")
            self.gradient_sums[name] = host.pop(f"{name}/gradient")
            self.token_counts[name] = int(self._tokens.pop(name))
        self._running = None
        self.batch_sizes = {batch_size}
        self.check_finite()
        return self

    def merge(self, other: CovarianceAccumulator) -> None:
        for name in self.modules:
            self.activation_sums[name] += other.activation_sums[name]
            self.gradient_sums[name] += other.gradient_sums[name]
            self.token_counts[name] += other.token_counts[name]
        self.n_sequences += other.n_sequences
        self.batch_sizes |= other.batch_sizes

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
        state = {
            "n_sequences": torch.tensor([self.n_sequences], dtype=torch.int64),
            "batch_sizes": torch.tensor(sorted(self.batch_sizes), dtype=torch.int64),
        }
        for name in self.modules:
            state[f"{name}/activation_sum_upper"] = upper_triangle(self.activation_sums[name])
            state[f"{name}/gradient_sum_upper"] = upper_triangle(self.gradient_sums[name])
            state[f"{name}/token_count"] = torch.tensor([self.token_counts[name]], dtype=torch.int64)
        return state

    @classmethod
    def from_state(cls, modules: dict[str, TrackedModule], state: dict[str, torch.Tensor]) -> CovarianceAccumulator:
        accumulator = cls(modules, device=None)
        accumulator.n_sequences = int(state["n_sequences"][0])
        accumulator.batch_sizes = set(state["batch_sizes"].tolist()) if "batch_sizes" in state else set()
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
        self,
        progress: Progress | None = None,
        workers: int | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> Eigenbases:
        """Normalise and eigendecompose A and S (float64), module by module, keeping the result in
        `dtype` on the host. Each module's sums are freed as soon as it is done, so the float64 work
        never holds more than `workers` modules beyond the sums themselves.

        On a GPU (`device` cuda) the modules go one after the other through cuSOLVER's float64
        eigh (an 11008² one takes seconds there, minutes on a CPU thread). On the CPU, LAPACK's
        symmetric eigensolver scales badly across threads on small CPUs (measured on 2 cores: a
        1536² eigh takes 1.3 s on one thread and 2.4 s on two), so the modules are spread over
        `workers` threads (default: the cores this process may use, the container's CPU limit
        included: resources.available_cores) that each run one thread."""
        progress = progress or Progress()
        names = list(self.modules)
        unseen = [name for name in names if self.token_counts[name] == 0]
        if unseen and len(unseen) < len(names):  # experts no token of the fit was routed to
            raise InputError(
                f"no token of the fit data reached {len(unseen)} of the {len(names)} modules ({', '.join(unseen[:3])}"
                f"{', ...' if len(unseen) > 3 else ''}): their curvature is unknown; fit on more (or more varied) "
                "data, or leave them out on purpose with a --modules regular expression"
            )
        progress.stage("eigendecomposition", len(names), "module")

        def one(name: str) -> tuple[str, ModuleFactors]:
            activation = self.activation_sums.pop(name) / max(self.token_counts[name], 1)
            gradient = self.gradient_sums.pop(name) / max(self.n_sequences, 1)
            activation_eigenvalues, activation_eigenvectors = symmetric_eigh(activation, device)
            del activation
            gradient_eigenvalues, gradient_eigenvectors = symmetric_eigh(gradient, device)
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
        on_gpu = torch.device(device).type == "cuda"
        workers = 1 if on_gpu else max(1, min(workers or available_cores(), len(names)))
        threads = contextlib.nullcontext() if on_gpu else single_threaded_torch()
        with threads, ThreadPoolExecutor(workers, thread_name_prefix="eigh") as pool:
            for name, module_factors in pool.map(one, names):
                progress.check_cancelled()
                factors[name] = module_factors
                progress.advance(1, 0)
        n_tokens = max(self.token_counts.values(), default=0)
        return Eigenbases({name: factors[name] for name in names}, n_tokens=n_tokens, batch_sizes=self.batch_sizes)


@dataclass
class Eigenbases:
    """The covariance pass over all the data, eigendecomposed: per module Q_A, Q_S, λ_A, λ_S
    (a ModuleFactors without Λ), and the number of tokens it saw."""

    factors: dict[str, ModuleFactors]
    n_tokens: int
    batch_sizes: set[int] = field(default_factory=set)  # the covariance passes' (budget.py)

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
        tensors["batch_sizes"] = torch.tensor(sorted(self.batch_sizes), dtype=torch.int64)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], modules: Iterable[str]) -> Eigenbases:
        factors = {
            name: ModuleFactors(
                **{key: tensors[f"{name}/{key}"] for key in ModuleFactors.TENSOR_FIELDS if f"{name}/{key}" in tensors}
            )
            for name in modules
        }
        batch_sizes = set(tensors["batch_sizes"].tolist()) if "batch_sizes" in tensors else set()
        return cls(factors, int(tensors["n_tokens"][0]), batch_sizes)

    def merged(self, other: Eigenbases) -> Eigenbases:
        """These modules' bases and another group's (model order as given), over the same data."""
        return Eigenbases(
            {**self.factors, **other.factors}, max(self.n_tokens, other.n_tokens), self.batch_sizes | other.batch_sizes
        )


def covariance_update(sums: RunningSums, name: str, capture: ModuleCapture) -> None:
    """Module `name`'s sums "{name}/activation" += Σ a aᵀ [d_in, d_in] and "{name}/gradient" += Σ s sᵀ
    [d_out, d_out] over the batch's positions (padding rows are zero); sums and capture on one device."""
    a = capture.a.reshape(-1, capture.a.shape[-1])  # [B·N, d_in]
    s = capture.s.reshape(-1, capture.s.shape[-1])  # [B·N, d_out]
    sums.add(f"{name}/activation", gram(a))
    sums.add(f"{name}/gradient", gram(s))


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


def symmetric_eigh(matrix: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending, clamped at 0) and eigenvectors of a symmetric PSD matrix, in float64,
    computed on `device` and returned where `matrix` was."""
    home = matrix.device
    matrix = matrix.to(device=device, dtype=torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return eigenvalues.clamp_min(0.0).to(home), eigenvectors.to(home)
