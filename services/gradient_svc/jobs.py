"""GradientService's jobs: what each computes, stored once as its spec (system/specs.py).

    RegisterJob  tokenise an uploaded JSONL (or a corpus) into dataset shards -> datasets/{id}
    BlocksJob    one shard's per-sequence gradients, for StreamBlocks        -> relayed blocks
    IndexJob     a dataset's compressed gradients, as a new index or a part  -> indexes/{id}
                 appended to one
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

from ..engine.corpora import CorpusSpec
from ..engine.index import IndexSpec
from ..engine.records import stream_training_jsonl
from ..engine.score import ScoreConfig
from ..options import MAX_LENGTH, SHARD_SIZE
from ..rpc import validation
from ..system.specs import Job


@dataclass
class RegisterJob(Job):
    kind: ClassVar[str] = "register"
    dataset_id: str
    display_name: str = ""
    shard_size: int = SHARD_SIZE.default
    max_length: int = MAX_LENGTH.default
    # "s3://bucket/key": the JSONL the worker reads itself; "": the job's upload (jobs/{id}/upload).
    source_uri: str = ""
    # the submitting server's --max-dataset-sequences, which the worker applies to what it reads
    # (0: no limit, as in specs written before the limit existed)
    max_dataset_sequences: int = 0
    # how to read `source_uri` when it is a corpus (a Parquet object, or a prefix of Parquet,
    # `datasets` or token files) rather than TRAIN.jsonl
    corpus: CorpusSpec | None = None


def count_training_data(open_lines: Callable[[], Iterable[bytes]], source: str) -> int:
    """How many training sequences a TRAIN.jsonl holds (`open_lines()`: its lines as bytes), every
    record validated on the way (InputError naming `source` and the line, or a repeated id); read
    line by line, so memory holds one line (engine/records.stream_training_jsonl)."""
    return sum(1 for _ in stream_training_jsonl(open_lines, source))


def check_dataset_size(sequences: int, limit: int, source: str, field: str = "") -> None:
    """ResourceExhaustedError if a dataset of this many training sequences is over the server's
    --max-dataset-sequences (`limit`; 0: none). RegisterDataset checks what it reads (an upload, a
    file:// path) before submitting; the register task checks again whatever it reads, the only
    check an s3:// source gets, and fails its job at once (the error is the caller's fault)."""
    what = f"{source}: the dataset has {sequences} sequences"
    validation.within_limit(sequences, limit, "max_dataset_sequences", what, field)


@dataclass
class BlocksJob(Job):
    kind: ClassVar[str] = "blocks"
    dataset_id: str
    shard: int
    modules: str
    block_size: int


@dataclass
class IndexJob(Job):
    """Index one dataset (`dataset_id`, all its shards) as part `part` of index `index_id`, its
    sequences numbered from `start`; `base` is the index's metadata before (None: a new index)."""

    kind: ClassVar[str] = "index"
    dataset_id: str
    shards: int
    factor_set_id: str
    index_id: str
    spec: IndexSpec
    config: ScoreConfig
    part: int = 0
    start: int = 0
    base: dict | None = None

    @property
    def num_shards(self) -> int:
        return self.shards
