"""Job specifications: what a job computes, as typed objects, stored once as JSON before its first
task runs (jobs/{id}/spec.json). Every task of a job parses the same spec once, so a redelivered
task recomputes exactly the same output. Resource names are "datasets/{id}", "factorSets/{id}",
"results/{id}".

    RegisterJob  tokenise an uploaded JSONL into dataset shards            -> datasets/{id}
    FitJob       fit curvature factors on a dataset                        -> factorSets/{id}
    ScoreJob     score queries against a dataset with a factor set         -> results/{id}
    SelfJob      self-influence of a dataset's sequences                   -> results/{id}
    BlocksJob    one shard's per-sequence gradients, for StreamBlocks      -> relayed blocks
    IndexJob     a dataset's compressed gradients, as a new index or a part  -> indexes/{id}
                 appended to one
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

from ..engine.fit import FitConfig
from ..engine.index import IndexSpec
from ..engine.model_io import ModelRef
from ..engine.records import Query
from ..engine.score import ScoreConfig
from ..errors import InputError
from ..options import MAX_LENGTH, SHARD_SIZE


@dataclass
class Job:
    """Common to every job. `create_time` (submission) is the create_time of what the job
    publishes, so a retried task's manifest is byte-identical to the first one's."""

    kind: ClassVar[str] = ""
    model: ModelRef
    create_time: float = field(default_factory=time.time, kw_only=True)

    @property
    def num_shards(self) -> int:
        return 1


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


@dataclass
class FitJob(Job):
    kind: ClassVar[str] = "fit"
    dataset_id: str
    shards: int
    factor_set_id: str
    config: FitConfig

    @property
    def num_shards(self) -> int:
        return self.shards


@dataclass
class ScoreJob(Job):
    """Recompute scoring of a dataset (optionally of each query's `tfidf` nearest sequences only),
    or, with `index_id`, index scoring over the index's shards and exact rescoring of each query's
    `rescore` best candidates."""

    kind: ClassVar[str] = "score"
    dataset_id: str
    shards: int
    factor_set_id: str
    result_id: str
    config: ScoreConfig
    queries: list[Query]
    index_id: str = ""
    rescore: int = 0
    tfidf: int = 0
    report: bool = False  # also publish report.html (query_svc/report_html.py) with the result

    @property
    def num_shards(self) -> int:
        return self.shards


@dataclass
class SelfJob(Job):
    kind: ClassVar[str] = "self"
    dataset_id: str
    shards: int
    factor_set_id: str
    result_id: str
    config: ScoreConfig

    @property
    def num_shards(self) -> int:
        return self.shards


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


JOB_TYPES: dict[str, type[Job]] = {
    job.kind: job for job in (RegisterJob, FitJob, ScoreJob, SelfJob, BlocksJob, IndexJob)
}


def encode_job(job: Job) -> bytes:
    return json.dumps({"kind": job.kind, **asdict(job)}, sort_keys=True).encode()


def decode_job(data: bytes) -> Job:
    """The typed job of a spec written by `encode_job` (InputError if it is not one)."""
    try:
        raw = json.loads(data)
        job_type = JOB_TYPES[raw.pop("kind")]
        values = {}
        for item in fields(job_type):
            if item.name not in raw:
                continue
            value = raw[item.name]
            if item.name == "model":
                value = ModelRef(**value)
            elif item.name == "config":
                value = (FitConfig if job_type is FitJob else ScoreConfig)(**value)
            elif item.name == "spec":
                value = IndexSpec(**value)
            elif item.name == "queries":
                value = [Query(**query) for query in value]
            values[item.name] = value
        return job_type(**values)
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"unreadable job spec ({type(error).__name__}: {error})") from None
