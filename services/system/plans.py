"""Job plans: which stages a job runs, in which order, and over how many tasks.

The services define them next to their stage functions (services/factor_svc/stages.py, ...), and
the top-level assembly (services/assembly.py) puts them in one `StageTable` that the runner is
given: the job runtime in services/system knows no stage by name.

A stage runs as one task, or as one task per data shard (`per_shard`); a stage's tasks all
finish before the next stage's are enqueued (fan-in, jobs/operations.py). A stage function takes
a `StageCall` and returns the published artifact's metadata when it is its job's last stage,
else None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InputError
from .context import WorkerContext
from .specs import Job


@dataclass
class StageCall:
    """One task: the worker's context, the job (parsed once), its id, the stage and the shard."""

    context: WorkerContext
    job: Job
    job_id: str
    stage: str
    shard: int


@dataclass(frozen=True)
class Stage:
    name: str  # also the task kind: the Redis stream its tasks go to, what a worker pool takes
    run: Callable[[StageCall], dict | None]
    per_shard: bool = False


@dataclass(frozen=True)
class JobPlan:
    kind: str  # a Job.kind
    first: Callable[[Job], str]  # the first stage of a job
    after: Callable[[Job, str], str | None]  # the stage after one (None: the job is done)
    respond: Callable[[Job, dict], bytes]  # the operation's response (a packed Any) from the last stage's metadata
    # a succeeded job's jobs/{id}/ objects are its output (StreamBlocks' blocks): not deleted by the runner
    keeps_intermediates: bool = False


class StageTable:
    def __init__(self, plans: list[JobPlan], stages: list[Stage]):
        self.plans = {plan.kind: plan for plan in plans}
        self.stages = {stage.name: stage for stage in stages}

    @property
    def kinds(self) -> list[str]:
        """Every task kind (stage name), in table order."""
        return list(self.stages)

    def plan(self, job: Job) -> JobPlan:
        return self.plans[job.kind]

    def stage(self, name: str) -> Stage:
        if name not in self.stages:
            raise InputError(f"unknown stage {name!r}")
        return self.stages[name]

    def tasks(self, job: Job, stage: str) -> int:
        """How many tasks a stage has: one per data shard for per-shard stages, else one."""
        return job.num_shards if self.stage(stage).per_shard else 1

    def check_kinds(self, kinds: list[str]) -> list[str]:
        unknown = sorted(set(kinds) - set(self.stages))
        if unknown:
            raise InputError(f"unknown task kinds {unknown} (choose from {', '.join(self.stages)})")
        return kinds
