"""Submitting jobs and running their tasks: the glue between the stage table, the queue and the
operation records. Which stages a job has is the table's business (plans.py), given by the
top-level assembly.

Submit: write the job's inputs and spec to the store, then create the operation, claim its
request id and enqueue the first stage's tasks in one atomic step (OperationStore.create); a
submission that fails before that step deletes what it wrote, and one whose clean-up cannot run
(its server died, the store or Redis away) is found by a worker's sweep of abandoned submissions.
Run: take a task, skip it if its operation ended, parse its job once, run the stage under a
renewed lease, then record completion; the last task of a stage atomically enqueues the next
stage (or finishes the operation with its response).
Failures: an error that is the caller's fault (errors.py `callers_fault`) fails the operation at
once; anything else releases the task for a redelivery after a short backoff (a worker that dies
leaves it to be reclaimed after its lease); past the delivery limit it is dead-lettered and the
operation fails with that task's own last error. A job that ends without success leaves no
jobs/{id}/ objects behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from google.rpc import code_pb2

from ..engine.progress import Progress
from ..engine.resources import available_cores
from ..errors import (
    CancelledError,
    DomainError,
    ResourceExhaustedError,
    UnavailableError,
    caller_message,
    code_of,
    message_of,
)
from ..gen.influence.internal.v1 import tasks_pb2
from ..jobs.operations import SUCCEEDED, TERMINAL, OperationStore, new_operation_id
from ..jobs.queue import LeaseKeeper, Task, TaskQueue
from ..storage import MANIFEST, ArtifactStore, PrefixedStore
from . import layout, metrics
from .context import WorkerContext
from .plans import StageCall, StageTable
from .specs import Job, encode_job

log = logging.getLogger("influence.worker")


@dataclass
class JobSystem:
    """The shared state every server role and worker composes."""

    store: ArtifactStore
    operations: OperationStore
    queue: TaskQueue
    table: StageTable
    # Tasks a stream may hold (waiting or running) before a new job whose first stage is that
    # stream is refused with RESOURCE_EXHAUSTED (0: no bound). Refusing beats queueing work
    # nobody will see finish: callers back off or go elsewhere.
    max_queued_tasks: int = 0
    tenant: str = layout.DEFAULT_TENANT
    # per tenant: at most this many queued or running operations (0: no quota)
    max_queued_operations: int = 0
    # a submission that has not made its operation this long after it began is abandoned, its
    # inputs deleted by a worker's sweep (INFLUENCE_SUBMIT_GRACE_SECONDS)
    submit_grace_seconds: float = 900.0

    def for_tenant(self, tenant: str) -> JobSystem:
        """The system as `tenant` sees it: its own part of the store (layout.tenant_prefix), its
        operations. Servicers use only this view, so no request can name another tenant's data."""
        if tenant == self.tenant:
            return self
        return dataclasses.replace(self, store=tenant_store(self.store, tenant), tenant=tenant)

    def unhealthy(self) -> str | None:
        """Why the system cannot serve right now (Redis unreachable or unable to hold the queue:
        read-only, out of memory; the store unreachable), or None. Redis that lost its data is
        noticed here (`OperationStore.check_data`) and its consumer groups made again."""
        try:
            self.queue.client.ping()
        except Exception as error:  # any failure to reach Redis is the answer, not an error here
            return f"Redis unreachable: {error}"
        try:
            self.operations.check_data()
            self.queue.ensure_groups(self.table.kinds)
        except Exception as error:
            return f"Redis cannot hold the queue: {error}"
        try:
            self.store.exists("health-probe")
        except Exception as error:
            return f"object store {self.store.describe()} unreachable: {error}"
        return None

    def payload(self, operation: str, job: Job, stage: str, shard: int) -> bytes:
        return tasks_pb2.TaskPayload(
            operation=operation, job=operation, stage=stage, shard=shard, num_shards=job.num_shards
        ).SerializeToString()

    def stage_tasks(self, operation: str, job: Job, stage: str, tenant: str) -> list[tuple[str, bytes, str]]:
        """The (stream, payload, batch key) of each task of a job's stage, for `tenant`'s operation."""
        return [
            (
                self.queue.stream(stage),
                self.payload(operation, job, stage, task),
                self.table.batch_key(job, stage, task, tenant),
            )
            for task in range(self.table.tasks(job, stage))
        ]

    def submit(
        self, kind: str, job: Job, *, request_id: str = "", target: str = "", upload: bytes | Path | None = None
    ) -> dict:
        """Create the operation and enqueue the job, once per request_id (a request id used before
        returns its operation, and nothing is written). ResourceExhaustedError when the first
        stage's stream is full (`max_queued_tasks`) or the tenant at its quota. Nothing is left
        half-made: the inputs (`upload`) and spec are written under a fresh id first, the operation
        made in one atomic step after; a failure in between deletes them again (or leaves them to
        `sweep_submissions` if it cannot), and a crash in between leaves no operation and no claimed
        request id, so a retry makes the job once."""
        self.table.check_operation(kind, job)
        stage = self.table.plan(job).first(job)
        earlier = self.operations.find_request(request_id, self.tenant)
        if earlier is not None:
            return earlier
        if self.max_queued_tasks:
            queued, adding = self.queue.depth(stage), self.table.tasks(job, stage)
            if queued + adding > self.max_queued_tasks:
                raise ResourceExhaustedError(
                    f"the {stage} queue holds {queued} tasks; the limit is {self.max_queued_tasks} "
                    "(INFLUENCE_MAX_QUEUED_TASKS): try again later"
                )
        job_id = new_operation_id()
        submission = self.operations.begin_submission(self.tenant, job_id)
        try:
            if isinstance(upload, Path):
                self.store.put_file(layout.job_upload(job_id), upload)
            elif upload is not None:
                self.store.put_bytes(layout.job_upload(job_id), upload)
            self.store.put_bytes(layout.job_spec(job_id), encode_job(job))
            crash_point("submit:written")
            record, created = self.operations.create(
                kind,
                {"kind": kind, "target": target},
                request_id,
                tenant=self.tenant,
                quota=self.max_queued_operations,
                operation_id=job_id,
                stage=stage,
                tasks=self.stage_tasks(job_id, job, stage, self.tenant),
                submission=submission,
            )
            crash_point("submit:created")
        except BaseException:
            self._abandon(job_id, submission)
            raise
        if not created:  # a concurrent call with the same request id made its operation first
            self._abandon(job_id, submission)
        return record

    def _abandon(self, job_id: str, submission: str) -> None:
        """Delete the inputs of a submission that made no operation; when that cannot be done now
        (Redis or the store away), its marker stays for `sweep_submissions`."""
        try:
            if self.operations.get(job_id) is None:  # else it was made after all (its reply was lost)
                self.store.delete_prefix(layout.job_prefix(job_id))
            self.operations.end_submission(submission)
        except Exception as error:
            log.warning("the inputs of abandoned submission %s stay for a sweep: %s", job_id, message_of(error))
            with contextlib.suppress(Exception):
                self.operations.keep_submission(submission)

    def sweep_submissions(self) -> int:
        """Delete the inputs of submissions begun over `submit_grace_seconds` ago that never made
        their operation; how many. Each is taken by one sweeper; one whose inputs cannot be deleted
        now is put back for a later sweep. A submission still running when swept is refused when it
        tries to make its operation (and its caller retries)."""
        swept = 0
        for member, started in self.operations.take_abandoned_submissions(self.submit_grace_seconds):
            tenant, job_id = member.split("/", 1)
            try:
                if self.operations.get(job_id) is None:
                    tenant_store(self.store, tenant).delete_prefix(layout.job_prefix(job_id))
                    swept += 1
            except Exception as error:
                log.warning("could not sweep abandoned submission %s: %s", job_id, message_of(error))
                self.operations.keep_submission(member, started)
        return swept

    def record_done(self, kind: str, response: bytes, *, request_id: str = "", target: str = "") -> dict:
        """An operation that is done at once with `response` (e.g. a dataset registered before):
        callers see the usual operation, without a job."""
        self.table.check_operation(kind)
        record, _ = self.operations.create(
            kind, {"kind": kind, "target": target}, request_id, tenant=self.tenant, response=response
        )
        return record


