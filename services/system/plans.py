"""Job plans: which stages a job runs, in which order, and over how many tasks.

The services define them next to their stage functions (services/factor_svc/stages.py, ...), each
with the job's spec class, the operation kinds that submit it and where the artifact its target
names lives; the top-level assembly (services/assembly.py) puts them in one `StageTable` that the
runner is given: the job runtime in services/system knows no job, stage or operation by name.

A stage runs as one task, or as one task per data shard (`per_shard`), per module group of a job
that splits its model's modules into groups (`per_group`, Job.num_groups: a fit too large for one
worker's memory, engine/budget.py), or per (shard, group): task t is shard t // groups, group
t % groups. A stage's tasks all finish before the next stage's are enqueued (fan-in,
jobs/operations.py). A stage function takes a `StageCall` and returns the published artifact's
info when it is its job's last stage, else None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InputError
from .context import WorkerContext
from .specs import Job, decode_job


@dataclass
class StageCall:
    """One task: the worker's context, the job (parsed once), its id, the stage, the shard and the
    module group (0 unless the stage runs per group), and `task`, the task's index in its stage."""

    context: WorkerContext
    job: Job
    job_id: str
    stage: str
    shard: int
    group: int = 0
    task: int = -1  # -1: the shard's

    def __post_init__(self):
        if self.task < 0:
            self.task = self.shard


@dataclass(frozen=True)
class Stage:
    name: str  # also the task kind: the Redis stream its tasks go to, what a worker pool takes
    run: Callable[[StageCall], object | None]
    per_shard: bool = False
    per_group: bool = False  # one task per module group of the job (times the shards when per_shard)
    # True when the stage may load the job's model on the job's device: its kind belongs to a pool of
    # that device (a cuda job's task on a CPU worker is left for another, WrongWorkerError). False:
    # it never does, so any worker runs it (the chart's CPU pools take only such kinds).
    loads_model: bool = True
    # Coalescing (runner.Worker's batch window): `batch_key(job, task)` names which tasks of the stage
    # may run together (the runner adds the tenant: tenants never share a batch), and
    # `run_batch(calls, progresses)` runs such tasks at once, each call's outcome its own: what it
    # would have returned alone, or the exception it would have raised (CancelledError: its operation
    # was cancelled; the others go on). None: each task runs alone.
    batch_key: Callable[[Job, int], str] | None = None
    run_batch: Callable[[list[StageCall], list], list[object]] | None = None

    def __post_init__(self):
        if (self.batch_key is None) != (self.run_batch is None):
            raise ValueError(f"stage {self.name}: a batch key needs run_batch, and run_batch a batch key")


@dataclass(frozen=True)
class JobPlan:
    job: type[Job]  # the job's spec class; its `kind` names the plan
    operations: tuple[str, ...]  # the operation kinds that submit such a job (OperationMetadata.kind)
    first: Callable[[Job], str]  # the first stage of a job
    after: Callable[[Job, str], str | None]  # the stage after one (None: the job is done)
    respond: Callable[[Job, object], bytes]  # the operation's response (a packed Any) from the last stage's info
    # the store prefix of the artifact an operation's target names ("factorSets/ID" -> "factors/ID/"),
    # "" when it names none: what a job that ends without success must not leave half-written
    target_prefix: Callable[[str], str] = lambda target: ""
    # a succeeded job's jobs/{id}/ objects are its output (StreamBlocks' blocks): not deleted by the runner
    keeps_intermediates: bool = False

    @property
    def kind(self) -> str:
        return self.job.kind


class StageTable:
    def __init__(self, plans: list[JobPlan], stages: list[Stage]):
        self.plans = {plan.kind: plan for plan in plans}
        self.stages = {stage.name: stage for stage in stages}
        self.job_types = {plan.kind: plan.job for plan in plans}
        self.by_operation = {operation: plan for plan in plans for operation in plan.operations}

    @property
    def kinds(self) -> list[str]:
        """Every task kind (stage name), in table order."""
        return list(self.stages)

    @property
    def operation_kinds(self) -> list[str]:
        """Every operation kind, in table order."""
        return list(self.by_operation)

    def plan(self, job: Job) -> JobPlan:
        return self.plans[job.kind]

    def decode(self, spec: bytes) -> Job:
        """The typed job of a stored spec (InputError if it is not one of the table's)."""
        return decode_job(spec, self.job_types)

    def check_operation(self, kind: str, job: Job | None = None) -> str:
        """`kind` if it is an operation kind of the table (of `job`'s plan, when given), else ValueError:
        a servicer submitting what no service registered is a bug."""
        plan = self.by_operation.get(kind)
        if plan is None or (job is not None and plan.kind != job.kind):
            raise ValueError(f"operation kind {kind!r} is not registered for {job.kind if job else 'any'} jobs")
        return kind

    def target_prefix(self, kind: str, target: str) -> str:
        """The store prefix of the artifact the target of an operation of `kind` names, or ""."""
        plan = self.by_operation.get(kind)
        return plan.target_prefix(target) if plan is not None and target else ""

    def stage(self, name: str) -> Stage:
        if name not in self.stages:
            raise InputError(f"unknown stage {name!r}")
        return self.stages[name]

    def tasks(self, job: Job, stage: str) -> int:
        """How many tasks a stage has: one per data shard for per-shard stages, times one per module
        group for per-group stages, else one."""
        declared = self.stage(stage)
        return (job.num_shards if declared.per_shard else 1) * (job.num_groups if declared.per_group else 1)

    def batch_key(self, job: Job, stage: str, task: int, tenant: str) -> str:
        """The batch key of a task ("": it runs alone), the tenant's own."""
        declared = self.stage(stage)
        return f"{tenant}/{declared.batch_key(job, task)}" if declared.batch_key is not None else ""

    def call(self, context: WorkerContext, job: Job, job_id: str, stage: str, task: int) -> StageCall:
        """The StageCall of task `task` of a stage: its shard and module group."""
        groups = job.num_groups if self.stage(stage).per_group else 1
        shard, group = divmod(task, groups)
        return StageCall(context, job, job_id, stage, shard, group, task)

    def check_kinds(self, kinds: list[str]) -> list[str]:
        unknown = sorted(set(kinds) - set(self.stages))
        if unknown:
            raise InputError(f"unknown task kinds {unknown} (choose from {', '.join(self.stages)})")
        return kinds
