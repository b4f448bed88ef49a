"""Tasks on Redis Streams, one stream per task kind, consumed through one consumer group.

Delivery is at-least-once:
- a consumer takes a task with XREADGROUP, or reclaims one whose lease expired with
  XAUTOCLAIM (min idle = lease); both count a delivery (XPENDING's times-delivered);
- while the handler runs, a heartbeat thread renews the lease with XCLAIM ... JUSTID, which
  resets the idle time without counting a delivery;
- the task is acknowledged only after its handler returned, so a worker that dies mid-task leaves
  it pending, and another worker reclaims it after the lease. Acknowledging trims the stream up to
  its oldest entry still pending (XACK, then XTRIM MINID, in one script), never XDEL: a deletion
  behind the group's last delivered entry makes Redis 7 report the group's `lag` as NULL, and the
  group's lag (waiting) and pending count (running) are what autoscalers read (KEDA's
  redis-streams `lagCount` and `pendingEntriesCount`, `stats` here);
- a task whose handler failed is released (`release`: XCLAIM ... IDLE, which backdates its idle
  time) so that it becomes reclaimable after a short backoff instead of a whole lease;
- after `max_deliveries` the task is moved to the kind's dead-letter stream with its cause;
- a task may carry a batch key (the `key` field beside its payload): a consumer holding such a task
  takes the next waiting tasks of the same kind and key with it (`take_matching`, from the head of
  the stream only, so no task is passed over), to run them as one batch (a worker's coalescing).
Payloads are bytes (serialised protobuf TaskPayload messages); never pickle.
A Redis that lost its data (restarted without persistence, failed over to an empty replica) has
no consumer groups: every call that names the group recreates it on NOGROUP (from the stream's
start, so tasks enqueued since are taken) and retries once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis

from ..errors import QueueUnavailable
from .connection import redis_unavailable

log = logging.getLogger("influence.jobs")
GROUP = "workers"

# Acknowledge one task (and, with a dead-letter stream, move it there first), then trim the stream
# to its oldest entry still pending: every entry before that one was delivered and acknowledged.
# With nothing pending, the entries up to the acknowledged one go (later ones may wait). XTRIM
# leaves no tombstone, so the group's lag stays defined (XDEL would make it NULL).
# KEYS: stream, dead-letter stream or ""; ARGV: group, id, and for a dead letter payload, cause.
ACK_AND_TRIM = """
if KEYS[2] ~= '' then
  redis.call('XADD', KEYS[2], '*', 'payload', ARGV[3], 'cause', ARGV[4], 'message_id', ARGV[2])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])
local floor
if tonumber(pending[1]) > 0 then
  floor = pending[2]
else
  local ms, seq = string.match(ARGV[2], '^(%d+)-(%d+)$')
  floor = ms .. '-' .. (tonumber(seq) + 1)
end
redis.call('XTRIM', KEYS[1], 'MINID', floor)
"""


# Deliver to a consumer the waiting tasks at the head of a stream while they carry a batch key, at
# most a number of them (XREADGROUP COUNT 1 each, after a look at the head with XRANGE: a task of
# another key stops it, for another consumer to take). KEYS: stream; ARGV: group, consumer, key,
# limit. Returns Redis's time (ms), then the (id, fields) entries delivered.
TAKE_MATCHING = """
local last
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  if info['name'] == ARGV[1] then last = info['last-delivered-id'] end
end
if not last then return redis.error_reply('NOGROUP no group ' .. ARGV[1] .. ' on ' .. KEYS[1]) end
local now = redis.call('TIME')
local taken = {tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)}
for _ = 1, tonumber(ARGV[4]) do
  local head = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
  if #head == 0 then break end
  local fields, key = head[1][2], nil
  for i = 1, #fields, 2 do if fields[i] == 'key' then key = fields[i + 1] end end
  if key ~= ARGV[3] then break end
  redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
  last = head[1][1]
  table.insert(taken, head[1])
end
return taken
"""


@dataclass
class Task:
    kind: str
    message_id: str
    payload: bytes
    deliveries: int
    key: str = ""  # its batch key ("": it runs alone)

    @property
    def enqueued_ms(self) -> int:
        """When it was enqueued: Redis's time in ms (the stream entry's id)."""
        return int(self.message_id.split("-")[0])


class Clock:
    """The time the queue's own timing reads (`now`: monotonic seconds) and waits on (`wait`: as
    Event.wait, True when the event was set): the system's. Tests pass one they advance instead of
    sleeping. Lease expiry itself is Redis's (XAUTOCLAIM's min idle time), not this clock's."""

    now = staticmethod(time.monotonic)

    @staticmethod
    def wait(event: threading.Event, seconds: float) -> bool:
        return event.wait(seconds)