def crash_point(name: str) -> None:
    """Tests only: the process SIGKILLs itself here when INFLUENCE_TEST_CRASH_AT is `name` (to prove
    what a server dying at exactly this point leaves behind)."""
    if os.environ.get("INFLUENCE_TEST_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _test_unit_seconds() -> float:
    """Tests only: INFLUENCE_TEST_UNIT_SECONDS slows every unit of a task's progress (a batch) by this
    long, so that a test can stop a worker while its task surely has much left to do."""
    return float(os.environ.get("INFLUENCE_TEST_UNIT_SECONDS", "0") or 0)


def tenant_store(store: ArtifactStore, tenant: str) -> ArtifactStore:
    """`store` as `tenant` sees it (the store itself for the default tenant)."""
    prefix = layout.tenant_prefix(tenant)
    return PrefixedStore(store, prefix) if prefix else store


class OperationProgress(Progress):
    """Reports the task's step (name, units done of total) and tokens to the operation record, at
    most twice a second (a step that just began is written within 0.1 s; a step that ends, its
    final counts at once, so the record's step history holds every step), and notices
    cancellation (checked at most once a second)."""

    WRITE_SECONDS = 0.5
    NEW_STEP_SECONDS = 0.1

    def __init__(self, operations: OperationStore, operation: str):
        self.operations, self.operation = operations, operation
        self._checked, self._cancelled, self._tokens = 0.0, False, 0
        self._reported = 0.0  # a task's first step is written at once
        self._step: dict | None = None
        self._step_dirty = False
        self._unit_seconds = _test_unit_seconds()

    def stage(self, name: str, total: int, unit: str = "batch") -> None:
        self.flush()  # the step that ends has its final counts written, however short it was
        self._step = {"step": name, "step_done": 0, "step_total": total, "step_unit": unit}
        self._step_dirty = True
        self._report(self.NEW_STEP_SECONDS)

    def advance(self, units: int = 1, tokens: int = 0) -> None:
        if self._unit_seconds:
            time.sleep(self._unit_seconds * units)
        self._tokens += tokens
        if self._step is not None:
            self._step["step_done"] += units
            self._step_dirty = True
        self._report(self.WRITE_SECONDS)

    def _report(self, after_seconds: float) -> None:
        if time.monotonic() - self._reported <= after_seconds or not (self._tokens or self._step_dirty):
            return
        try:
            self.operations.report(self.operation, step=self._step if self._step_dirty else None, tokens=self._tokens)
        except UnavailableError as error:  # Redis away: the work goes on; progress is written once it is back
            self._reported = time.monotonic()
            log.warning("progress of %s not written: %s", self.operation, error)
            return
        self._tokens, self._step_dirty, self._reported = 0, False, time.monotonic()

    def flush(self) -> None:
        """Write the step's final state now (at the end of a task), tokens excepted (those travel
        with the task's completion, `unreported`)."""
        if self._step_dirty:
            with contextlib.suppress(UnavailableError):  # progress only: the completion follows
                self.operations.report(self.operation, step=self._step)
            self._step_dirty = False

    def cancelled(self) -> bool:
        if time.monotonic() - self._checked > 1.0:
            self._checked = time.monotonic()
            with contextlib.suppress(UnavailableError):  # Redis away: keep working; asked again in a second
                self._cancelled = self.operations.is_cancelled(self.operation)
        return self._cancelled

    def unreported(self) -> dict[str, int]:
        """Counts not written yet, now the caller's to write (with the task's completion)."""
        tokens, self._tokens = self._tokens, 0
        return {"tokens_processed": tokens} if tokens else {}


def threads_per_worker(workers: int) -> int:
    """torch CPU threads for each of `workers` worker threads sharing this process.

    torch's OpenMP teams are per thread; once the teams of live threads together exceed the
    cores, every parallel region waits on the others (measured 2-5x slower small ops on 2 cores),
    so the cores are split between the workers."""
    return max(1, available_cores() // max(1, workers))


class PrefixDeleter:
    """Deletes store prefixes on a thread of its own, in order, so that removing a finished
    job's objects (a few ms, more on S3) does not delay the worker's next task. `close` waits
    for what was submitted; what a killed process leaves is garbage, never state."""

    def __init__(self, store):
        self.store = store
        self._prefixes: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, prefix: str) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="prefix-deleter", daemon=True)
                self._thread.start()
            self._prefixes.put(prefix)

    def _run(self) -> None:
        while (prefix := self._prefixes.get()) is not None:
            try:
                self.store.delete_prefix(prefix)
            except Exception as error:  # the store briefly away: the objects are garbage, not state
                log.warning("could not delete %s: %s", prefix, error)

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._prefixes.put(None)
        if thread is not None:
            thread.join(timeout)


