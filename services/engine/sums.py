"""Partial sums over data shards, the form every pass of a fit produces.

A pass over a shard returns an accumulator (covariance.py, correction.py) holding unnormalised
float64 sums on the CPU plus counts, so the shards' partials can be added in any order
(`merge`, `reduce`) and normalised once, by whoever holds them all.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

import torch


class Mergeable(Protocol):
    def merge(self, other) -> None: ...


Accumulator = TypeVar("Accumulator", bound=Mergeable)


def accumulate(total: torch.Tensor, value: torch.Tensor) -> None:
    """total += value, with total a float64 CPU sum: the cast is fused into the add (no float64
    copy of value), and a device value is copied to the CPU once."""
    total.add_(value if value.device == total.device else value.to(total.device))


def reduce(partials: Iterable[Accumulator]) -> Accumulator:
    """The sum of shards' partial accumulators (merged into the first, in the given order)."""
    total = None
    for partial in partials:
        if total is None:
            total = partial
        else:
            total.merge(partial)
    if total is None:
        raise ValueError("nothing to reduce: no partial sums")
    return total
