"""Partial sums over data shards, the form every pass of a fit produces, and how a pass adds them up.

A pass over a shard returns an accumulator (covariance.py, correction.py) holding unnormalised
float64 sums on the CPU plus counts, so the shards' partials can be added in any order
(`merge`, `reduce`) and normalised once, by whoever holds them all.

During the pass the sums live where the captures are made (`RunningSums`), so no batch copies
anything to the host nor waits for the device: in float64 where the device adds float64 at full
rate (the CPU; data-centre GPUs: `full_rate_float64`), otherwise in float32 with Kahan's
compensation (each add carries the rounding error of the previous one forward, so n adds lose
O(ε) rather than O(n ε); tests/engine/test_budget.py holds it to the float64 sum within 1e-6
relative where a plain float32 sum drifts further). They reach the host once per task, as float64
(`RunningSums.to_host`), and are checked for NaN and Inf there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

import torch


class Mergeable(Protocol):
    def merge(self, other) -> None: ...


Accumulator = TypeVar("Accumulator", bound=Mergeable)

# Compute capabilities whose float64 throughput is half the float32 one (P100, V100, A100, H100/H200):
# on every other GPU float64 runs at 1/32 or 1/64 of float32.
_FULL_RATE_FLOAT64 = {(6, 0), (7, 0), (8, 0), (9, 0)}


def full_rate_float64(device: torch.device | str) -> bool:
    """True where running sums may be float64 without slowing the pass: the CPU, and GPUs with
    full-rate float64."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) in _FULL_RATE_FLOAT64


def accumulate(
    total: torch.Tensor, value: torch.Tensor, compensation: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(total + value, its compensation), all on one device. Without `compensation` a plain add into
    `total` itself (the cast into a float64 total fused into it: no float64 copy of value); with it
    (float32 sums), Kahan's summation: the low-order bits the add loses are carried into the next."""
    if compensation is None:
        return total.add_(value), None
    corrected = value - compensation  # y = value - c
    updated = total + corrected  # t = total + y
    return updated, (updated - total) - corrected  # c = (t - total) - y: what the add lost


class RunningSums:
    """Named sums of one task's pass on its device: float64, or float32 with compensation (module
    docstring). `add` never synchronises; `to_host` copies them once, as float64 CPU tensors."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], device: torch.device | str, compensated: bool | None = None):
        device = torch.device(device)
        self.compensated = not full_rate_float64(device) if compensated is None else compensated
        dtype = torch.float32 if self.compensated else torch.float64
        self.totals = {key: torch.zeros(shape, dtype=dtype, device=device) for key, shape in shapes.items()}
        self.compensations = (
            {key: torch.zeros(shape, dtype=dtype, device=device) for key, shape in shapes.items()}
            if self.compensated
            else {}
        )

    def add(self, key: str, value: torch.Tensor) -> None:
        total, compensation = accumulate(self.totals[key], value, self.compensations.get(key))
        self.totals[key] = total
        if compensation is not None:
            self.compensations[key] = compensation

    def to_host(self) -> dict[str, torch.Tensor]:
        """Every sum as float64 on the CPU (the compensation's residual subtracted), the device's
        memory given back."""
        host = {}
        for key in list(self.totals):
            total = self.totals.pop(key).to(torch.float64)
            if key in self.compensations:
                total -= self.compensations.pop(key).to(torch.float64)
            host[key] = total.to("cpu")
        return host


def reduce(partials: Iterable[Accumulator]) -> Accumulator:
    """The sum of shards' partial accumulators (merged into the first, in the given order): `partials`
    may be a generator reading them one at a time, so at most two are in memory at once."""
    total = None
    for partial in partials:
        if total is None:
            total = partial
        else:
            total.merge(partial)
            del partial
    if total is None:
        raise ValueError("nothing to reduce: no partial sums")
    return total
