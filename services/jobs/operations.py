"""Operation records in Redis, in the style of google.longrunning.

One hash per operation (`{prefix}:op:{id}`) with: kind, state, metadata (JSON), response
(serialised google.protobuf.Any), error code and message, request id, times. A sorted set
indexes operations by creation time for listing; `{prefix}:request:{request_id}` maps a
create call's request id to its operation, so retried creates return the same operation. An
operation is created in one atomic step (`create`: the request id claimed, the record written and
listed, its first tasks enqueued), so a crash leaves all of it or none.
Tenants: each record names its tenant; a tenant other than the default one has its own listing
index, request ids and active set under `{prefix}:tenant:{tenant}:` (the default tenant keeps the
names above), and callers check the record's tenant before showing or changing it.
Fan-in: each (operation, stage) has a set of finished shards; `finish_shard` adds to it and
says True exactly once, when the set first becomes complete, even under duplicate deliveries
and concurrent workers (a Lua script makes the check-and-mark atomic).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence

import redis

from ..errors import QueueUnavailable, ResourceExhaustedError, UnavailableError
from ..wire import DEFAULT_TENANT
from .connection import redis_unavailable

log = logging.getLogger("influence.jobs")

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
TERMINAL = {SUCCEEDED, FAILED, CANCELLED}

# KEYS: shards set, done flag, operation hash. ARGV: shard, total, stage-after, shards-after,
# response ('' = not final), ended channel, operation id, number of counters, the (counter,
# increment) pairs, the TTL (seconds) of a record once ended, then (stream, payload, batch key) triples to
# enqueue when the stage completes. A task of an operation that ended (or expired) records nothing.
# Completion, enqueueing the next stage and finishing the operation are one atomic step, so a
# worker dying at any point can neither lose the advance nor make it happen twice.
_FINISH_SHARD = """
local counters_end = 8 + 2 * tonumber(ARGV[8])  -- ARGV[counters_end + 1]: the ended record's TTL
local current = redis.call('HGET', KEYS[3], 'state')
if not current or current == 'SUCCEEDED' or current == 'FAILED' or current == 'CANCELLED' then return 2 end
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then  -- a duplicate delivery counts nothing twice
  for i = 9, counters_end, 2 do redis.call('HINCRBY', KEYS[3], 'counter:' .. ARGV[i], ARGV[i + 1]) end
end
if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then return 0 end
if not redis.call('SET', KEYS[2], '1', 'NX') then return 0 end
local state = redis.call('HGET', KEYS[3], 'state')
if state == 'SUCCEEDED' or state == 'FAILED' or state == 'CANCELLED' then return 2 end
local now = redis.call('TIME')
redis.call('HSET', KEYS[3], 'update_time', now[1] + now[2] / 1e6)
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[3], 'state', 'SUCCEEDED', 'response', ARGV[5], 'stage', 'done')
  redis.call('EXPIRE', KEYS[3], ARGV[9 + 2 * tonumber(ARGV[8])])
  redis.call('PUBLISH', ARGV[6], ARGV[7])
  return 1
end
redis.call('HSET', KEYS[3], 'stage', ARGV[3], 'shards_total', ARGV[4], 'counter:shards_done', 0)
for i = counters_end + 2, #ARGV, 3 do
  if ARGV[i + 2] == '' then redis.call('XADD', ARGV[i], '*', 'payload', ARGV[i + 1])
  else redis.call('XADD', ARGV[i], '*', 'payload', ARGV[i + 1], 'key', ARGV[i + 2]) end
