"""The curvature factors of the tracked modules: what a fit produces and preconditioning reads.

Every strategy (strategies.py) is "an eigenbasis (or none) + a diagonal Λ [d_out, d_in] in it".
For a tracked module W ∈ R^{d_out × d_in} (d_in includes the bias coordinate) a `ModuleFactors`
holds some of

    eigenvalues             Λ    [d_out, d_in]   measured in the basis (the correction pass)
    activation_eigenvectors Q_A  [d_in, d_in]    A = Q_A diag(λ_A) Q_Aᵀ   (the covariance pass)
    gradient_eigenvectors   Q_S  [d_out, d_out]  S = Q_S diag(λ_S) Q_Sᵀ
    activation_eigenvalues  λ_A  [d_in]
    gradient_eigenvalues    λ_S  [d_out]

exactly the ones its strategy declares (`Strategy.stores`); the covariances A and S themselves
are never kept: once eigendecomposed, nothing reads them. A `FactorSet` is every module's factors
with what they were fitted on. The passes that produce them: covariance.py, correction.py; the
file format: factor_io.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .modules import TrackedModule
from .strategies import Strategy


@dataclass
class ModuleFactors:
    """Factors of one module (see the module docstring for each tensor)."""

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

    @staticmethod
    def shapes(d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor for a module of d_out outputs and d_in inputs (bias included)."""
        return {
            "eigenvalues": (d_out, d_in),
            "activation_eigenvectors": (d_in, d_in),
            "gradient_eigenvectors": (d_out, d_out),
            "activation_eigenvalues": (d_in,),
            "gradient_eigenvalues": (d_out,),
        }

    @classmethod
    def stored_by(cls, strategy: Strategy, tensors: dict[str, torch.Tensor]) -> ModuleFactors:
        """The factors `strategy` stores, taken from `tensors` (which must hold each of them)."""
        return cls(**{key: tensors[key] for key in strategy.stores})

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
