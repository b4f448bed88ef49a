"""FactorService's job: what a fit computes, stored once as its spec (system/specs.py).

    FitJob   fit curvature factors on a dataset   -> factorSets/{id}
"""

from __future__ import annotations

from dataclasses import dataclass
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

    @property
    def num_shards(self) -> int:
        return self.shards
