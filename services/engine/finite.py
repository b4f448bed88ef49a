"""Refusing NaN and Inf where they first appear, so no non-finite number is ever a result.

A NaN in a weight, an activation that overflows, or a corrupted factor file would otherwise flow
silently into factors and scores (and rank as if it were a number). Each pass checks what it
produced before handing it on, and names what it checked:

    model weights            when the tracked modules are selected (prepare_model)
    covariance sums          at the end of each covariance pass (per module)
    eigendecompositions      before the eigenbases are used or stored
    correction sums          at the end of each correction pass
    query gradients / IHVPs  before they are planned for scoring (per query)
    scores                   before they leave a scoring pass (per training sequence)
    loaded factor files      when a factor set is read
A check is one `isfinite().all()` per tensor: memory-bound and small next to the matmuls that
produced the tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import NonFiniteError


def is_finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Whether every tensor is free of NaN and Inf, as a 0-dim bool tensor on their device (no read)."""
    return torch.stack([torch.isfinite(tensor).all() for tensor in tensors]).all()


def require_finite(tensor: torch.Tensor, what: str, hint: str = "") -> torch.Tensor:
    """`tensor` unchanged, or NonFiniteError("{what} holds NaN or Inf[; hint]")."""
    if not is_finite(tensor):
        raise NonFiniteError(f"{what} holds NaN or Inf" + (f"; {hint}" if hint else ""))
    return tensor


def first_non_finite(values: torch.Tensor, dim: int) -> int | None:
    """The first index along `dim` whose slice holds a NaN or Inf (None if all are finite)."""
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return None
    other = [d for d in range(values.dim()) if d != dim % values.dim()]
    bad = ~finite.all(dim=other) if other else ~finite
    return int(bad.nonzero()[0])


# Set on a parameter once checked, with its in-place version counter then: a model a worker
# keeps loaded is checked once, not once per task, and checked again if its weights change.
_CHECKED_VERSION = "_influence_finite_version"


def check_module_weights(modules: dict[str, nn.Module]) -> None:
    """NonFiniteError naming the first tracked module whose weight or bias holds NaN or Inf."""
    for name, module in modules.items():
        for kind in ("weight", "bias"):
            parameter = getattr(module, kind, None)
            if parameter is None or getattr(parameter, _CHECKED_VERSION, None) == parameter._version:
                continue
            if not is_finite(parameter.detach()):
                raise NonFiniteError(
                    f"model weight {name}.{kind} holds NaN or Inf (checked when loading the tracked modules); "
                    "the model file is damaged or the model diverged"
                )
            setattr(parameter, _CHECKED_VERSION, parameter._version)
