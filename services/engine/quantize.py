"""Storage of index tensors: a dtype cast, or int8 with one absmax scale per row.

    int8:  q = round(127 · x / s),  s = max |x| over the row (the last dimension);  x̂ = s · q / 127

so every element's error is at most s / 254 (half a step), and a row of d elements is off by at
most √d · s / 254 in Euclidean norm (tests/engine/test_index_compact.py). A row of zeros stores
zeros (scale 0). Rows are the index's natural vectors: one factor u_r or v_r of a sequence's
low-rank gradient, one row of a dense projected gradient.
"""

from __future__ import annotations

import torch

from .model_io import parse_dtype

SCALE = ".scale"  # a quantised tensor "key" has its scales under "key.scale"
LEVELS = 127


def stored(key: str, value: torch.Tensor, storage_dtype: str) -> dict[str, torch.Tensor]:
    """`value` [..., d] as stored under `key` (on the host): cast, or int8 with scales [...]."""
    if storage_dtype != "int8":
        return {key: value.to("cpu", parse_dtype(storage_dtype)).contiguous()}
    value = value.to(torch.float32)
    scale = value.abs().amax(-1)  # [...]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    quantised = torch.round(value / safe * LEVELS).clamp_(-LEVELS, LEVELS).to(torch.int8)
    return {key: quantised.to("cpu").contiguous(), key + SCALE: scale.to("cpu").contiguous()}


def loaded(part: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """The float32 tensor stored under `key` in `part` (`stored`'s inverse, up to the rounding)."""
    value = part[key]
    scale = part.get(key + SCALE)
    if scale is None:
        return value.float()
    return value.float() * (scale / LEVELS).unsqueeze(-1)


def element_bytes(storage_dtype: str) -> int:
    return 1 if storage_dtype == "int8" else torch.tensor([], dtype=parse_dtype(storage_dtype)).element_size()


def row_bytes(length: int, storage_dtype: str) -> int:
    """Stored bytes of one row of `length` elements (with its float32 scale when int8)."""
    return length * element_bytes(storage_dtype) + (4 if storage_dtype == "int8" else 0)
