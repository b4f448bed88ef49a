"""The curvature strategies, from cheapest to most accurate, as a registry of what each needs.

Every strategy is written as "an eigenbasis (or none) + a diagonal Λ [d_out, d_in] in it":

    name      covariance pass  correction pass  basis        Λ
    identity  -                -                -            none: plain gradient dot products
    diagonal  -                yes              parameters   E_m[DW_m ⊙ DW_m]
    kfac      yes              -                (Q_S, Q_A)   λ_S λ_Aᵀ
    ekfac     yes              yes              (Q_S, Q_A)   E_m[(Q_Sᵀ DW_m Q_A)^⊙2]  (eigenvalue correction)

The covariance pass (with its eigendecomposition) gives the Kronecker eigenbasis; the correction
pass measures Λ in whatever basis there is. The passes, the preconditioner (precondition.py) and
the job plans (services/factor_svc) read these flags; nothing branches on a strategy's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class Strategy:
    name: str
    covariance: bool  # a covariance pass and eigendecomposition: the basis (Q_S, Q_A)
    correction: bool  # a correction pass: Λ measured from per-sequence gradients in the basis

    @property
    def curvature(self) -> bool:
        """False for identity: no Λ, preconditioning is the identity."""
        return self.covariance or self.correction

    @property
    def reuses_captures(self) -> bool:
        """Both passes see the same captures: the correction can replay the covariance pass's."""
        return self.covariance and self.correction


STRATEGIES: dict[str, Strategy] = {
    strategy.name: strategy
    for strategy in (
        Strategy("identity", covariance=False, correction=False),
        Strategy("diagonal", covariance=False, correction=True),
        Strategy("kfac", covariance=True, correction=False),
        Strategy("ekfac", covariance=True, correction=True),
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
