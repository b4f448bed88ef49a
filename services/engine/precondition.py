"""Inverse-Hessian-vector products: P = (G + λI)⁻¹ DQ per module, and low-rank query batching.

With the factors' eigenbasis (Q_S, Q_A) and diagonal Λ (factors.py, rotation.py):
    P = Q_S [ (Q_Sᵀ DQ Q_A) ⊘ (Λ + λ) ] Q_Aᵀ      (rotate, divide, rotate back)
The diagonal strategy divides without rotating; identity returns DQ unchanged (no curvature).
Damping λ is absolute, or relative: λ = damping_factor × mean(Λ) per module (default 0.1).
Λ + λ and the division are float64; the rotations run in the scoring dtype.

`preconditioner` prepares a module's Λ + λ and bases once, on the host (it reads values: λ from
mean Λ, the singular check); a step places the result on its device (device.py) and the kernels
`precondition` and `self_influence_terms` read only tensors already there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError
from .factors import ModuleFactors
from .rotation import rotate
from .strategies import Strategy, get_strategy


@dataclass(frozen=True)
class Damping:
    """Absolute damping if `absolute` is set, else `factor` × mean eigenvalue per module."""

    factor: float = 0.1
    absolute: float | None = None

    def __post_init__(self):
        if self.absolute is not None and not (math.isfinite(self.absolute) and self.absolute >= 0):
            raise InputError(f"--damping must be a finite number >= 0, got {self.absolute}")
        if self.absolute is None and not (math.isfinite(self.factor) and self.factor >= 0):
            raise InputError(f"--damping-factor must be a finite number >= 0, got {self.factor}")

    def value(self, eigenvalues: torch.Tensor) -> float:
        if self.absolute is not None:
            return float(self.absolute)
        return float(self.factor * eigenvalues.to(torch.float64).mean())

    def scaled(self, scale: float) -> Damping:
        """This damping times `scale` (the absolute value, or the factor)."""
        return Damping(self.factor * scale, None if self.absolute is None else self.absolute * scale)

    def describe(self) -> str:
        return f"absolute {self.absolute}" if self.absolute is not None else f"{self.factor} x mean eigenvalue"


@dataclass
class Preconditioner:
    """One module's (G + λI)⁻¹ as the kernels need it (`preconditioner` builds it on the host; a
    step places it on its device with device.to_device):

    denominator       Λ + λ  [d_out, d_in] float64; None: no curvature (identity)
    gradient_basis    Q_S    [d_out, d_out] in the scoring dtype; None: Λ lives in the parameter basis
    activation_basis  Q_A    [d_in, d_in]
    damping           λ (float)
    singular          some Λ + λ ≤ 0 (damping 0 on a zero eigenvalue): preconditioning refuses it
    """

    denominator: torch.Tensor | None
    gradient_basis: torch.Tensor | None = None
    activation_basis: torch.Tensor | None = None
    damping: float = 0.0
    singular: bool = False


def preconditioner(
    factors: ModuleFactors, strategy: str | Strategy, damping: Damping, dtype: torch.dtype = torch.float64
) -> Preconditioner:
    """A module's preconditioner from its factors, on the factors' device (the host: this reads
    values, λ from mean Λ and the singular check); the bases in `dtype`."""
    strategy = get_strategy(strategy)
    if not strategy.curvature:
        return Preconditioner(None)
    eigenvalues = factors.diagonal()
    value = damping.value(eigenvalues)
    denominator = eigenvalues + value
    singular = bool((denominator <= 0).any())
    if not strategy.covariance:
        return Preconditioner(denominator, damping=value, singular=singular)
    return Preconditioner(
        denominator,
        factors.gradient_eigenvectors.to(dtype),
        factors.activation_eigenvectors.to(dtype),
        damping=value,
        singular=singular,
    )


def precondition(gradient: torch.Tensor, curvature: Preconditioner, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """P for a batch of query gradients: rotate, divide (`divided`), rotate back.

    gradient: [Q, d_out, d_in] on the preconditioner's device; returns [Q, d_out, d_in] in `dtype`.
    The rotations and the division (`divided`) run in `dtype` (float32 for float32 models).
    """
    gradient = gradient.to(dtype)
    if curvature.gradient_basis is None:
        return divided(gradient, curvature, dtype)
    q_s, q_a = curvature.gradient_basis.to(dtype), curvature.activation_basis.to(dtype)
    return rotate(divided(rotate(gradient, q_s, q_a), curvature, dtype), q_s.T, q_a.T)


def divided(rotated: torch.Tensor, curvature: Preconditioner, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """P̃ = G̃ ⊘ (Λ + λ): the preconditioned gradients in the eigenbasis, from gradients G̃ already
    rotated into it ([Q, d_out, d_in]; the diagonal strategy: in the parameter basis; identity:
    returned unchanged), in `dtype`. Float64 work divides in float64; float32 work divides float32
    gradients by Λ + λ rounded to float32 (at most one rounding more than a float64 division, at a
    fifth of its cost: it was half the query side's time)."""
    if curvature.denominator is None:
        return rotated.to(dtype)
    if curvature.singular:
        raise InputError("damping is zero and some eigenvalues are zero: the curvature is singular; set --damping > 0")
    if dtype == torch.float64 or rotated.dtype == torch.float64:
        return (rotated.to(torch.float64) / curvature.denominator).to(dtype)
    return (rotated.to(torch.float32) / curvature.denominator.to(torch.float32)).to(dtype)


def self_influence_terms(rotated: torch.Tensor, curvature: Preconditioner) -> torch.Tensor:
    """⟨P_m, DW_m⟩ per sequence from its rotated gradient G̃_m = Q_Sᵀ DW_m Q_A: [B, d_out, d_in] -> [B].

    In the eigenbasis the preconditioner is diagonal, so this is Σ G̃² / (Λ + λ).
    """
    squared = rotated.to(torch.float64).square()
    if curvature.denominator is None:
        return squared.sum((1, 2))
    return (squared / curvature.denominator).sum((1, 2))


def low_rank(preconditioned: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation P ≈ U Vᵀ per query (singular values folded into U).

    preconditioned: [Q, d_out, d_in] -> U: [Q, d_out, r], V: [Q, d_in, r], r ≤ min(d_out, d_in).
    The top-r singular subspace comes from the eigendecomposition (float64) of the smaller Gram
    matrix PᵀP or PPᵀ, several times cheaper than a full SVD; P V Vᵀ (or U Uᵀ P) is then the
    truncated SVD exactly.
    """
    if rank < 1:
        raise InputError(f"--query-rank must be >= 1, got {rank}")
    _, d_out, d_in = preconditioned.shape
    rank = min(rank, d_out, d_in)
    if d_in <= d_out:
        gram = preconditioned.transpose(-1, -2) @ preconditioned  # [Q, d_in, d_in]
        right = torch.linalg.eigh(gram.to(torch.float64))[1][..., -rank:].to(preconditioned.dtype)
        return preconditioned @ right, right
    gram = preconditioned @ preconditioned.transpose(-1, -2)  # [Q, d_out, d_out]
    left = torch.linalg.eigh(gram.to(torch.float64))[1][..., -rank:].to(preconditioned.dtype)
    return left, preconditioned.transpose(-1, -2) @ left