@dataclass
class _Member:
    """A task admitted to run (runner.Worker._admit): its payload, its operation's tenant and target
    prefix, how its errors name it, its progress; its job and StageCall once its spec is read."""

    task: Task
    payload: tasks_pb2.TaskPayload
    tenant: str
    target: str
    where: str
    task_name: str
    progress: OperationProgress
    job: Job | None = None
    call: StageCall | None = None


@dataclass
class Worker:
    """Takes tasks of `kinds` (default: every stage of the table) and runs them until `stop` is set."""

    system: JobSystem
    kinds: list[str] | None = None
    consumer: str = field(default_factory=lambda: f"worker-{uuid.uuid4().hex[:8]}")
    context: WorkerContext | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    # torch CPU threads for this worker's thread (None: every available core). Several workers
    # in one process should split the cores (see `threads_per_worker`).
    torch_threads: int | None = None
    # Coalescing: a task of a stage that runs batches (Stage.run_batch) is run together with the tasks
    # of its batch key (same tenant, index and shard: plans.StageTable.batch_key) waiting at the head
    # of its stream or enqueued until `coalesce_seconds` after it was (a task that waited that long
    # already goes with those waiting), at most `coalesce_limit` in all. 0 s: every task alone (the
    # default here; `influence serve|worker --coalesce-ms` default to 200 ms).
    coalesce_seconds: float = 0.0
    coalesce_limit: int = 16
    _next_sweep: float = field(default=0.0, init=False)  # when to sweep abandoned submissions next
    # set when run_forever has returned (its task, if any, finished)
    stopped: threading.Event = field(default_factory=threading.Event, init=False)

    def __post_init__(self):
        self.kinds = self.system.table.check_kinds(self.kinds or self.system.table.kinds)
        self.context = self.context or WorkerContext(self.system.store)
        self.lease = LeaseKeeper(self.system.queue, self.consumer)
        self._deleter = PrefixDeleter(self.system.store)

    @property
    def not_serving(self) -> str | None:
        """Why this worker takes no task (its device is unusable: WorkerContext.device_problem), or None."""
        return self.context.device_problem

    def run_forever(self, block_ms: int = 500) -> None:
        serving = metrics.WORKER_SERVING.labels(self.consumer, self.context.device)
        if self.not_serving:
            # One line, then nothing: a task taken here could only fail, and not by its caller's fault.
            log.error("worker %s NOT_SERVING, taking no tasks: %s", self.consumer, self.not_serving)
            serving.set(0)
            self.stop.wait()
            with contextlib.suppress(KeyError):  # another worker of this name removed it
                metrics.WORKER_SERVING.remove(self.consumer, self.context.device)
            self.stopped.set()
            return
        log.info("worker %s taking %s on %s", self.consumer, ",".join(self.kinds), self.context.device)
        serving.set(1)
        # Always set: torch keeps one global default that any thread's set_num_threads changes.
        torch.set_num_threads(self.torch_threads or available_cores())
        try:
            while not self.stop.is_set():
                try:
                    self.run_once(block_ms)
                except Exception:  # Redis or the store away: keep the worker alive and retry
                    log.exception("worker %s: task loop error", self.consumer)
                    self.stop.wait(1.0)
        finally:
            with contextlib.suppress(KeyError):  # another worker of this name removed it
                metrics.WORKER_SERVING.remove(self.consumer, self.context.device)
            self.lease.close()
            self._deleter.close()
            for job in self.context.captures.jobs():
                self.context.captures.release_job(job)
            self.stopped.set()

    def drain(self, seconds: float, then: Callable[[], None]) -> None:
        """Take no further task (a pod being stopped: SIGTERM); the running one may finish for
        `seconds` (0: however long it takes). Past that, hand its lease back (another worker takes
        it at once, rather than a lease after this one is killed) and call `then` (the process
        exits). Returns at once."""
        self.stop.set()
        if seconds <= 0:
            return

        def deadline() -> None:
            if self.stopped.wait(seconds):
                return  # finished in time
            for task in self.lease.hand_back():
                log.warning(
                    "worker %s draining: %s task %s handed back unfinished", self.consumer, task.kind, task.message_id
                )
            then()

        threading.Thread(target=deadline, name="drain", daemon=True).start()

    def run_once(self, block_ms: int = 500) -> bool:
        """Run the next task if one comes within `block_ms`; True if one ran. Either way, release
        the capture caches of jobs that have ended, and now and then sweep abandoned submissions. A
        worker that is not serving takes none."""
        if self.not_serving:
            return False
        task = self.system.queue.take(self.kinds, self.consumer, block_ms)
        if task is not None:
            started = time.perf_counter()
            tasks = self.coalesced(task)
            for each, outcome in zip(tasks, self.handle_batch(tasks), strict=True):
                metrics.TASK_SECONDS.labels(each.kind, outcome).observe(time.perf_counter() - started)
        self.release_ended_caches()
        if time.monotonic() >= self._next_sweep:  # at most every minute (half the grace, if shorter)
            self._next_sweep = time.monotonic() + min(60.0, self.system.submit_grace_seconds / 2)
            if swept := self.system.sweep_submissions():
                log.info("deleted the inputs of %d abandoned submissions", swept)
        return task is not None

    def release_ended_caches(self) -> None:
        operations = self.system.operations

        def ended(job: str) -> bool:
            record = operations.get(job)
            return record is None or record["state"] in TERMINAL

        self.context.captures.release_ended(ended)

    def coalesced(self, task: Task) -> list[Task]:
        """`task` and the tasks this worker takes to run with it (see `coalesce_seconds`), in order:
        `task` alone when coalescing is off or it has no batch key."""
        if not task.key or self.coalesce_seconds <= 0 or self.coalesce_limit <= 1:
            return [task]
        tasks, deadline_ms = [task], task.enqueued_ms + 1000 * self.coalesce_seconds
        while len(tasks) < self.coalesce_limit:
            more, now_ms = self.system.queue.take_matching(task, self.consumer, self.coalesce_limit - len(tasks))
            tasks += more
            if now_ms >= deadline_ms or len(tasks) >= self.coalesce_limit:
                break
            if self.stop.wait(min(0.05, (deadline_ms - now_ms) / 1000)):
                break
        if len(tasks) > 1:
            log.info("worker %s: %d %s tasks coalesced", self.consumer, len(tasks), task.kind)
        return tasks

    def handle(self, task: Task) -> str:
        """Run one task; its outcome: succeeded, failed (the operation failed), retry (released for
        redelivery after a backoff), cancelled, dead_lettered, or skipped (its operation had ended)."""
        return self.handle_batch([task])[0]

    def handle_batch(self, tasks: list[Task]) -> list[str]:
        """Run tasks of one kind (a coalesced batch: `coalesced`; one task otherwise) and give each
        its own outcome, as `handle` does for one: a member whose operation ended is skipped, one past
        its deliveries dead-lettered, the others run together (Stage.run_batch) and each settled
        alone (recorded, released for a retry, failed, cancelled). Tenants never share a run."""
        outcomes: list[str | None] = [None] * len(tasks)
        by_tenant: dict[str, list[tuple[int, _Member]]] = {}
        for position, task in enumerate(tasks):
            admitted = self._admit(task)
            if isinstance(admitted, str):
                outcomes[position] = admitted
            else:
                by_tenant.setdefault(admitted.tenant, []).append((position, admitted))
        for members in by_tenant.values():
            for (position, _), outcome in zip(members, self._run([m for _, m in members]), strict=True):
                outcomes[position] = outcome
        return outcomes

    def _admit(self, task: Task) -> _Member | str:
        """The task to run, or the outcome of one that must not run: skipped (its operation ended),
        dead_lettered (past its deliveries)."""
        queue, operations = self.system.queue, self.system.operations
        payload = tasks_pb2.TaskPayload.FromString(task.payload)
        record = operations.get(payload.operation)
        tenant = (record or {}).get("tenant", layout.DEFAULT_TENANT)
        if record is None or record["state"] in TERMINAL:
            queue.ack(task)
            if record is None or record["state"] != SUCCEEDED:  # failed or cancelled: nothing to keep
                self.discard_intermediates(payload.job, tenant=tenant, ended=True, target=self._target(record))
            return "skipped"
        where = f"{payload.stage} task (shard {payload.shard})"
        task_name = f"{payload.stage}/{payload.shard}"
        if task.deliveries > queue.max_deliveries:
            failed = f"{where} failed {task.deliveries - 1} times; last error: "
            lost = "the worker running it was lost"
            # the full cause for the operator (the dead-letter stream), what a caller may read for the operation
            queue.dead_letter(task, failed + (operations.last_error(payload.operation, task_name) or lost))
            told = operations.caller_error(payload.operation, task_name) or lost
            operations.fail(payload.operation, code_pb2.ABORTED, failed + told)
            self.discard_intermediates(payload.job, tenant=tenant, ended=True, target=self._target(record))
            return "dead_lettered"
        progress = OperationProgress(operations, payload.operation)
        return _Member(task, payload, tenant, self._target(record), where, task_name, progress)

    def _run(self, members: list[_Member]) -> list[str]:
        """Run admitted tasks of one tenant and stage (alone, or as one batch), then settle each."""
        # the tasks read and write their operations' tenant's part of the store, nothing else
        self.context.store = tenant_store(self.system.store, members[0].tenant)
        self.context.progress = members[0].progress
        results: list[object] = [None] * len(members)
        ready = []
        for position, member in enumerate(members):
            try:  # everything the task reads, the job spec included, fails inside the error handling
                member.progress.stage("starting", 1, "task")  # until the stage's first step: loading its inputs
                member.job = self.system.table.decode(self.context.store.get_bytes(layout.job_spec(member.payload.job)))
                member.call = self.system.table.call(
                    self.context, member.job, member.payload.job, member.payload.stage, member.payload.shard
                )
                ready.append(position)
            except Exception as error:
                results[position] = error
        if ready:
            stage = self.system.table.stage(members[ready[0]].payload.stage)
            calls = [members[position].call for position in ready]
            with self.lease.holding(*(members[position].task for position in ready)):
                try:
                    if len(calls) == 1:
                        ran = [stage.run(calls[0])]
                    else:
                        ran = stage.run_batch(calls, [members[position].progress for position in ready])
                except Exception as error:  # the batch as a whole failed: each member is settled with it
                    ran = [error] * len(calls)
            for position, result in zip(ready, ran, strict=True):
                results[position] = result
        return [self._settle(member, result) for member, result in zip(members, results, strict=True)]

    def _settle(self, member: _Member, result: object) -> str:
        """Record a task's success (and the next stage, or the operation's response), or handle what
        it raised (`result` an exception): its outcome."""
        queue, operations = self.system.queue, self.system.operations
        task, payload, tenant, where = member.task, member.payload, member.tenant, member.where
        if isinstance(result, CancelledError):
            queue.ack(task)
            self.discard_intermediates(payload.job, tenant=tenant, ended=True, target=member.target)
            return "cancelled"
        if isinstance(result, Exception):
            return self._failed(task, payload, where, member.task_name, result, member.target, tenant)
        member.progress.flush()
        job = member.job
        plan = self.system.table.plan(job)
        following = plan.after(job, payload.stage)
        completed = self._with_redis_retries(
            lambda: operations.finish_shard(
                payload.operation,
                payload.stage,
                payload.shard,
                self.system.table.tasks(job, payload.stage),
                next_stage=following or "",
                next_tasks=self.system.stage_tasks(payload.operation, job, following, tenant) if following else [],
                response=plan.respond(job, result) if following is None else b"",
                counters={"shards_done": 1, **member.progress.unreported()},
            ),
            f"recording {where} of {payload.operation}",
        )
        self._with_redis_retries(lambda: queue.ack(task), f"acknowledging {where} of {payload.operation}")
        if completed and following is None and not plan.keeps_intermediates:
            self.discard_intermediates(payload.job, tenant=tenant)
        return "succeeded"

    def _target(self, record: dict | None) -> str:
        """The store prefix of the artifact an operation creates ("factorSets/ID" -> "factors/ID/"), or ""."""
        if record is None:
            return ""
        return self.system.table.target_prefix(record["kind"], record["metadata"].get("target", ""))

    def _failed(
        self, task: Task, payload, where: str, task_name: str, error: Exception, target: str, tenant: str
    ) -> str:
        """A task raised: the caller's fault fails the operation at once (and its intermediates go);
        anything else is noted as this task's last error and the task released for a retry after a
        backoff (1 s, doubling per delivery, at most a lease) instead of waiting out its lease."""
        queue, operations = self.system.queue, self.system.operations
        record = operations.get(payload.operation)
        if record is None or record["state"] in TERMINAL:  # a late duplicate whose inputs are gone
            queue.ack(task)
            return "skipped"
        if isinstance(error, DomainError) and error.callers_fault:
            operations.fail(payload.operation, code_pb2.Code.Value(code_of(error)), f"{where}: {caller_message(error)}")
            queue.ack(task)
            self.discard_intermediates(payload.job, tenant=tenant, ended=True, target=target)
            return "failed"
        if isinstance(error, DomainError):  # transient or the system's fault
            log.warning("%s of %s failed: %s: %s", where, payload.operation, type(error).__name__, error)
        else:  # a bug: the traceback belongs in the log
            log.exception("%s of %s failed", where, payload.operation)
        try:
            detail = f"{type(error).__name__}: {message_of(error)}"  # the operator's: the dead-letter stream
            operations.note_error(payload.operation, task_name, detail, caller_message(error))
            queue.release(task, self.consumer, queue.retry_backoff(task.deliveries))
        except Exception as unreachable:  # Redis away too: the task stays pending, reclaimed after its lease
            log.warning("could not release %s of %s: %s", where, payload.operation, unreachable)
        return "retry"

    def _with_redis_retries(self, step, what: str, seconds: float = 30.0):
        """`step()` retried while Redis is unreachable, for up to `seconds` (the task's work is done
        and stored: losing it to a Redis restart would cost a redelivery after the lease)."""
        deadline, delay = time.monotonic() + seconds, 0.1
        while True:
            try:
                return step()
            except UnavailableError as error:
                if time.monotonic() + delay > deadline or self.stop.is_set():
                    raise
                log.warning("%s: %s; retrying in %.1f s", what, error, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def discard_intermediates(
        self, job: str, *, tenant: str = layout.DEFAULT_TENANT, ended: bool = False, target: str = ""
    ) -> None:
        """Delete an ended job's jobs/{id}/ objects (spec, upload, partial sums, eigenbases,
        prepared queries, per-shard scores) and its fan-in sets in Redis: a succeeded job's outputs
        are published artifacts by then, a failed or cancelled (`ended`) one has none, and a late
        duplicate of one of its tasks finds the operation ended and does nothing. Without this a
        long-running system keeps every job's partial sums forever. Idempotent. `target`: the
        store prefix of the artifact an ended job was writing, deleted too unless it was published
        (its manifest exists: an index being appended to keeps its earlier parts). Keys are the
        `tenant`'s (layout.tenant_prefix)."""
        prefix, root = layout.job_prefix(job), layout.tenant_prefix(tenant)
        self.context.artifacts.forget_prefix(prefix)
        self.context.captures.release_job(job)
        self._deleter.submit(root + prefix)
        if ended and target:
            try:
                if not self.system.store.exists(root + target + MANIFEST):
                    self._deleter.submit(root + target)
            except Exception as error:  # the store away: garbage without a manifest is never read
                log.warning("could not check %s: %s", target, error)
        try:
            self.system.operations.forget_fan_in(job, self.system.table.kinds)
        except UnavailableError as error:  # garbage, not state: a later task of the job retries
            log.warning("could not delete the fan-in sets of %s: %s", job, error)
