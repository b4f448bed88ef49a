"""GradientService's jobs: dataset registration and StreamBlocks' gradient blocks.

register:  register (one task)       -> datasets/{id}/ (token shards + records), published
blocks:    blocks (one task)         -> jobs/{id}/blocks/, relayed by the servicer as written
"""

from __future__ import annotations

import json
import math

from ..engine.data import TokenizedSequence, pack_sequences, tokenize_training
from ..engine.index import Indexer
from ..engine.model_io import tokenizer_fingerprint
from ..engine.modules import TrackedModule
from ..engine.records import parse_jsonl_bytes, training_examples
from ..factor_svc.artifacts import factors_artifact, load_factor_set
from ..rpc.resources import dataset_message, empty_response, index_message, packed
from ..storage import ArtifactWriter, FileEntry, split_s3_uri
from ..storage.manifest import sha256_buffers
from ..storage.tensors import encode_tensors
from ..system import layout
from ..system.plans import JobPlan, Stage, StageCall
from ..system.specs import BlocksJob, IndexJob, RegisterJob
from . import indexes
from .blocks import gradient_blocks, write_blocks
from .datasets import check_dataset_size, dataset_artifact, dataset_metadata, load_records, shard_sequences


def run_register(call: StageCall) -> dict:
    """Tokenise the uploaded JSONL (or the object at the job's s3:// URI) into shards and publish
    the dataset."""
    job: RegisterJob = call.job
    context = call.context
    if job.source_uri:
        bucket, key = split_s3_uri(job.source_uri, "uri")
        raw, what = context.store.in_bucket(bucket).get_bytes(key), job.source_uri
    else:
        raw, what = context.store.get_bytes(layout.job_upload(call.job_id)), "uploaded dataset"
    examples = training_examples(parse_jsonl_bytes(raw, what, "training data"), what)
    check_dataset_size(len(examples), job.max_dataset_sequences, what)  # permanent: fails the job at once
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


def _indexer(call: StageCall) -> Indexer:
    job: IndexJob = call.job
    model, tokenizer = call.context.models.get(job.model)
    factors = call.context.artifacts.get(
        ("factors", job.factor_set_id), lambda: load_factor_set(call.context.store, job.factor_set_id)
    )
    return Indexer(model, tokenizer, factors, job.spec, job.config)


def run_index_shard(call: StageCall) -> None:
    """One shard's compressed gradients as block files under the index's prefix; the files'
    entries (sha256, size, in the order written) go to a job intermediate for the publish."""
    job: IndexJob = call.job
    indexer = _indexer(call)
    sequences = [
        TokenizedSequence(job.start + sequence.index, sequence.input_ids, sequence.target_mask)
        for sequence in shard_sequences(call.context, job.dataset_id, call.shard)
    ]
    prefix, written, count = layout.index_prefix(job.index_id), {}, 0
    for number, block in enumerate(indexer.blocks(sequences, call.context.progress)):
        name = layout.index_block(job.part, call.shard, number)
        buffers = encode_tensors(block)
        call.context.store.put_buffers(prefix + name, buffers)
        written[name] = {"sha256": sha256_buffers(buffers), "size": sum(buffer.nbytes for buffer in buffers)}
        count += int(block["index"].numel())
    entries = {"shard": call.shard, "count": count, "files": written, "damping": indexer.damping_values()}
    call.context.store.put_bytes(
        layout.job_entries(call.job_id, "index_shard", call.shard), json.dumps(entries).encode()
    )


def run_index_publish(call: StageCall) -> dict:
    """The index's manifest: the earlier parts (an append) and this job's part, every file listed."""
    job: IndexJob = call.job
    store = call.context.store
    shards = [
        json.loads(store.get_bytes(layout.job_entries(call.job_id, "index_shard", shard)))
        for shard in range(job.num_shards)
    ]
    dataset = dataset_metadata(store, job.dataset_id)
    part = {
        "dataset": f"datasets/{job.dataset_id}",
        "start": job.start,
        "num_examples": dataset["num_examples"],
        "shards": [{"shard": s["shard"], "count": s["count"], "blocks": sorted(s["files"])} for s in shards],
    }
    files = {
        name: FileEntry(name, entry["sha256"], entry["size"]) for s in shards for name, entry in s["files"].items()
    }
    if job.base is None:
        factors = factors_artifact(store, job.factor_set_id).metadata  # its manifest alone: no tensors read
        tracked = {
            name: TrackedModule(name, m["d_in"], m["d_out"], m["has_bias"], m["transposed"])
            for name, m in factors["modules"].items()
        }
        metadata = {
            "kind": indexes.KIND,
            "format_version": indexes.FORMAT_VERSION,
            "name": f"indexes/{job.index_id}",
            "spec": job.spec.to_dict(),
            "strategy": factors["strategy"],
            "factor_set": f"factorSets/{job.factor_set_id}",
            "model_path": job.model.path,
            "model_fingerprint": factors["model_fingerprint"],
            "tokenizer_fingerprint": dataset["tokenizer_fingerprint"],
            "damping": {
                "factor": job.config.damping_factor,
                "absolute": job.config.damping,
                "policy": job.config.damping_policy.describe(),
                "values": shards[0]["damping"],
            },
            "modules": list(shards[0]["damping"]),
            "bytes_per_sequence": job.spec.bytes_per_sequence(tracked),
            "create_time": job.create_time,
            "parts": [part],
        }
    else:
        metadata = {**job.base, "parts": [*job.base["parts"], part]}
        files.update(indexes.index_artifact(store, job.index_id).manifest.files)
    metadata["num_examples"] = sum(p["num_examples"] for p in metadata["parts"])
    indexes.publish(store, job.index_id, metadata, files)
    return metadata


STAGES = [
    Stage("register", run_register),
    Stage("blocks", run_blocks),
    Stage("index_shard", run_index_shard, per_shard=True),
    Stage("index_publish", run_index_publish),
]
PLANS = [
    JobPlan(
        "register",
        first=lambda job: "register",
        after=lambda job, stage: None,
        respond=lambda job, metadata: packed(dataset_message(metadata)),
    ),
    JobPlan(
        "index",
        first=lambda job: "index_shard",
        after=lambda job, stage: {"index_shard": "index_publish"}.get(stage),
        respond=lambda job, metadata: packed(index_message(metadata)),
    ),
    JobPlan(
        "blocks",
        first=lambda job: "blocks",
        after=lambda job, stage: None,
        respond=lambda job, metadata: empty_response(),
        keeps_intermediates=True,  # the blocks are the output; the servicer deletes them once relayed
    ),
]
