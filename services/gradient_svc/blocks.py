"""Training-gradient blocks of a shard, for StreamBlocks: per-sequence gradients, a block at a time.

A "blocks" job has one task, run on a worker like every other computation (GPU pools compute,
the API servers stream): it writes block i of the shard to jobs/{job}/blocks/{i}.pb (a
serialised GradientBlock) in order, then jobs/{job}/blocks/count.json (layout.job_block*).
A redelivered task rewrites the same bytes, so a reader that has already streamed blocks
0..i-1 simply goes on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import torch

from ..catalog.datasets import load_records, load_shard
from ..engine.capture import capture
from ..engine.data import collate
from ..engine.device import exact_arithmetic
from ..engine.finite import require_finite
from ..engine.fit import prepare_model
from ..engine.modules import device_of
from ..gen.influence.v1 import gradient_service_pb2
from ..storage import ArtifactReader
from ..storage.tensors import tensors_to_bytes
from ..system import layout


def gradient_blocks(
    dataset: ArtifactReader, shard: int, model, tokenizer, modules: str, block_size: int, progress=None
) -> Iterator[gradient_service_pb2.GradientBlock]:
    """Yields blocks of ∇ log p(z_m): per module a float32 tensor [n, d_out, d_in(+1)], plus
    "example_index" [n] (global indices)."""
    tracked_modules, _ = prepare_model(model, modules)
    sequences, records = load_shard(dataset, shard), load_records(dataset, shard)
    device = device_of(model)
    for start in range(0, len(sequences), block_size):
        if progress is not None:
            progress.check_cancelled()
        block = sequences[start : start + block_size]
        with exact_arithmetic():
            captures = capture(model, tracked_modules, collate(block, tokenizer.pad_token_id).to(device), "true")
            gradients = {name: c.per_sequence_gradients().to("cpu", torch.float32) for name, c in captures.items()}
        tensors = {
            name: require_finite(
                gradient.contiguous(), f"the gradient block {start // block_size} of shard {shard}, module {name}"
            )
            for name, gradient in gradients.items()
        }
        tensors["example_index"] = torch.tensor([sequence.index for sequence in block])
        if progress is not None:
            progress.advance(1, sum(sequence.length for sequence in block))
        yield gradient_service_pb2.GradientBlock(
            shard=shard,
            example_ids=[records[start + offset]["id"] for offset in range(len(block))],
            safetensors=tensors_to_bytes(tensors),
        )


def write_blocks(store, job: str, blocks: Iterator[gradient_service_pb2.GradientBlock]) -> int:
    """Write each block as it is computed, then the count; returns the number of blocks."""
    count = 0
    for count, block in enumerate(blocks, start=1):
        store.put_bytes(layout.job_block(job, count - 1), block.SerializeToString())
    store.put_bytes(layout.job_block_count(job), json.dumps({"blocks": count}).encode())
    return count
