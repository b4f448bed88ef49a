"""A clock that moves only when a test advances it, for the timing the code measures itself (the
queue's lease renewals and reclaim scans, the token file's re-check interval): tests advance it
instead of sleeping.

    clock = ManualClock()
    queue = TaskQueue(redis, lease_seconds=30, clock=clock)   # a services.jobs.queue.Clock
    tokens = TokenFile(path, clock=clock.now)                 # a function of monotonic seconds
    clock.until_waiting(1)    # the lease keeper's thread waits on the clock
    clock.advance(10)         # returns once that thread has done what came due and waits again

Time Redis measures itself (a pending task's idle time, which XAUTOCLAIM compares with the lease)
does not follow this clock: tests set it with `age` below, as the queue's own `release` does.
"""

from __future__ import annotations

import threading
import time

from services.jobs.queue import GROUP, Clock, Task, TaskQueue


class ManualClock(Clock):
    def __init__(self, start: float = 1000.0):
        self._now = start
        self._condition = threading.Condition()
        # thread id -> the time its current wait ends; a thread stays listed, due, from the end of
        # its wait until it waits again, so `advance` can wait for the work that came due
        self._sleepers: dict[int, float] = {}

    def now(self) -> float:
        with self._condition:
            return self._now

    def wait(self, event: threading.Event, seconds: float) -> bool:
        me = threading.get_ident()
        with self._condition:
            self._sleepers[me] = self._now + seconds
            self._condition.notify_all()
            while not event.is_set() and self._now < self._sleepers[me]:
                self._condition.wait(0.01)  # Event.set does not notify this condition: look again soon
            if event.is_set():
                del self._sleepers[me]  # stopped: it will not wait again
                self._condition.notify_all()
                return True
            return False

    def advance(self, seconds: float, timeout: float = 10.0) -> None:
        """Move the time on by `seconds`; return once every thread whose wait came due has waited
        again (or stopped). AssertionError if one does not within `timeout` real seconds."""
        with self._condition:
            self._now += seconds
            self._condition.notify_all()
            self._until(lambda: all(end > self._now for end in self._sleepers.values()), timeout, "wait again")

    def until_waiting(self, count: int, timeout: float = 10.0) -> None:
        """Return once `count` threads wait on this clock (e.g. a keeper's thread just started)."""
        with self._condition:
            self._until(
                lambda: sum(end > self._now for end in self._sleepers.values()) >= count, timeout, "wait on the clock"
            )

    def _until(self, done, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the threads on this clock did not {what} within {timeout:g} s")
            self._condition.wait(remaining)


def idle_ms(queue: TaskQueue, task: Task) -> int:
    """How long Redis says `task` has been idle (since it was delivered or its lease renewed)."""
    (entry,) = queue.client.xpending_range(queue.stream(task.kind), GROUP, task.message_id, task.message_id, 1)
    return int(entry["time_since_delivered"])


def age(queue: TaskQueue, task: Task, consumer: str, by_seconds: float) -> None:
    """Make Redis count `by_seconds` more of idle time on `task` (held by `consumer`), as if that
    much time had passed without a renewal: XCLAIM ... IDLE JUSTID, which counts no delivery."""
    idle = idle_ms(queue, task) + int(by_seconds * 1000)
    queue.client.xclaim(queue.stream(task.kind), GROUP, consumer, 0, [task.message_id], idle=idle, justid=True)
