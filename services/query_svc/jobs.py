"""QueryService's jobs: what each computes, stored once as its spec (system/specs.py).

    ScoreJob   score queries against a dataset (or an index) with a factor set   -> results/{id}
    SelfJob    self-influence of a dataset's sequences                           -> results/{id}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..engine.records import Query
from ..engine.score import ScoreConfig
from ..system.specs import Job


@dataclass
class ScoreJob(Job):
    """Recompute scoring of a dataset (optionally of each query's lexical candidates only:
    `config.lexical`), or, with `index_id`, index scoring over the index's shards and exact rescoring of each
    query's `rescore` best candidates, merged with its `lexical` best by BM25 (0: none). (Specs written
    with a `tfidf` key, which nothing read, still decode: unknown keys are ignored.)"""

    kind: ClassVar[str] = "score"
    dataset_id: str
    shards: int
    factor_set_id: str
    result_id: str
    config: ScoreConfig
    queries: list[Query]
    index_id: str = ""
    rescore: int = 0
    lexical: int = 0  # with index_id: each query's BM25 candidates merged with the index's (0: none)
    report: bool = False  # also publish report.html (query_svc/report_html.py) with the result
    # the plan the budget chose at submission (engine/budget.py plan_score): module groups (names,
    # model order; empty: one group of every module of the factor set) and the batch size (0: the config's)
    module_groups: list[list[str]] = field(default_factory=list)
    batch_size: int = 0

    @property
    def num_shards(self) -> int:
        return self.shards

    @property
    def num_groups(self) -> int:
        return max(1, len(self.module_groups))

    def group(self, index: int) -> list[str] | None:
        """The module names of group `index`, or None for every module of the factor set (one group)."""
        return self.module_groups[index] if self.module_groups else None


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
