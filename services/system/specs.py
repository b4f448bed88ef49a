"""Job specifications: what a job computes, stored once as JSON before its first task runs.

Every task of a job reads the same spec, so a redelivered task recomputes exactly the same
output. Resource names are "datasets/{id}", "factorSets/{id}", "results/{id}".
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

# Training sequences per data shard unless a request says otherwise. A shard is the unit of
# fan-out and retry, and each costs a few tasks (≈ 35 ms on the embedded system) plus, in a fit,
# one partial sum per tracked module through the store (for an LLM's MLP, ~0.5 GB per module and
# shard), so shards should hold minutes of work, not seconds.
DEFAULT_SHARD_SIZE = 1024


@dataclass
class ModelRef:
    path: str
    device: str = "cpu"
    dtype: str = "float32"


@dataclass
class JobSpec:
    """kind: "register" | "fit" | "score" | "self" | "blocks"."""

    kind: str
    model: ModelRef
    dataset_id: str = ""
    num_shards: int = 0
    # register
    display_name: str = ""
    shard_size: int = DEFAULT_SHARD_SIZE
    max_length: int = 512
    # fit: engine FitConfig fields; score/self: engine ScoreConfig fields; blocks: shard,
    # modules, block_size
    config: dict = field(default_factory=dict)
    factor_set_id: str = ""
    result_id: str = ""
    queries: list[dict] = field(default_factory=list)
    # when the job was submitted: the create_time of what it publishes (so a retried task's
    # manifest is byte-identical to the first one's)
    create_time: float = field(default_factory=time.time)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> JobSpec:
        raw = json.loads(data)
        raw["model"] = ModelRef(**raw["model"])
        return cls(**raw)
