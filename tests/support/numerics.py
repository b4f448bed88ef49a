"""Tolerances that follow from the arithmetic, and comparisons that say which entries differ.

Two results of the same computation can differ by round-off wherever summation order changes:
batch shapes and padding, partitioning, BLAS blocking, the CPU's vector width (AVX2 vs AVX-512
kernels round differently) and the thread count. So every comparison is norm-relative
(‖actual − expected‖ / ‖expected‖) at a tolerance set by the coarsest arithmetic involved:

    FLOAT64  1e-9   every operation in float64: round-off ~1e-16 per operation, so 1e-9 leaves
                    ~10⁶× for error growth and still shows any modelling error (a missing token,
                    a wrong normalisation, a transposed factor) as O(1).
    FLOAT32  1e-5   float32 arithmetic anywhere on the path: ε₃₂ = 6e-8 per operation, ~100×
                    margin for growth through a few dozen operations.
A float64 model is float64 end to end only for GPT-2 and the reference models of
tests/support/reference.py: transformers' Llama, Mistral, Qwen2, GPT-NeoX and OPT compute the attention
softmax (and Llama-style RMSNorm) in float32 whatever the model's dtype, so their results carry
float32 round-off that depends on padding and the CPU's kernels (`model_tolerance`).
"""

from __future__ import annotations

import torch

FLOAT64 = 1e-9
FLOAT32 = 1e-5

# transformers model types whose forward pass stays in the model's dtype throughout
_FLOAT64_END_TO_END = frozenset({"gpt2"})


def model_tolerance(model: torch.nn.Module) -> float:
    """FLOAT64 when `model` computes in float64 end to end, else FLOAT32."""
    if next(model.parameters()).dtype != torch.float64:
        return FLOAT32
    config = getattr(model, "config", None)
    if config is None:  # tests/support/reference.py models: plain float64 torch
        return FLOAT64
    return FLOAT64 if config.model_type in _FLOAT64_END_TO_END else FLOAT32


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.to(torch.float64), expected.to(torch.float64)
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """Norm-relative error below `tol`; the message names the worst entry."""
    error = relative_error(actual, expected)
    difference = (actual.to(torch.float64) - expected.to(torch.float64)).abs()
    worst = int(difference.argmax()) if difference.numel() else 0
    assert error < tol, (
        f"{what}: relative error {error:.3e} >= {tol:.0e}; worst entry {worst}: "
        f"{actual.reshape(-1)[worst].item():.6e} vs {expected.reshape(-1)[worst].item():.6e}"
    )


def assert_columns_equal_up_to_sign(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """Eigenvector matrices [d, d] equal column by column up to each column's sign (a unit
    eigenvector of a simple eigenvalue is unique up to sign)."""
    signs = torch.sign((actual * expected).sum(0))
    signs[signs == 0] = 1
    assert_close(actual * signs, expected, tol, f"{what} (columns up to sign)")
