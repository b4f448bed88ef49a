"""Redis job primitives on a real redis-server: leases, reclaim, fan-in, durability."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid

import pytest

from services.jobs.connection import EmbeddedRedis, connect, process_running
from services.jobs.ended import EndedWatcher
from services.jobs.operations import OperationStore
from services.jobs.queue import LeaseKeeper, QueueStats, TaskQueue
from tests.support.clock import ManualClock, age, idle_ms


@pytest.fixture(scope="module")
def redis(redis_server):
    return connect(redis_server.url)


def fresh(redis, **options):
    prefix = f"t{uuid.uuid4().hex[:8]}"
    return TaskQueue(redis, prefix=prefix, **options), OperationStore(redis, prefix=prefix)


LEASE = 30.0  # seconds: on the manual clock below, and in Redis only as far as `age` says


def test_a_renewed_lease_keeps_a_task_and_an_expired_one_is_reclaimed(redis):
    """Three leases long, Redis's idle time on the task grows with the clock (`age`) and the
    keeper renews it every lease/3: bob never gets it. After the keeper stops, a lease later, he
    does, as a second delivery."""
    clock = ManualClock()
    queue, _ = fresh(redis, lease_seconds=LEASE, clock=clock)
    queue.enqueue("score", b"one")
    task = queue.take(["score"], "alice", block_ms=100)
    keeper = LeaseKeeper(queue, "alice")
    with keeper.holding(task):
        clock.until_waiting(1)  # the keeper's thread
        for _ in range(9):
            age(queue, task, "alice", LEASE / 3)
            clock.advance(LEASE / 3)  # returns once the keeper has renewed
            assert idle_ms(queue, task) < LEASE * 1000 / 3, "renewed: idle from the renewal, not the delivery"
            assert queue.take(["score"], "bob", block_ms=1) is None
    keeper.close()
    age(queue, task, "alice", LEASE)  # now nobody renews it
    clock.advance(LEASE)
    reclaimed = queue.take(["score"], "bob", block_ms=1)
    assert (reclaimed.payload, reclaimed.deliveries) == (b"one", 2)
    queue.ack(reclaimed)
    assert queue.depth("score") == 0


def test_a_task_held_past_max_task_seconds_is_no_longer_renewed(redis):
    """A hung task: the keeper renews it until it has run max_task_seconds, then lets its lease
    lapse (another worker reclaims it a lease later)."""
    clock = ManualClock()
    queue, _ = fresh(redis, lease_seconds=LEASE, max_task_seconds=2 * LEASE, clock=clock)
    queue.enqueue("score", b"hangs")
    task = queue.take(["score"], "alice", block_ms=100)
    keeper = LeaseKeeper(queue, "alice")
    try:
        with keeper.holding(task):
            clock.until_waiting(1)
            for _ in range(6):  # two leases: renewed at every tick
                age(queue, task, "alice", LEASE / 3)
                clock.advance(LEASE / 3)
                assert idle_ms(queue, task) < LEASE * 1000 / 3
            for tick in range(1, 4):  # past max_task_seconds: no renewal any more
                age(queue, task, "alice", LEASE / 3)
                clock.advance(LEASE / 3)
                assert idle_ms(queue, task) >= tick * LEASE * 1000 / 3
            reclaimed = queue.take(["score"], "bob", block_ms=1)
            assert (reclaimed.message_id, reclaimed.deliveries) == (task.message_id, 2)
    finally:
        keeper.close()


def test_expired_leases_are_looked_for_at_most_every_second(redis):
    """take() scans for expired leases at most every min(1 s, lease/4) while it finds none: an
    expired task is reclaimed at the next scan, not at once."""
    clock = ManualClock()
    queue, _ = fresh(redis, lease_seconds=LEASE, clock=clock)
    queue.enqueue("merge", b"x")
    task = queue.take(["merge"], "alice", block_ms=100)  # scanned (nothing expired), then read
    age(queue, task, "alice", LEASE)
    assert queue.take(["merge"], "bob", block_ms=1) is None, "no scan within the second"
    clock.advance(1.0)
    again = queue.take(["merge"], "bob", block_ms=1)
    assert (again.message_id, again.deliveries) == (task.message_id, 2)


def test_a_read_over_several_streams_loses_no_task_to_its_lease(redis):
    """XREADGROUP over several streams delivers one entry per stream: every one is run at once,
    none waits out a lease (the load bench's 60 s tail at 8+ clients was this)."""
    queue, _ = fresh(redis, lease_seconds=60.0)
    for kind in ("score", "merge", "prepare"):
        queue.enqueue(kind, kind.encode())
    started = time.monotonic()
    taken = [queue.take(["score", "merge", "prepare"], "alice", block_ms=100) for _ in range(3)]
    assert sorted(task.payload for task in taken) == [b"merge", b"prepare", b"score"]
    assert all(task.deliveries == 1 for task in taken) and time.monotonic() - started < 5
    assert queue.take(["score", "merge", "prepare"], "alice", block_ms=50) is None
    for task in taken:
        queue.ack(task)


def test_request_ids_make_creates_idempotent_under_concurrency(redis):
    _, operations = fresh(redis)
    results = []
    threads = [threading.Thread(target=lambda: results.append(operations.create("fit", {}, "req-1"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({record["id"] for record, _ in results}) == 1
    assert sum(created for _, created in results) == 1


def test_terminal_states_do_not_change(redis):
    _, operations = fresh(redis)
    record, _ = operations.create("fit", {})
    assert operations.cancel(record["id"])
    assert not operations.succeed(record["id"], b"x") and not operations.fail(record["id"], 2, "late")
    assert operations.get(record["id"])["state"] == "CANCELLED"


def test_the_watcher_hears_every_way_an_operation_ends_and_nothing_else(redis):
    _, operations = fresh(redis)
    watcher = EndedWatcher(operations)
    try:
        assert watcher.wait_subscribed(10)
        finished, failed, cancelled, running = (operations.create("fit", {})[0]["id"] for _ in range(4))
        heard = {name: threading.Event() for name in (finished, failed, cancelled, running)}
        with contextlib.ExitStack() as stack:
            for name, event in heard.items():
                stack.enter_context(watcher.watch(name, event.set))
            operations.start(running, "covariance", 2)
            operations.finish_shard(running, "covariance", 0, 2, next_stage="eigen")  # not the last shard
            operations.finish_shard(finished, "merge", 0, 1, response=b"done")
            operations.fail(failed, 13, "broken")
            operations.cancel(cancelled)
            for name in (finished, failed, cancelled):
                assert heard[name].wait(10), name
            assert not heard[running].wait(0.2)
        operations.cancel(running)  # nobody watches it any more: no callback, no error
    finally:
        watcher.close()


def test_fan_in_advances_exactly_once_under_duplicates_and_concurrency(redis):
    queue, operations = fresh(redis)
    record, _ = operations.create("fit", {})
    operations.start(record["id"], "covariance", 6)
    next_tasks = [(queue.stream("eigen"), b"eigen-task", "")]
    outcomes = []

    def finish(shard):
        for _ in range(3):  # duplicate deliveries of every shard task
            outcomes.append(
                operations.finish_shard(record["id"], "covariance", shard, 6, next_stage="eigen", next_tasks=next_tasks)
            )

    threads = [threading.Thread(target=finish, args=(shard,)) for shard in range(6) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(True) == 1
    assert redis.xlen(queue.stream("eigen")) == 1
    assert operations.get(record["id"])["stage"] == "eigen"


def test_a_redis_restart_loses_no_task_and_no_operation(redis_server):
    queue, operations = fresh(connect(redis_server.url))
    record, _ = operations.create("score", {"kind": "score"}, "req-restart")
    queue.enqueue("score", b"survives")
    redis_server.restart()
    queue, operations = (
        TaskQueue(connect(redis_server.url), prefix=queue.prefix),
        OperationStore(connect(redis_server.url), prefix=queue.prefix),
    )
    assert operations.get(record["id"])["kind"] == "score"
    assert operations.create("score", {}, "req-restart")[0]["id"] == record["id"]
    assert queue.take(["score"], "after", block_ms=100).payload == b"survives"


@pytest.mark.needs_servers
def test_embedded_redis_supports_the_same_primitives(tmp_path):
    server = EmbeddedRedis(tmp_path)
    try:
        # The one real wait of these tests: that the embedded server's own idle time, which no
        # clock of ours moves, expires a lease. 50 ms is a lease that elapses for sure in 60.
        queue = TaskQueue(server.client(), lease_seconds=0.05)
        queue.enqueue("merge", b"x")
        first = queue.take(["merge"], "a", block_ms=50)
        time.sleep(0.06)
        again = queue.take(["merge"], "b", block_ms=50)
        assert (first.payload, again.deliveries) == (b"x", 2)
        queue.dead_letter(again, "gave up")
        assert queue.dead_letters("merge")[0]["cause"] == b"gave up"
    finally:
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 2


@pytest.mark.needs_servers
def test_embedded_redis_keeps_its_state_across_owners(tmp_path):
    """A second owner adopts the server a killed owner left running; after a graceful stop, a
    new server replays the append-only file. Either way the queued task is still there."""
    first = EmbeddedRedis(tmp_path)
    TaskQueue(first.client()).enqueue("merge", b"kept")
    adopted = EmbeddedRedis(tmp_path)  # as if `first`'s process had been SIGKILLed
    try:
        assert adopted.pid == first.pid
        adopted.stop()
        assert not process_running(first.pid)
        restarted = EmbeddedRedis(tmp_path)
        try:
            assert restarted.pid != first.pid
            assert TaskQueue(restarted.client()).take(["merge"], "c", block_ms=50).payload == b"kept"
        finally:
            restarted.stop()
    finally:
        adopted.stop()
        first.stop()


def test_queue_stats_count_waiting_running_lag_and_dead_letters(redis):
    queue, _ = fresh(redis, lease_seconds=30)
    assert queue.stats("score").waiting == 0
    for number in range(3):
        queue.enqueue("score", f"task {number}".encode())
    task = queue.take(["score"], "consumer-1", block_ms=100)
    stats = queue.stats("score")
    assert (stats.waiting, stats.running, stats.dead_letters) == (2, 1, 0)
    assert 0 <= stats.oldest_waiting_seconds < 60
    queue.dead_letter(task, "a cause")
    stats = queue.stats("score")
    assert (stats.waiting, stats.running, stats.dead_letters) == (2, 0, 1)
    for _ in range(2):
        queue.ack(queue.take(["score"], "consumer-1", block_ms=100))
    assert queue.stats("score") == type(stats)(waiting=0, running=0, oldest_waiting_seconds=0.0, dead_letters=1)


def test_take_matching_takes_the_waiting_tasks_of_a_batch_key_from_the_head_only(redis):
    """A consumer holding a task with a batch key takes the next waiting tasks of that key, in order,
    up to its limit, and stops at the first task of another key (a tenant's other key: never passed
    over, never taken); tasks without a key run alone. What it took is pending on it, each a first
    delivery, and renewed, acknowledged and counted like any task."""
    queue, _ = fresh(redis)
    for payload, key in [
        (b"a1", "alice/idx/f/0"),
        (b"a2", "alice/idx/f/0"),
        (b"a3", "alice/idx/f/0"),
        (b"b1", "bob/idx/f/0"),
        (b"a4", "alice/idx/f/0"),
        (b"plain", ""),
    ]:
        queue.enqueue("index_score", payload, key)
    first = queue.take(["index_score"], "w1", block_ms=100)
    assert (first.payload, first.key, first.deliveries) == (b"a1", "alice/idx/f/0", 1)
    second, now_ms = queue.take_matching(first, "w1", limit=1)
    assert [task.payload for task in second] == [b"a2"] and now_ms >= first.enqueued_ms
    more, _ = queue.take_matching(first, "w1", limit=5)
    assert [(task.payload, task.deliveries, task.key) for task in more] == [(b"a3", 1, "alice/idx/f/0")]
    assert queue.stats("index_score").running == 3 and queue.stats("index_score").waiting == 3
    bob = queue.take(["index_score"], "w2", block_ms=100)
    assert bob.payload == b"b1" and queue.take_matching(bob, "w2", limit=5)[0] == []  # a4 is alice's
    alice = queue.take(["index_score"], "w2", block_ms=100)
    assert alice.payload == b"a4" and queue.take_matching(alice, "w2", limit=5)[0] == []  # "plain" has no key
    plain = queue.take(["index_score"], "w1", block_ms=100)
    assert plain.key == "" and queue.take_matching(plain, "w1", limit=5) == ([], plain.enqueued_ms)
    for task in [first, *second, *more, bob, alice, plain]:
        queue.ack(task)
    assert queue.stats("index_score") == QueueStats(waiting=0, running=0, oldest_waiting_seconds=0.0, dead_letters=0)
