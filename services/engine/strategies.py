"""The curvature strategies, from cheapest to most accurate, as a registry of what each needs.

Every strategy is written as "an eigenbasis (or none) + a diagonal Λ [d_out, d_in] in it":

    name      covariance  correction  basis        Λ                               stores
    identity  -           -           -            none: plain gradient products   nothing
    diagonal  -           yes         parameters   E_m[DW_m ⊙ DW_m]                Λ
    kfac      yes         -           (Q_S, Q_A)   λ_S λ_Aᵀ (formed when used)     Q_A, Q_S, λ_A, λ_S
    ekfac     yes         yes         (Q_S, Q_A)   E_m[(Q_Sᵀ DW_m Q_A)^⊙2]         Q_A, Q_S, Λ
                                                   (the eigenvalue correction)

The covariance pass (with its eigendecomposition) gives the Kronecker eigenbasis; the correction
pass measures Λ in whatever basis there is. `stores` names the ModuleFactors tensors (factors.py)
a factor set of the strategy holds: what the fit keeps of its passes' outputs, what a factor file
must contain, and all that preconditioning reads (kfac keeps d_out + d_in eigenvalues instead of
d_out·d_in). The passes, the fit's finalize, the factor format (factor_io.py), the preconditioner
(precondition.py) and the job plans (services/factor_svc) read these declarations; nothing
branches on a strategy's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class Strategy:
    name: str
    covariance: bool  # a covariance pass and eigendecomposition: the basis (Q_S, Q_A)
    correction: bool  # a correction pass: Λ measured from per-sequence gradients in the basis
    stores: tuple[str, ...]  # the ModuleFactors tensors its factor sets hold (and preconditioning reads)

    @property
    def curvature(self) -> bool:
        """False for identity: no Λ, preconditioning is the identity."""
        return self.covariance or self.correction

    @property
    def reuses_captures(self) -> bool:
        """Both passes see the same captures: the correction can replay the covariance pass's."""
        return self.covariance and self.correction


_BASIS = ("activation_eigenvectors", "gradient_eigenvectors")
_KRONECKER_EIGENVALUES = ("activation_eigenvalues", "gradient_eigenvalues")

STRATEGIES: dict[str, Strategy] = {
    strategy.name: strategy
    for strategy in (
        Strategy("identity", covariance=False, correction=False, stores=()),
        Strategy("diagonal", covariance=False, correction=True, stores=("eigenvalues",)),
        Strategy("kfac", covariance=True, correction=False, stores=(*_BASIS, *_KRONECKER_EIGENVALUES)),
        Strategy("ekfac", covariance=True, correction=True, stores=("eigenvalues", *_BASIS)),
    )
}

FISHERS = ("sampled", "empirical")


def get_strategy(name: str | Strategy) -> Strategy:
    """The registered strategy `name` (InputError naming the choices otherwise)."""
    if isinstance(name, Strategy):
        return name
    if name not in STRATEGIES:
        raise InputError(f"unknown strategy '{name}' (choose from {', '.join(STRATEGIES)})")
    return STRATEGIES[name]
