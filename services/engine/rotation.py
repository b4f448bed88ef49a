"""Rotation of module gradients into the Kronecker eigenbasis (Q_S, Q_A) of their factors.

    G̃ = Q_Sᵀ G Q_A          G: a module's gradient [d_out, d_in]; Q_S [d_out, d_out], Q_A [d_in, d_in]

`rotate` rotates a stack of materialised gradients [Q, d_out, d_in] (query gradients, IHVPs);
`rotated_per_sequence_gradients` rotates the per-sequence training gradients DW = sᵀ a of a
capture (s [B, N, d_out], a [B, N, d_in]) without necessarily forming DW, associating the four
products in the cheapest order for the batch's length (`rotation_order`, `rotate_in_order`).
"""

from __future__ import annotations

import torch

from .capture import ModuleCapture


def rotated_per_sequence_gradients(
    capture: ModuleCapture, gradient_basis: torch.Tensor | None, activation_basis: torch.Tensor | None
) -> torch.Tensor:
    """G̃ = Q_Sᵀ DW Q_A per sequence: [B, d_out, d_in], DW = sᵀ a (s [B, N, d_out], a [B, N, d_in]).

    The four products are associated in the order that costs the fewest multiply-adds for this
    batch's padded length N (`rotation_order`): short sequences rotate their tokens, N·(d_out² +
    d_in²) per sequence; long ones rotate the materialised gradient, d_out·d_in·(d_out + d_in),
    independent of N (3x fewer for a 2,048-token sequence through a 576 x 1536 MLP). With no
    basis (diagonal strategy) it is DW itself. The bases are on the capture's device, in its dtype.
    """
    s, a = capture.s, capture.a
    if gradient_basis is None:
        return torch.bmm(s.transpose(1, 2), a)
    return rotate_in_order(s, a, gradient_basis, activation_basis, rotation_order(s.shape[1], s.shape[2], a.shape[2]))


def rotate(gradient: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """leftᵀ G right for a stack of matrices, as two 2-D matmuls (no broadcast copies).

    gradient: [Q, d_out, d_in]; left: [d_out, d_out]; right: [d_in, d_in] -> [Q, d_out, d_in].
    """
    n, d_out, d_in = gradient.shape
    rotated = (gradient.reshape(n * d_out, d_in) @ right).reshape(n, d_out, d_in)
    rotated = (left.T @ rotated.transpose(0, 1).reshape(d_out, n * d_in)).reshape(d_out, n, d_in)
    return rotated.transpose(0, 1)


ROTATION_ORDERS = ("tokens", "outputs", "inputs", "gradient")


def rotation_costs(tokens: int, d_out: int, d_in: int) -> dict[str, int]:
    """Multiply-adds per sequence of each association of Q_Sᵀ sᵀ a Q_A beyond the N·d_out·d_in of
    the product itself: rotate both token sides ("tokens"), rotate the output side and then the
    product's inputs ("outputs"), the reverse ("inputs"), or neither token side ("gradient": rotate
    sᵀ a)."""
    return {
        "tokens": tokens * (d_out * d_out + d_in * d_in),
        "outputs": tokens * d_out * d_out + d_out * d_in * d_in,
        "inputs": tokens * d_in * d_in + d_out * d_out * d_in,
        "gradient": d_out * d_in * (d_out + d_in),
    }


def rotation_order(tokens: int, d_out: int, d_in: int) -> str:
    """The cheapest association of Q_Sᵀ sᵀ a Q_A for sequences of `tokens` positions (`rotation_costs`)."""
    costs = rotation_costs(tokens, d_out, d_in)
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
