"""What an autoscaler reads from the queue, on a real redis-server 7: the consumer group's `lag`
(KEDA redis-streams `lagCount`: tasks waiting) and its pending count (`pendingEntriesCount`:
tasks running, or held by a lost worker until reclaimed), read the way KEDA reads them (XINFO
GROUPS, XPENDING), while tasks wait, run, finish and are reclaimed; and the queue's own stats,
which must say the same. Then a queue whose Redis lost its groups: recreated on NOGROUP."""

from __future__ import annotations

import uuid

import pytest

from services.jobs.connection import connect
from services.jobs.queue import GROUP, LeaseKeeper, TaskQueue
from tests.support.clock import ManualClock, age


@pytest.fixture(scope="module")
def redis(redis_server):
    client = connect(redis_server.url)
    assert int(client.info("server")["redis_version"].split(".")[0]) >= 7, "lag needs Redis 7"
    return client


def scaler_inputs(queue: TaskQueue, kind: str) -> tuple[int | None, int]:
    """(lag, pending) of the kind's group as KEDA's redis-streams scaler reads them."""
    group = next(g for g in queue.client.xinfo_groups(queue.stream(kind)) if g["name"] in (GROUP, GROUP.encode()))
    return group["lag"], int(queue.client.xpending(queue.stream(kind), GROUP)["pending"])


def test_lag_counts_waiting_tasks_and_pending_counts_running_ones_through_their_whole_life(redis):
    clock = ManualClock()
    queue = TaskQueue(redis, prefix=f"t{uuid.uuid4().hex[:8]}", lease_seconds=30, clock=clock)
    for number in range(5):
        queue.enqueue("score", f"task {number}".encode())
    assert scaler_inputs(queue, "score") == (5, 0)
    held = [queue.take(["score"], f"worker-{n}", block_ms=100) for n in range(3)]
    assert scaler_inputs(queue, "score") == (2, 3)  # three running: a scaler that read lag alone would see 2
    stats = queue.stats("score")
    assert (stats.waiting, stats.running) == (2, 3)
    queue.ack(held[1])  # finished out of order: the oldest is still running
    assert scaler_inputs(queue, "score") == (2, 2), "lag stays defined after an acknowledgement"
    queue.enqueue("score", b"task 5")
    assert scaler_inputs(queue, "score") == (3, 2)
    # worker-0 dies: its task stays pending (counted) until its lease expires, then is reclaimed
    age(queue, held[0], "worker-0", 30)
    clock.advance(30)
    reclaimed = queue.take(["score"], "worker-9", block_ms=100)
    assert (reclaimed.message_id, reclaimed.deliveries) == (held[0].message_id, 2)
    assert scaler_inputs(queue, "score") == (3, 2)
    for task in (reclaimed, held[2]):
        queue.ack(task)
    assert scaler_inputs(queue, "score") == (3, 0)
    while (task := queue.take(["score"], "worker-1", block_ms=100)) is not None:
        queue.ack(task)
    assert scaler_inputs(queue, "score") == (0, 0)
    assert redis.xlen(queue.stream("score")) == 0, "finished tasks leave the stream"
    # a dead-lettered task leaves the stream the same way
    queue.enqueue("score", b"doomed")
    queue.dead_letter(queue.take(["score"], "worker-1", block_ms=100), "gave up")
    assert scaler_inputs(queue, "score") == (0, 0)
    assert queue.stats("score").dead_letters == 1


def test_a_queue_whose_groups_were_lost_recreates_them_and_takes_what_was_enqueued_since(redis):
    queue = TaskQueue(redis, prefix=f"t{uuid.uuid4().hex[:8]}", lease_seconds=30)
    queue.enqueue("eigen", b"before")
    assert queue.take(["eigen"], "worker", block_ms=100).payload == b"before"
    redis.delete(queue.stream("eigen"))  # what FLUSHALL does to this queue's keys
    queue.enqueue("eigen", b"after")  # the group is cached here: the stream comes back without one
    assert queue.stats("eigen").waiting == 1  # the stats repair the group (NOGROUP) and count the task
    task = queue.take(["eigen"], "worker", block_ms=100)
    assert task.payload == b"after"
    queue.ack(task)
    redis.delete(queue.stream("eigen"))
    queue.ack(task)  # acknowledging into an emptied Redis is harmless
    queue.ensure_groups(["eigen"])
    assert scaler_inputs(queue, "eigen") == (0, 0)


def test_a_draining_worker_hands_its_task_back_to_be_taken_at_once(redis):
    """A worker stopped before its task ends (SIGTERM past --drain-seconds) releases the lease:
    the task counts as pending throughout and another worker takes it without waiting a lease."""
    clock = ManualClock()
    queue = TaskQueue(redis, prefix=f"t{uuid.uuid4().hex[:8]}", lease_seconds=600, clock=clock)
    queue.enqueue("covariance", b"long")
    task = queue.take(["covariance"], "draining", block_ms=100)
    keeper = LeaseKeeper(queue, "draining")
    with keeper.holding(task):
        assert queue.take(["covariance"], "other", block_ms=1) is None
        assert keeper.hand_back() == (task,)
        assert scaler_inputs(queue, "covariance") == (0, 1)
        clock.advance(1)  # the other worker's next look for expired leases, not a lease later
        taken = queue.take(["covariance"], "other", block_ms=1)
    keeper.close()
    assert (taken.message_id, taken.deliveries) == (task.message_id, 2)
    assert keeper.hand_back() == ()