@dataclass(frozen=True)
class QueueStats:
    waiting: int  # enqueued, not yet taken
    running: int  # taken and not acknowledged (running, or lost with a lease still to expire)
    oldest_waiting_seconds: float  # 0 when none waits
    dead_letters: int


class TaskQueue:
    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "influence",
        lease_seconds: float = 30.0,
        max_deliveries: int = 3,
        max_task_seconds: float = 0.0,
        clock: Clock | None = None,
    ):
        self.client = client
        self.clock = clock or Clock()
        self.prefix = prefix
        self.lease_ms = int(lease_seconds * 1000)
        self.max_deliveries = max_deliveries
        # A task running longer than this is taken to hang: its lease is no longer renewed, so
        # another worker reclaims it a lease later (0: no limit; a live worker renews forever).
        self.max_task_seconds = max_task_seconds
        self._groups: set[str] = set()
        self._next_reclaim_scan: dict[tuple[str, ...], float] = {}  # by the kinds a consumer takes
        # XREADGROUP over several streams delivers up to one entry per stream: the entries beyond
        # the one returned are this consumer's already, kept here and returned by its next takes
        # (else they would sit delivered and unrun until their lease expired)
        self._surplus: dict[str, list[tuple[str, bytes, dict]]] = {}
        self._surplus_lock = threading.Lock()

    def stream(self, kind: str) -> str:
        return f"{self.prefix}:tasks:{kind}"

    def dead_stream(self, kind: str) -> str:
        return f"{self.prefix}:dead:{kind}"

    def _ensure_group(self, kind: str) -> None:
        if kind in self._groups:
            return
        try:
            self.client.xgroup_create(self.stream(kind), GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self._groups.add(kind)

    def ensure_groups(self, kinds: list[str]) -> None:
        """Make sure every kind's stream and group exist, asking Redis (not this queue's memory of
        having made them): the health probe's check that the queue can work, and its repair after
        Redis lost its data. Raises what Redis raises (e.g. READONLY on a replica)."""
        for kind in kinds:
            self._groups.discard(kind)
            self._ensure_group(kind)

    def _regrouping(self, kinds: list[str], call):
        """`call()`, and once more after recreating the groups of `kinds` if Redis answered
        NOGROUP (it lost its data since the groups were made)."""
        try:
            return call()
        except redis.ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            log.warning("the consumer groups of %s were gone (Redis lost its data?): recreated", ",".join(kinds))
            self.ensure_groups(kinds)
            return call()

    def enqueue(self, kind: str, payload: bytes, key: str = "") -> str:
        """Append a task (with a batch `key`, see `take_matching`); it is durable in Redis when this
        returns. (A job's tasks are enqueued by jobs/operations.py's scripts, as the same fields.)"""
        fields = {"payload": payload, **({"key": key} if key else {})}
        try:
            self._ensure_group(kind)
            return self.client.xadd(self.stream(kind), fields).decode()
        except redis.RedisError as error:
            raise QueueUnavailable(f"cannot enqueue a {kind} task: {error}") from None

    def take(self, kinds: list[str], consumer: str, block_ms: int = 1000) -> Task | None:
        """The next task of any of `kinds`: an expired lease first, else a new one.

        Expired leases are looked for at most every lease/4 (≤ 1 s) while none is found: a lease
        takes `lease` to expire anyway, and the scan costs a round trip per kind."""
        return self._regrouping(kinds, lambda: self._take(kinds, consumer, block_ms))

    def _take(self, kinds: list[str], consumer: str, block_ms: int) -> Task | None:
        if self.clock.now() >= self._next_reclaim_scan.get(tuple(kinds), 0.0):
            for kind in kinds:
                self._ensure_group(kind)
                _, claimed, *_ = self.client.xautoclaim(
                    self.stream(kind), GROUP, consumer, self.lease_ms, "0-0", count=1
                )
                claimed = [entry for entry in claimed if entry and entry[1]]
                if claimed:
                    return self._task(kind, *claimed[0])
            self._next_reclaim_scan[tuple(kinds)] = self.clock.now() + min(1.0, self.lease_ms / 4000)
        surplus = self._next_surplus(kinds, consumer)
        if surplus is not None:
            return surplus
        for kind in kinds:
            self._ensure_group(kind)
        response = self.client.xreadgroup(
            GROUP, consumer, {self.stream(kind): ">" for kind in kinds}, count=1, block=block_ms
        )
        delivered = [
            (stream.decode().removeprefix(f"{self.prefix}:tasks:"), message_id, fields)
            for stream, entries in response or []
            for message_id, fields in entries
        ]
        if not delivered:
            return None
        with self._surplus_lock:
            self._surplus.setdefault(consumer, []).extend(delivered[1:])
        return self._task(*delivered[0])

    def take_matching(self, task: Task, consumer: str, limit: int) -> tuple[list[Task], int]:
        """Up to `limit` more tasks of `task`'s kind and batch key for `consumer`: those waiting at
        the head of the stream, in order, up to the first of another key (never one passed over);
        and Redis's time now (ms), against which a batch window is measured (Task.enqueued_ms)."""
        if not task.key or limit <= 0:
            return [], task.enqueued_ms
        self._ensure_group(task.kind)
        stream = self.stream(task.kind)
        now, *entries = self._regrouping(
            [task.kind], lambda: self.client.eval(TAKE_MATCHING, 1, stream, GROUP, consumer, task.key, limit)
        )
        return [self._task(task.kind, message_id, fields, fresh=True) for message_id, fields in entries], int(now)

    def _next_surplus(self, kinds: list[str], consumer: str) -> Task | None:
        """A task delivered to `consumer` by an earlier read and not yet returned, if it still holds
        it (another worker may have reclaimed it after its lease); its lease is renewed."""
        while True:
            with self._surplus_lock:
                held = self._surplus.get(consumer, [])
                index = next((i for i, entry in enumerate(held) if entry[0] in kinds), None)
                if index is None:
                    return None
                kind, message_id, fields = held.pop(index)
            pending = self.client.xpending_range(self.stream(kind), GROUP, message_id, message_id, 1)
            owner = pending[0]["consumer"] if pending else b""
            if (owner.decode() if isinstance(owner, bytes) else owner) == consumer:
                task = self._task(kind, message_id, fields)
                self.renew(task, consumer)
                return task

    def _task(self, kind: str, message_id, fields, fresh: bool = False) -> Task:
        """The Task of a delivered entry (`fields` a dict, or Redis's flat list); `fresh`: delivered
        for the first time just now (no need to ask for its delivery count)."""
        message_id = message_id.decode() if isinstance(message_id, bytes) else message_id
        if isinstance(fields, list):
            fields = dict(zip(fields[::2], fields[1::2], strict=True))
        deliveries = 1
        if not fresh:
            pending = self.client.xpending_range(self.stream(kind), GROUP, message_id, message_id, 1)
            deliveries = int(pending[0]["times_delivered"]) if pending else 1
        key = fields.get(b"key", b"").decode()
        return Task(kind, message_id, fields[b"payload"], deliveries, key)

    def renew(self, task: Task, consumer: str) -> None:
        """Reset the task's idle time (its lease) without counting a delivery. (A group recreated
        after Redis lost its data holds no lease to renew: the task reaches the new group as a new
        delivery, if it is still in the stream.)"""
        self.client.xclaim(self.stream(task.kind), GROUP, consumer, 0, [task.message_id], justid=True)

    def release(self, task: Task, consumer: str, after_seconds: float) -> None:
        """Make a task this consumer holds reclaimable `after_seconds` from now (at most a lease),
        without counting a delivery: its idle time is set to lease - after_seconds."""
        idle = max(0, self.lease_ms - int(after_seconds * 1000))
        self._regrouping(
            [task.kind],
            lambda: self.client.xclaim(
                self.stream(task.kind), GROUP, consumer, 0, [task.message_id], idle=idle, justid=True
            ),
        )

    def retry_backoff(self, deliveries: int) -> float:
        """Seconds before a failed task is offered again: 1 s after its first delivery, doubling
        with each further one, never more than a lease."""
        return min(self.lease_ms / 1000, 2.0 ** max(0, deliveries - 1))

    def ack(self, task: Task) -> None:
        """The task is done: out of the pending list, and out of the stream (ACK_AND_TRIM)."""
        self._regrouping(
            [task.kind], lambda: self.client.eval(ACK_AND_TRIM, 2, self.stream(task.kind), "", GROUP, task.message_id)
        )

    def dead_letter(self, task: Task, cause: str) -> None:
        """Move the task to the dead-letter stream with its cause, and out of the live stream."""
        self._regrouping([task.kind], lambda: self.client.eval(
            ACK_AND_TRIM, 2, self.stream(task.kind), self.dead_stream(task.kind),
            GROUP, task.message_id, task.payload, cause,
        ))  # fmt: skip

    @redis_unavailable
    def depth(self, kind: str) -> int:
        """Tasks not yet acknowledged (waiting or running)."""
        stats = self.stats(kind)
        return stats.waiting + stats.running

    def stats(self, kind: str) -> QueueStats:
        """Waiting and running tasks of `kind`, the age of the oldest waiting one, dead letters.

        Waiting is the group's lag and running its pending count (XINFO GROUPS): the numbers KEDA's
        redis-streams trigger reads (`lagCount`, `pendingEntriesCount`), so the chart's scaler and
        this process's metrics agree. A Redis without lag (6.x: the embedded server) counts the
        entries after the group's last delivered one instead."""
        return self._regrouping([kind], lambda: self._stats(kind))

    def _stats(self, kind: str) -> QueueStats:
        self._ensure_group(kind)
        stream = self.stream(kind)
        pipe = self.client.pipeline()
        pipe.xinfo_groups(stream)
        pipe.xlen(self.dead_stream(kind))
        groups, dead = pipe.execute()
        group = next((g for g in groups if g["name"] in (GROUP, GROUP.encode())), None)
        if group is None:  # the stream is there, its group is not: Redis lost its data meanwhile
            raise redis.ResponseError(f"NOGROUP no group {GROUP} on {stream}")
        delivered = group["last-delivered-id"]
        delivered = delivered.decode() if isinstance(delivered, bytes) else delivered
        oldest = self.client.xrange(stream, min=f"({delivered}", count=1)
        waiting = group.get("lag")
        if waiting is None:  # no lag on this Redis
            waiting = len(self.client.xrange(stream, min=f"({delivered}")) if oldest else 0
        age = 0.0
        if oldest:
            enqueued_ms = int(oldest[0][0].decode().split("-")[0])
            age = max(0.0, time.time() - enqueued_ms / 1000)
        return QueueStats(
            waiting=int(waiting), running=int(group["pending"]), oldest_waiting_seconds=age, dead_letters=int(dead)
        )

    def dead_letters(self, kind: str) -> list[dict]:
        return [
            {key.decode(): value for key, value in fields.items()}
            for _, fields in self.client.xrange(self.dead_stream(kind))
        ]


class LeaseKeeper:
    """Renews the leases of the tasks a worker is running (`with keeper.holding(task, ...):`: one,
    or a coalesced batch) every lease/3 seconds, for at most the queue's `max_task_seconds` (a hung
    task is then reclaimed), from one thread per worker that lives across tasks (a thread per task
    cost ~1 ms of start and join per task). `close` stops it."""

    def __init__(self, queue: TaskQueue, consumer: str):
        self.queue, self.consumer = queue, consumer
        self._tasks: tuple[Task, ...] = ()
        self._since = 0.0  # when the held tasks started
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def holding(self, *tasks: Task) -> Iterator[None]:
        with self._lock:
            self._tasks, self._since = tasks, self.queue.clock.now()
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name=f"lease-{self.consumer}", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._tasks = ()

    def hand_back(self) -> tuple[Task, ...]:
        """Stop renewing the held tasks and make them reclaimable now (a draining worker that cannot
        finish them before it is killed): other workers take them at once instead of a lease later.
        The tasks (none when none was held)."""
        with self._lock:
            tasks, self._tasks = self._tasks, ()
        for task in tasks:
            self.queue.release(task, self.consumer, 0)
        return tasks

    def _run(self) -> None:
        interval = max(self.queue.lease_ms / 3000, 0.05)
        while not self.queue.clock.wait(self._stop, interval):
            with self._lock:
                tasks, since = self._tasks, self._since
            if not tasks:
                continue
            limit = self.queue.max_task_seconds
            if limit and self.queue.clock.now() - since > limit:  # hung: let the leases lapse (once per task)
                first = tasks[0]
                log.warning("%s task %s ran over %g s: its lease lapses", first.kind, first.message_id, limit)
                with self._lock:
                    if self._tasks is tasks:
                        self._tasks = ()
                continue
            for task in tasks:
                try:  # renewing a task acknowledged meanwhile is a no-op (it left the pending list)
                    self.queue.renew(task, self.consumer)
                except redis.RedisError as error:  # Redis briefly away: try again next tick
                    log.warning("lease renewal of %s failed: %s", task.message_id, error)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
