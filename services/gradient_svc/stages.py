"""GradientService's jobs: dataset registration, StreamBlocks' gradient blocks and the index.

register:  register (one task)                -> datasets/{id}/ (token shards + records), published
blocks:    blocks (one task)                  -> jobs/{id}/blocks/, relayed by the servicer as written
index:     index_shard × shards -> index_publish  -> indexes/{id}/ (a new index, or a part appended)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..catalog import factor_sets, indexes
from ..catalog.datasets import DATASETS, DatasetInfo, DatasetWriter, ShardRecords, load_records, shard_sequences
from ..catalog.factor_sets import FACTOR_SETS
from ..catalog.indexes import INDEXES, IndexDamping, IndexInfo, IndexPart, IndexShard
from ..engine.corpora import CorpusSpec, write_jsonl
from ..engine.data import TokenizedSequence, rendered, tokenize_training
from ..engine.index import Indexer, block_bytes
from ..engine.model_io import tokenizer_fingerprint
from ..engine.records import TrainingExample, file_lines, stream_training_jsonl
from ..rpc.messages import empty_response, packed
from ..storage import FileEntry, split_s3_uri
from ..storage.manifest import sha256_buffers
from ..storage.tensors import encode_tensors
from ..system import layout
from ..system.plans import JobPlan, Stage, StageCall
from .blocks import gradient_blocks, write_blocks
from .jobs import BlocksJob, IndexJob, RegisterJob, check_dataset_size, count_training_data
from .messages import dataset_message, index_message

# A tokeniser call takes at least one example, more while their texts stay under this many bytes:
# batching keeps the tokeniser fast, the bound keeps memory at about one line's worth.
_TOKENIZE_BYTES = 1 << 20


def run_register(call: StageCall) -> DatasetInfo:
    """Tokenise the uploaded JSONL (or the object at the job's s3:// URI) into shards and publish
    the dataset. The JSONL is copied to a local file and read line by line, twice: once to validate
    and count it, once to tokenise it, each shard written as it fills; memory holds about one line
    and one shard's (truncated) token ids, never the file."""
    job: RegisterJob = call.job
    context = call.context
    with tempfile.TemporaryDirectory(prefix="register-") as directory:
        local = Path(directory) / "train.jsonl"
        if job.source_uri and job.corpus is not None:
            _corpus_jsonl(context.store, job.source_uri, job.corpus, Path(directory) / "corpus", local)
            what = job.source_uri
        elif job.source_uri:
            bucket, key = split_s3_uri(job.source_uri, "uri")
            context.store.in_bucket(bucket).get_file(key, local)
            what = job.source_uri
        else:
            context.store.get_file(layout.job_upload(call.job_id), local)
            what = "uploaded dataset"

        def open_lines():
            return file_lines(local, what)

        count = count_training_data(open_lines, what)
        check_dataset_size(count, job.max_dataset_sequences, what)  # permanent: fails the job at once
        tokenizer = context.models.tokenizer(job.model.path, job.model.base)
        num_shards = math.ceil(count / job.shard_size)
        context.progress.stage("register", num_shards, "shard")
        writer = DatasetWriter(context.store, job.dataset_id, context.artifacts)
        examples = stream_training_jsonl(open_lines, what)
        num_tokens = 0
        try:
            for shard in range(num_shards):
                sequences: list[TokenizedSequence] = []
                with ShardRecords() as records:
                    for batch in _batches(itertools.islice(examples, job.shard_size)):
                        batch = rendered(tokenizer, batch)  # chats as the records keep them: rendered
                        start = shard * job.shard_size + len(sequences)
                        sequences += tokenize_training(tokenizer, batch, job.max_length, start_index=start)
                        records.add(batch)
                    writer.add_shard(sequences, records)
                tokens = sum(sequence.length for sequence in sequences)
                num_tokens += tokens
                context.progress.advance(1, tokens)
        finally:
            examples.close()
    info = DatasetInfo(
        id=job.dataset_id,
        num_examples=count,
        num_shards=num_shards,
        shard_size=job.shard_size,
        max_length=job.max_length,
        num_tokens=num_tokens,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        display_name=job.display_name,
        create_time=job.create_time,
    )
    return writer.publish(info)


def _corpus_jsonl(store, uri: str, corpus: CorpusSpec, directory: Path, out: Path) -> None:
    """The corpus at `uri` (an object, or every object under a prefix "…/", fetched one at a time
    into `directory` under their names below it) as TRAIN.jsonl lines in `out` (engine/corpora.py)."""
    bucket, key = split_s3_uri(uri, "uri", prefix=True)
    source = store.in_bucket(bucket)
    if not key.endswith("/"):
        write_jsonl(source.get_file(key, directory / Path(key).name), corpus, out)
        return
    for name in source.list(key):
        source.get_file(name, directory / name[len(key) :])
    write_jsonl(directory, corpus, out)


def _batches(examples: Iterator[TrainingExample]) -> Iterator[list[TrainingExample]]:
    """The examples in consecutive lists of at least one, more while under _TOKENIZE_BYTES of text."""
    batch, size = [], 0
    for example in examples:
        length = len(example.text) + sum(len(message.content) for message in example.messages)
        if batch and size + length > _TOKENIZE_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(example)
        size += length
    if batch:
        yield batch


def run_blocks(call: StageCall) -> dict:
    job: BlocksJob = call.job
    context = call.context
    model, tokenizer = context.models.get(job.model)
    dataset = DATASETS.open(context.store, job.dataset_id).reader
    context.progress.stage("blocks", -(-len(load_records(dataset, job.shard)) // job.block_size), "block")
    blocks = gradient_blocks(dataset, job.shard, model, tokenizer, job.modules, job.block_size, context.progress)
    return {"kind": "blocks", "num_blocks": write_blocks(context.store, call.job_id, blocks)}


def _indexer(call: StageCall) -> Indexer:
    job: IndexJob = call.job
    model, tokenizer = call.context.models.get(job.model)
    factors = factor_sets.load_cached(call.context.artifacts, call.context.store, job.factor_set_id)
    return Indexer(model, tokenizer, factors, job.spec, job.config)


def run_index_shard(call: StageCall) -> None:
    """One shard's compressed gradients as block files under the index's prefix; the files'
    entries (sha256, size, in the order written) go to a job intermediate for the publish."""
    job: IndexJob = call.job
    indexer = _indexer(call)
    sequences = [
        TokenizedSequence(job.start + sequence.index, sequence.input_ids, sequence.target_mask)
        for sequence in shard_sequences(call.context.artifacts, call.context.store, job.dataset_id, call.shard)
    ]
    prefix, written, sizes = INDEXES.prefix(job.index_id), {}, {}

    def write(number: int, block: dict) -> None:
        if number == 0:  # the pass (again, at a lower batch size after an out-of-memory error): from the start
            written.clear()
            sizes.clear()
        name = indexes.block_file(job.part, call.shard, number)
        buffers = encode_tensors(block)
        call.context.store.put_buffers(prefix + name, buffers)
        written[name] = {"sha256": sha256_buffers(buffers), "size": sum(buffer.nbytes for buffer in buffers)}
        sizes[name] = (int(block["index"].numel()), block_bytes(block))

    batch_size = indexer.write_blocks(sequences, write, call.context.progress)
    entries = {
        "shard": call.shard,
        "count": sum(count for count, _ in sizes.values()),
        "bytes": sum(size for _, size in sizes.values()),
        "files": written,
        "damping": indexer.damping_values(),
        "batch_size": batch_size,  # the pass's (lower than the job's after an out-of-memory error)
    }
    call.context.store.put_bytes(
        layout.job_entries(call.job_id, "index_shard", call.shard), json.dumps(entries).encode()
    )


def run_index_publish(call: StageCall) -> IndexInfo:
    """The index's manifest: the earlier parts (an append) and this job's part, every file listed."""
    job: IndexJob = call.job
    store = call.context.store
    shards = [
        json.loads(store.get_bytes(layout.job_entries(call.job_id, "index_shard", shard)))
        for shard in range(job.num_shards)
    ]
    dataset = DATASETS.read(store, job.dataset_id)
    part = IndexPart(
        dataset_id=job.dataset_id,
        start=job.start,
        num_examples=dataset.num_examples,
        shards=tuple(IndexShard(s["shard"], s["count"], tuple(sorted(s["files"]))) for s in shards),
        batch_sizes=tuple(sorted({s["batch_size"] for s in shards if "batch_size" in s})),
    )
    files = {
        name: FileEntry(name, entry["sha256"], entry["size"]) for s in shards for name, entry in s["files"].items()
    }
    if job.base is None:
        factors = FACTOR_SETS.read(store, job.factor_set_id)  # its manifest alone: no tensors read
        info = IndexInfo(
            id=job.index_id,
            spec=job.spec,
            strategy=factors.strategy,
            factor_set_id=job.factor_set_id,
            model_path=job.model.path,
            model_fingerprint=factors.model_fingerprint,
            tokenizer_fingerprint=dataset.tokenizer_fingerprint,
            damping=IndexDamping(
                factor=job.config.damping_factor,
                absolute=job.config.damping,
                policy=job.config.damping_policy.describe(),
                values=shards[0]["damping"],
            ),
            modules=tuple(shards[0]["damping"]),
            bytes_per_sequence=round(sum(s["bytes"] for s in shards) / max(part.num_examples, 1)),
            create_time=job.create_time,
            parts=(part,),
        )
    else:
        base = IndexInfo.from_metadata(job.base, INDEXES.describe(job.index_id))
        total = base.bytes_per_sequence * base.num_examples + sum(s["bytes"] for s in shards)
        info = dataclasses.replace(
            base,
            parts=(*base.parts, part),
            bytes_per_sequence=round(total / max(base.num_examples + part.num_examples, 1)),
        )
        files.update(INDEXES.open(store, job.index_id).reader.manifest.files)
    return indexes.publish(store, info, files)


STAGES = [
    Stage("register", run_register, loads_model=False),
    Stage("blocks", run_blocks, loads_model=True),
    Stage("index_shard", run_index_shard, per_shard=True, loads_model=True),
    Stage("index_publish", run_index_publish, loads_model=False),
]
PLANS = [
    JobPlan(
        RegisterJob,
        operations=("register_dataset",),
        first=lambda job: "register",
        after=lambda job, stage: None,
        respond=lambda job, info: packed(dataset_message(info)),
        target_prefix=DATASETS.prefix_of,
    ),
    JobPlan(
        IndexJob,
        operations=("build_index", "append_index"),
        first=lambda job: "index_shard",
        after=lambda job, stage: {"index_shard": "index_publish"}.get(stage),
        respond=lambda job, info: packed(index_message(info)),
        target_prefix=INDEXES.prefix_of,  # an append's index is published: it keeps its earlier parts
    ),
    JobPlan(
        BlocksJob,
        operations=("stream_blocks",),
        first=lambda job: "blocks",
        after=lambda job, stage: None,
        respond=lambda job, result: empty_response(),
        keeps_intermediates=True,  # the blocks are the output; the servicer deletes them once relayed
    ),
]
