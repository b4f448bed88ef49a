"""Training-gradient blocks of a shard for StreamBlocks: per-sequence gradients, a block at a time."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from safetensors.torch import save as save_tensors

from ..engine.capture import capture
from ..engine.data import collate
from ..engine.fit import prepare_model
from ..engine.modules import device_of
from ..gen.influence.v1 import gradient_service_pb2
from .model_cache import ModelCache
from .specs import ModelRef
from .stages import dataset_artifact, load_records, load_shard

_models = ModelCache(capacity=1)


def gradient_blocks(
    store, dataset_id: str, shard: int, model: ModelRef, modules: str, block_size: int
) -> Iterator[gradient_service_pb2.GradientBlock]:
    """Yields blocks of ∇ log p(z_m): per module a float32 tensor [n, d_out, d_in(+1)]."""
    loaded_model, tokenizer = _models.get(model)
    tracked_modules, _ = prepare_model(loaded_model, modules)
    dataset = dataset_artifact(store, dataset_id)
    sequences, records = load_shard(dataset, shard), load_records(dataset, shard)
    device = device_of(loaded_model)
    for start in range(0, len(sequences), block_size):
        block = sequences[start : start + block_size]
        captures = capture(loaded_model, tracked_modules, collate(block, tokenizer.pad_token_id).to(device), "true")
        tensors = {
            name: c.per_sequence_gradients().to("cpu", torch.float32).contiguous() for name, c in captures.items()
        }
        tensors["example_index"] = torch.tensor([sequence.index for sequence in block])
        yield gradient_service_pb2.GradientBlock(
            shard=shard,
            example_ids=[records[start + offset]["id"] for offset in range(len(block))],
            safetensors=save_tensors(tensors),
        )
