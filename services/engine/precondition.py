"""Inverse-Hessian-vector products: P = (G + λI)⁻¹ DQ per module, and low-rank query batching.

With the factors' eigenbasis (Q_S, Q_A) and diagonal Λ (see factors.py):
    P = Q_S [ (Q_Sᵀ DQ Q_A) ⊘ (Λ + λ) ] Q_Aᵀ      (rotate, divide, rotate back)
The diagonal strategy divides without rotating; identity returns DQ unchanged (no curvature).
Damping λ is absolute, or relative: λ = damping_factor × mean(Λ) per module (default 0.1).
Done in float64: it runs once per query batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError
from .factors import ModuleFactors


@dataclass(frozen=True)
class Damping:
    """Absolute damping if `absolute` is set, else `factor` × mean eigenvalue per module."""

    factor: float = 0.1
    absolute: float | None = None

    def __post_init__(self):
        if self.absolute is not None and self.absolute < 0:
            raise InputError(f"--damping must be >= 0, got {self.absolute}")
        if self.absolute is None and self.factor < 0:
            raise InputError(f"--damping-factor must be >= 0, got {self.factor}")

    def value(self, eigenvalues: torch.Tensor) -> float:
        if self.absolute is not None:
            return float(self.absolute)
        return float(self.factor * eigenvalues.to(torch.float64).mean())

    def describe(self) -> str:
        return f"absolute {self.absolute}" if self.absolute is not None else f"{self.factor} x mean eigenvalue"


def precondition(gradient: torch.Tensor, factors: ModuleFactors, strategy: str, damping: Damping) -> torch.Tensor:
    """P for a batch of query gradients.

    gradient: [Q, d_out, d_in]; returns float64 [Q, d_out, d_in] on the gradient's device.
    """
    gradient = gradient.to(torch.float64)
    if strategy == "identity":
        return gradient
    eigenvalues = factors.eigenvalues.to(gradient.device, torch.float64)
    denominator = eigenvalues + damping.value(eigenvalues)
    if bool((denominator <= 0).any()):
        raise InputError("damping is zero and some eigenvalues are zero: the curvature is singular; set --damping > 0")
    if strategy == "diagonal":
        return gradient / denominator
    q_s = factors.gradient_eigenvectors.to(gradient.device, torch.float64)
    q_a = factors.activation_eigenvectors.to(gradient.device, torch.float64)
    rotated = q_s.T @ gradient @ q_a  # [Q, d_out, d_in]
    return q_s @ (rotated / denominator) @ q_a.T


def self_influence_terms(
    rotated: torch.Tensor, factors: ModuleFactors, strategy: str, damping: Damping
) -> torch.Tensor:
    """⟨P_m, DW_m⟩ per sequence from its rotated gradient G̃_m = Q_Sᵀ DW_m Q_A: [B, d_out, d_in] -> [B].

    In the eigenbasis the preconditioner is diagonal, so this is Σ G̃² / (Λ + λ).
    """
    squared = rotated.to(torch.float64).square()
    if strategy == "identity":
        return squared.sum((1, 2))
    eigenvalues = factors.eigenvalues.to(rotated.device, torch.float64)
    return (squared / (eigenvalues + damping.value(eigenvalues))).sum((1, 2))


def low_rank(preconditioned: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation P ≈ U Vᵀ per query (truncated SVD, singular values folded into U).

    preconditioned: [Q, d_out, d_in] -> U: [Q, d_out, r], V: [Q, d_in, r] (r capped at min(d_out, d_in)).
    """
    if rank < 1:
        raise InputError(f"--query-rank must be >= 1, got {rank}")
    left, singular, right_h = torch.linalg.svd(preconditioned.to(torch.float64), full_matrices=False)
    rank = min(rank, singular.shape[-1])
    return left[..., :rank] * singular[..., None, :rank], right_h[..., :rank, :].transpose(-1, -2)