end
return 1
"""

# KEYS: the request-id key, the operation hash, the listing index, the tenant's listing index, the
# tenant's active set, the submissions in progress. ARGV: the request key's TTL (0: no request id),
# the operation id, the tenant's quota (0: none), the operation-hash key prefix, the submission
# ('': none), the TTL of an ended record (0: the record does not start ended), the ended channel,
# the creation time, the number of (field, value) pairs, the pairs, then (stream, payload, batch key) triples
# to enqueue. One atomic step: a request id that names an existing operation returns it (0); a
# submission swept as abandoned (-2) or a tenant at its quota (-1) creates nothing; else the
# request id is claimed, the record written and listed, its first tasks enqueued and its
# submission marker removed (1). Operations ending at once (a dataset registered before) publish.
_CREATE = """
local id = ARGV[2]
if ARGV[1] ~= '0' then
  local existing = redis.call('GET', KEYS[1])
  if existing and redis.call('EXISTS', ARGV[4] .. existing) == 1 then return {0, existing} end
end
if ARGV[5] ~= '' and not redis.call('ZSCORE', KEYS[6], ARGV[5]) then return {-2, ''} end
if tonumber(ARGV[3]) > 0 then
  for _, member in ipairs(redis.call('SMEMBERS', KEYS[5])) do
    local state = redis.call('HGET', ARGV[4] .. member, 'state')
    if not state or state == 'SUCCEEDED' or state == 'FAILED' or state == 'CANCELLED' then
      redis.call('SREM', KEYS[5], member)
    end
  end
  local active = redis.call('SCARD', KEYS[5])
  if active >= tonumber(ARGV[3]) then return {-1, tostring(active)} end
  redis.call('SADD', KEYS[5], id)
end
if ARGV[1] ~= '0' then redis.call('SET', KEYS[1], id, 'EX', ARGV[1]) end
local fields_end = 9 + 2 * tonumber(ARGV[9])
for i = 10, fields_end, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[3], ARGV[8], id)
if KEYS[4] ~= KEYS[3] then redis.call('ZADD', KEYS[4], ARGV[8], id) end
for i = fields_end + 1, #ARGV, 3 do
  if ARGV[i + 2] == '' then redis.call('XADD', ARGV[i], '*', 'payload', ARGV[i + 1])
  else redis.call('XADD', ARGV[i], '*', 'payload', ARGV[i + 1], 'key', ARGV[i + 2]) end
end
if ARGV[5] ~= '' then redis.call('ZREM', KEYS[6], ARGV[5]) end
if ARGV[6] ~= '0' then
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  redis.call('PUBLISH', ARGV[7], id)
end
return {1, id}
"""

# KEYS: operation hash. ARGV: ended channel, operation id, TTL of an ended record, then (field,
# value) pairs. Publishes the id when the fields end the operation (see jobs/ended.py).
_TRANSITION = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
if state == 'SUCCEEDED' or state == 'FAILED' or state == 'CANCELLED' then return 0 end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
state = redis.call('HGET', KEYS[1], 'state')
if state == 'SUCCEEDED' or state == 'FAILED' or state == 'CANCELLED' then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('PUBLISH', ARGV[1], ARGV[2])
end
return 1
"""

# KEYS: operation hash. ARGV: tokens to add, then (field, value) pairs. Only while the record
# exists: a task still reporting after its record expired must not recreate half a record.
_REPORT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if tonumber(ARGV[1]) ~= 0 then redis.call('HINCRBY', KEYS[1], 'counter:tokens_processed', ARGV[1]) end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local step = redis.call('HGET', KEYS[1], 'step')
if #ARGV > 1 and step then
  local field = 'seen:' .. step
  local seen = redis.call('HGET', KEYS[1], field)
  local order = seen and cjson.decode(seen)['order'] or redis.call('HINCRBY', KEYS[1], 'seen_count', 1)
  redis.call('HSET', KEYS[1], field, cjson.encode({
    order = order, stage = redis.call('HGET', KEYS[1], 'stage') or '', step = step,
    done = tonumber(redis.call('HGET', KEYS[1], 'step_done') or 0),
    total = tonumber(redis.call('HGET', KEYS[1], 'step_total') or 0),
    unit = redis.call('HGET', KEYS[1], 'step_unit') or ''}))
