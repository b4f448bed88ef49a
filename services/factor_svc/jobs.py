"""FactorService's job: what a fit computes, stored once as its spec (system/specs.py).

FitJob   fit curvature factors on a dataset   -> factorSets/{id}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..engine.fit import FitConfig
from ..system.specs import Job


@dataclass
class FitJob(Job):
    kind: ClassVar[str] = "fit"
    dataset_id: str
    shards: int
    factor_set_id: str
    config: FitConfig
    # the plan the budget chose at submission (engine/budget.py): module groups (names, model
    # order; empty: one group of every tracked module) and the batch size (0: the config's)
    module_groups: list[list[str]] = field(default_factory=list)
    batch_size: int = 0

    @property
    def num_shards(self) -> int:
        return self.shards

    @property
    def num_groups(self) -> int:
        return max(1, len(self.module_groups))

    def group(self, index: int) -> list[str] | None:
        """The module names of group `index`, or None for every tracked module (one group)."""
        return self.module_groups[index] if self.module_groups else None
