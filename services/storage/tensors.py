"""Dicts of torch tensors as safetensors objects in a store (factors, gradient blocks, partial sums).

torch and safetensors are imported on first use, so importing the store stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .errors import IntegrityError, InvalidArgument

if TYPE_CHECKING:
    import torch

    from .base import ArtifactStore


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """safetensors bytes of CPU, contiguous copies; tensors sharing memory are copied apart."""
    from safetensors.torch import save

    prepared, storages = {}, set()
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise InvalidArgument(f"tensor names must be strings, got {name!r}")
        value = tensor.detach().to("cpu").contiguous()
        storage = (value.untyped_storage().data_ptr(), value.device.type)
        if value.numel() and storage in storages:
            value = value.clone()  # safetensors refuses tensors that share storage
        storages.add(storage)
        prepared[name] = value
    return save(prepared)


def tensors_from_bytes(data: bytes, where: str = "object") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(bytes(data))
    except (SafetensorError, ValueError) as error:
        raise IntegrityError(f"{where} is not a valid safetensors file: {error}") from None


def put_tensors(store: ArtifactStore, key: str, tensors: Mapping[str, torch.Tensor]) -> int:
    """Save `tensors` at `key`; returns the object's size in bytes."""
    data = tensors_to_bytes(tensors)
    store.put_bytes(key, data)
    return len(data)


def get_tensors(store: ArtifactStore, key: str) -> dict[str, torch.Tensor]:
    return tensors_from_bytes(store.get_bytes(key), f"{key!r} in {store.describe()}")
