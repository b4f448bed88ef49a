"""GradientService's jobs: dataset registration and StreamBlocks' gradient blocks.

register:  register (one task)       -> datasets/{id}/ (token shards + records), published
blocks:    blocks (one task)         -> jobs/{id}/blocks/, relayed by the servicer as written
"""

from __future__ import annotations

import io
import json
import math

from ..engine.data import pack_sequences, tokenize_training
from ..engine.model_io import tokenizer_fingerprint
from ..engine.records import parse_jsonl, training_examples
from ..rpc.resources import dataset_message, empty_response, packed
from ..storage import ArtifactWriter
from ..system import layout
from ..system.plans import JobPlan, Stage, StageCall
from ..system.specs import BlocksJob, RegisterJob
from .blocks import gradient_blocks, write_blocks
from .datasets import dataset_artifact, load_records


def run_register(call: StageCall) -> dict:
    """Tokenise the uploaded JSONL into shards and publish the dataset."""
    job: RegisterJob = call.job
    context = call.context
    text = context.store.get_bytes(layout.job_upload(call.job_id)).decode("utf-8")
    examples = training_examples(
        parse_jsonl(io.StringIO(text), "uploaded dataset", "training data"), "uploaded dataset"
    )
    tokenizer = context.models.tokenizer(job.model.path)
    num_shards = math.ceil(len(examples) / job.shard_size)
    num_tokens, shards = 0, []
    context.progress.stage("register", num_shards, "shard")
    writer = ArtifactWriter(context.store, layout.dataset_prefix(job.dataset_id))
    for shard in range(num_shards):
        start = shard * job.shard_size
        part = examples[start : start + job.shard_size]
        sequences = tokenize_training(tokenizer, part, job.max_length, start_index=start)
        num_tokens += sum(sequence.length for sequence in sequences)
        shards.append(sequences)
        writer.add_tensors(layout.shard_tokens(shard), pack_sequences(sequences))
        writer.add_bytes(layout.shard_records(shard), json.dumps([{"id": e.id, "text": e.text} for e in part]).encode())
        context.progress.advance(1, sum(sequence.length for sequence in sequences))
    metadata = {
        "kind": "dataset",
        "name": f"datasets/{job.dataset_id}",
        "display_name": job.display_name,
        "num_examples": len(examples),
        "num_shards": num_shards,
        "shard_size": job.shard_size,
        "max_length": job.max_length,
        "num_tokens": num_tokens,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "create_time": job.create_time,
    }
    writer.publish(metadata)
    for shard, sequences in enumerate(shards):  # the fit that follows on this worker reads none back
        context.artifacts.put(("shard", job.dataset_id, shard), sequences)
    return metadata


def run_blocks(call: StageCall) -> dict:
    job: BlocksJob = call.job
    context = call.context
    model, tokenizer = context.models.get(job.model)
    dataset = dataset_artifact(context.store, job.dataset_id)
    context.progress.stage("blocks", -(-len(load_records(dataset, job.shard)) // job.block_size), "block")
    blocks = gradient_blocks(dataset, job.shard, model, tokenizer, job.modules, job.block_size, context.progress)
    return {"kind": "blocks", "num_blocks": write_blocks(context.store, call.job_id, blocks)}


STAGES = [Stage("register", run_register), Stage("blocks", run_blocks)]
PLANS = [
    JobPlan(
        "register",
        first=lambda job: "register",
        after=lambda job, stage: None,
        respond=lambda job, metadata: packed(dataset_message(metadata)),
    ),
    JobPlan(
        "blocks",
        first=lambda job: "blocks",
        after=lambda job, stage: None,
        respond=lambda job, metadata: empty_response(),
        keeps_intermediates=True,  # the blocks are the output; the servicer deletes them once relayed
    ),
]