end
return 1
"""

DEFAULT_TTL_SECONDS = 7 * 86400
REQUEST_ID_SECONDS = 7 * 86400  # how long a request id keeps naming its operation


def _order(step: dict) -> int:
    return step["order"]


def new_operation_id() -> str:
    return uuid.uuid4().hex[:20]


class OperationStore:
    """Operation records. A record that ended expires `ttl_seconds` later (its fan-in sets are
    deleted when the worker that ends it cleans up, see `forget_fan_in`); listing drops ids whose
    record expired."""

    def __init__(self, client: redis.Redis, prefix: str = "influence", ttl_seconds: int = DEFAULT_TTL_SECONDS):
        if ttl_seconds < 1:
            raise ValueError(f"the operation TTL must be >= 1 s, got {ttl_seconds}")
        self.client = client
        self.prefix = prefix
        self.ttl_seconds = int(ttl_seconds)
        self.ended_channel = f"{prefix}:ended"  # an operation's id, published as it ends
        self._finish_shard = client.register_script(_FINISH_SHARD)
        self._transition = client.register_script(_TRANSITION)
        self._report = client.register_script(_REPORT)
        self._create = client.register_script(_CREATE)
        self.submissions = f"{prefix}:submitting"  # submissions whose operation is not created yet
        self._marker: bytes | None = None  # the data marker this process saw last (check_data)
        self.data_lost_at: float | None = None  # wall time this process noticed Redis had lost its data

    def check_data(self) -> None:
        """Notice a Redis that lost its data since this process last looked (a restart without
        persistence, a failover to an empty replica): the processes sharing the prefix share one
        marker key, made by whichever looks first; when the one this process saw is gone or
        replaced, every record went with it, and `data_lost_at` says when that was noticed (what a
        caller asking for a lost operation is told). The API servers' health probe calls it."""
        key = f"{self.prefix}:data-marker"
        pipe = self.client.pipeline()
        pipe.set(key, uuid.uuid4().hex, nx=True)
        pipe.get(key)
        _, current = pipe.execute()
        if self._marker is not None and current != self._marker:
            self.data_lost_at = time.time()
            log.error("Redis lost its data (restarted without persistence?): every operation record is gone")
        self._marker = current

    def lost_data(self) -> str:
        """A sentence for a caller whose operation is not found, when Redis lost its data since
        this process started ("" if not)."""
        if self.data_lost_at is None:
            return ""
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.data_lost_at))
        return f"; Redis lost its data at about {when}, and the records of the operations it held: submit the job again"

    def _key(self, operation_id: str) -> str:
        return f"{self.prefix}:op:{operation_id}"

    def _tenant_key(self, tenant: str, name: str) -> str:
        """A per-tenant key; the default tenant keeps the names that predate tenants."""
        return f"{self.prefix}:{name}" if tenant == DEFAULT_TENANT else f"{self.prefix}:tenant:{tenant}:{name}"

    def _request_key(self, tenant: str, request_id: str) -> str:
        return f"{self._tenant_key(tenant, 'request')}:{request_id}"

    def create(
        self,
        kind: str,
        metadata: dict,
        request_id: str = "",
        *,
        tenant: str = DEFAULT_TENANT,
        quota: int = 0,
        operation_id: str = "",
        stage: str = "",
        tasks: Sequence[tuple[str, bytes, str]] = (),
        response: bytes | None = None,
        submission: str = "",
    ) -> tuple[dict, bool]:
        """(operation, created), in one atomic step (a Lua script), so that no crash can leave a
        request id claimed without its record, or a record without its first tasks:
        - a `request_id` the tenant used before for an operation that still exists returns that
          operation and False, and nothing else happens;
        - with a `quota`, ResourceExhaustedError when the tenant already has that many operations
          queued or running;
        - else the operation `operation_id` (default: a new id) is written: PENDING, or RUNNING at
          `stage` with its first `tasks` ((stream, payload, batch key) triples) enqueued, or SUCCEEDED
          with `response`; the request id is claimed, and the `submission` (begin_submission) ends. A
          submission already swept as abandoned creates nothing (UnavailableError: retry)."""
        operation_id = operation_id or new_operation_id()
        now = time.time()
        fields = {
            "id": operation_id,
            "kind": kind,
            "state": PENDING,
            "metadata": json.dumps(metadata),
            "request_id": request_id,
            "tenant": tenant,
            "create_time": now,
            "update_time": now,
        }
        if response is not None:
            fields.update(state=SUCCEEDED, response=response)
        elif stage:
            fields.update(state=RUNNING, stage=stage, shards_total=len(tasks))
        keys = [
            self._request_key(tenant, request_id),
            self._key(operation_id),
            f"{self.prefix}:ops",  # every tenant's (metrics, the default's list)
            self._tenant_key(tenant, "ops"),
            self._tenant_key(tenant, "active"),
            self.submissions,
        ]
        arguments = [
            REQUEST_ID_SECONDS if request_id else 0,
            operation_id,
            quota,
            f"{self.prefix}:op:",
            submission,
            self.ttl_seconds if response is not None else 0,
            self.ended_channel,
            now,
            len(fields),
        ]
        for entry in [*fields.items(), *tasks]:
            arguments += entry
        try:
            outcome, value = self._create(keys=keys, args=arguments)
        except redis.RedisError as error:
            raise QueueUnavailable(f"cannot create an operation: {error}") from None
        if outcome == -1:
            raise ResourceExhaustedError(
                f"tenant {tenant!r} has {int(value)} operations queued or running; its quota "
                f"(--max-queued-operations) is {quota}: wait for one to finish or cancel one"
            )
        if outcome == -2:
            raise UnavailableError("the submission took too long and was abandoned: retry")
        return self.get(value.decode() if outcome == 0 else operation_id), outcome == 1

    @redis_unavailable
    def find_request(self, request_id: str, tenant: str = DEFAULT_TENANT) -> dict | None:
        """The tenant's operation of `request_id`, if it made one that still exists."""
        if not request_id:
            return None
        existing = self.client.get(self._request_key(tenant, request_id))
        return self.get(existing.decode()) if existing else None

    # A submission (runner.JobSystem.submit) writes the job's inputs to the store before `create`
    # makes its operation; its marker (a sorted set member "tenant/operation_id" scored by its start)
    # names them until then, so a submission that never got there (its server died, Redis or the
    # store failed and its own clean-up could not run) is found and its inputs deleted by a sweep.

    @redis_unavailable
    def begin_submission(self, tenant: str, operation_id: str) -> str:
        member = f"{tenant}/{operation_id}"
        self.client.zadd(self.submissions, {member: time.time()})
        return member

    @redis_unavailable
    def end_submission(self, member: str) -> None:
        self.client.zrem(self.submissions, member)

    @redis_unavailable
    def keep_submission(self, member: str, since: float | None = None) -> None:
        """Mark `member` again (its clean-up failed): a later sweep retries it."""
        self.client.zadd(self.submissions, {member: since or time.time()}, nx=True)

    @redis_unavailable
    def take_abandoned_submissions(self, older_than_seconds: float) -> list[tuple[str, float]]:
        """(member, start) of the submissions begun over `older_than_seconds` ago, each removed from
        the set by this call (concurrent sweepers take each once)."""
        found = self.client.zrangebyscore(self.submissions, "-inf", time.time() - older_than_seconds, withscores=True)
        return [(member.decode(), start) for member, start in found if self.client.zrem(self.submissions, member)]

    @redis_unavailable
    def get(self, operation_id: str) -> dict | None:
        raw = self.client.hgetall(self._key(operation_id))
        if not raw:
            return None
        record = {key.decode(): value for key, value in raw.items()}
        for key in (
            "id",
            "kind",
            "state",
            "request_id",
            "error_message",
            "stage",
            "last_error",
            "step",
            "step_unit",
            "tenant",
        ):
            if key in record:
                record[key] = record[key].decode()
        record.setdefault("tenant", DEFAULT_TENANT)  # a record from before tenants
        for key in ("step_done", "step_total"):
            record[key] = int(record.get(key, 0))
        record["metadata"] = json.loads(record["metadata"])
        record["error_code"] = int(record.get("error_code", 0))
        record["shards_total"] = int(record.get("shards_total", 0))
        record["counters"] = {
            key.removeprefix("counter:"): int(value) for key, value in record.items() if key.startswith("counter:")
        }
        steps = sorted((json.loads(value) for key, value in record.items() if key.startswith("seen:")), key=_order)
        record["steps"] = [{key: step[key] for key in ("stage", "step", "done", "total", "unit")} for step in steps]
        for key in ("create_time", "update_time"):
            record[key] = float(record[key])
        return record

    @redis_unavailable
    def count_states(self, newest: int = 10_000) -> dict[str, int]:
        """{state: operations} over the `newest` operations (a bounded scan, for metrics)."""
        ids = self.client.zrevrange(f"{self.prefix}:ops", 0, newest - 1)
        pipe = self.client.pipeline()
        for operation_id in ids:
            pipe.hget(self._key(operation_id.decode()), "state")
        counts = dict.fromkeys((PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED), 0)
        expired = []
        for operation_id, state in zip(ids, pipe.execute() if ids else [], strict=True):
            if state is None:
                expired.append(operation_id)
            else:
                counts[state.decode()] = counts.get(state.decode(), 0) + 1
        self._drop_expired(expired)
        return counts

    def _drop_expired(self, ids: list) -> None:
        """Remove from the listing index the ids whose record expired (their TTL after ending)."""
        if ids:
            self.client.zrem(f"{self.prefix}:ops", *ids)

    @redis_unavailable
    def list(
        self, page_size: int = 50, offset: int = 0, *, tenant: str = DEFAULT_TENANT, **equal: str
    ) -> tuple[list[dict], int | None]:
        """Up to `page_size` of the tenant's records, newest first from position `offset` of its
        index, whose fields equal `equal` (e.g. kind="fit_factors", state="RUNNING"); and the
        position the next page starts at, or None when no further record matches (so a last page is
        never empty). Ids whose record expired are dropped from the index on the way (the next
        position counts that: they all lie before it)."""
        found, expired, position, batch = [], [], offset, max(2 * page_size, 100)
        following = None
        index = self._tenant_key(tenant, "ops")
        while following is None and (ids := self.client.zrevrange(index, position, position + batch - 1)):
            for step, operation_id in enumerate(ids):
                record = self.get(operation_id.decode())
                if record is None:
                    expired.append(operation_id)
                    continue
                if record.get("tenant", DEFAULT_TENANT) != tenant:
                    continue
                if any(record.get(key) != value for key, value in equal.items()):
                    continue
                if len(found) == page_size:
                    following = position + step
                    break
                found.append(record)
            position += len(ids)
        if expired:
            self.client.zrem(index, *expired)
        return found, None if following is None else following - len(expired)

    @redis_unavailable
    def _apply(self, operation_id: str, **fields) -> bool:
        """Set fields unless the operation already ended. True when applied."""
        fields["update_time"] = time.time()
        arguments = [self.ended_channel, operation_id, self.ttl_seconds]
        for key, value in fields.items():
            arguments += [key, value]
        return self._transition(keys=[self._key(operation_id)], args=arguments) == 1

    def succeed(self, operation_id: str, response: bytes) -> bool:
        return self._apply(operation_id, state=SUCCEEDED, response=response)

    def fail(self, operation_id: str, code: int, message: str) -> bool:
        return self._apply(operation_id, state=FAILED, error_code=code, error_message=message[:2000])

    def cancel(self, operation_id: str) -> bool:
        return self._apply(operation_id, state=CANCELLED, error_code=1, error_message="cancelled by the caller")

    @redis_unavailable
    def report(self, operation_id: str, *, step: dict | None = None, tokens: int = 0) -> None:
        """A task's progress in one round trip: its current step's fields (step, step_done,
        step_total, step_unit) and tokens processed since the last report. Each step reported is
        also kept in the record's step history (`steps` of `get`: its stage, name and last counts,
        in the order first reported), so a step no poll saw running is still known."""
        arguments: list = [int(tokens)]
        for key, value in (step or {}).items():
            arguments += [key, value]
        self._report(keys=[self._key(operation_id)], args=arguments)

    @redis_unavailable
    def delete(self, operation_id: str) -> None:
        tenant = self.client.hget(self._key(operation_id), "tenant")
        self.client.delete(self._key(operation_id))
        self.client.zrem(f"{self.prefix}:ops", operation_id)
        if tenant is not None and tenant.decode() != DEFAULT_TENANT:
            self.client.zrem(self._tenant_key(tenant.decode(), "ops"), operation_id)

    @redis_unavailable
    def is_cancelled(self, operation_id: str) -> bool:
        state = self.client.hget(self._key(operation_id), "state")
        return state in (b"CANCELLED", None)

    @redis_unavailable
    def finish_shard(
        self,
        operation_id: str,
        stage: str,
        shard: int,
        total: int,
        *,
        next_stage: str = "",
        next_tasks: list[tuple[str, bytes, str]] = (),
        response: bytes = b"",
        counters: dict[str, int] | None = None,
    ) -> bool:
        """Record a finished task of `stage`; True exactly once, when the stage first completes.
        `counters` are added to the operation's counters (`record["counters"]`) the first time
        this shard is recorded, not again for a duplicate delivery.

        At that moment, atomically: either the operation succeeds with `response` (the last
        stage), or the stage becomes `next_stage` and `next_tasks` ((stream, payload, batch key) triples)
        are appended to their streams.
        """
        base = f"{self.prefix}:fanin:{operation_id}:{stage}"
        counters = counters or {}
        arguments: list = [shard, total, next_stage, len(next_tasks), response, self.ended_channel, operation_id]
        arguments.append(len(counters))
        for name, increment in counters.items():
            arguments += [name, int(increment)]
        arguments.append(self.ttl_seconds)
        for task in next_tasks:
            arguments += task
        keys = [f"{base}:shards", f"{base}:done", self._key(operation_id)]
        return self._finish_shard(keys=keys, args=arguments) == 1

    @redis_unavailable
    def note_error(self, operation_id: str, task: str, text: str, caller_text: str = "") -> None:
        """Keep the last failure of one task (`task`: "stage/shard"), reported as the cause if that
        task is dead-lettered: `text` in full for the dead-letter stream (the operator's), and
        `caller_text` (errors.caller_message; default `text`) for the operation's error, which its
        caller reads. Each task has its own fields, so the cause quoted is its own."""
        fields = [f"last_error:{task}", text[:500], f"caller_error:{task}", (caller_text or text)[:500]]
        self._report(keys=[self._key(operation_id)], args=[0, *fields])

    @redis_unavailable
    def last_error(self, operation_id: str, task: str) -> str:
        """The task's last failure in full (`note_error`'s `text`)."""
        raw = self.client.hget(self._key(operation_id), f"last_error:{task}")
        return raw.decode() if raw else ""

    @redis_unavailable
    def caller_error(self, operation_id: str, task: str) -> str:
        """The task's last failure as its caller may read it (`note_error`'s `caller_text`)."""
        raw = self.client.hget(self._key(operation_id), f"caller_error:{task}")
        return raw.decode() if raw else ""

    @redis_unavailable
    def forget_fan_in(self, operation_id: str, stages: list[str]) -> None:
        """Delete an ended operation's fan-in sets (a late duplicate task records nothing more)."""
        base = f"{self.prefix}:fanin:{operation_id}"
        self.client.delete(*(f"{base}:{stage}:{part}" for stage in stages for part in ("shards", "done")))

    def start(self, operation_id: str, stage: str, shards_total: int) -> bool:
        return self._apply(operation_id, state=RUNNING, stage=stage, shards_total=shards_total)
