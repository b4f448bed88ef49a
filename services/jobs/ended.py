"""Being told at once that an operation ended, instead of polling its record.

OperationStore publishes an operation's id on its `ended_channel` in the same atomic step that
makes the operation SUCCEEDED, FAILED or CANCELLED. One `EndedWatcher` per server process
holds a single Redis subscription to that channel on a thread and calls the callbacks waiting
on the id. Pub/sub delivers at most once and nothing while the subscription is down, so a
waiter still re-reads the record now and then: a lost message costs latency, never a result.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import redis

from .operations import OperationStore

log = logging.getLogger("influence.jobs")


class EndedWatcher:
    """`with watcher.watch(operation_id, callback):` calls `callback()` (on the watcher's thread)
    when the operation ends while the block runs. The thread subscribes at construction."""

    def __init__(self, operations: OperationStore, reconnect_seconds: float = 0.5):
        self.operations = operations
        self.reconnect_seconds = reconnect_seconds
        self._callbacks: dict[str, set[Callable[[], None]]] = defaultdict(set)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="operation-ended-watcher", daemon=True)
        self._thread.start()

    @property
    def live(self) -> bool:
        """True while the subscription is confirmed (waiters may then rely on it)."""
        return self._subscribed.is_set()

    @contextmanager
    def watch(self, operation_id: str, callback: Callable[[], None]) -> Iterator[None]:
        with self._lock:
            self._callbacks[operation_id].add(callback)
        try:
            yield
        finally:
            with self._lock:
                waiting = self._callbacks.get(operation_id)
                if waiting is not None:
                    waiting.discard(callback)
                    if not waiting:
                        del self._callbacks[operation_id]

    def wait_subscribed(self, timeout: float) -> bool:
        """True once the subscription is live (tests use it to avoid a startup race)."""
        return self._subscribed.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        with suppress(redis.RedisError, OSError):  # wake the thread now rather than at its next poll
            self.operations.client.publish(self.operations.ended_channel, "")
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self.operations.client.pubsub()
            try:
                pubsub.subscribe(self.operations.ended_channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.25) or {}
                    if message.get("type") == "subscribe":  # the server confirmed: live from here
                        self._subscribed.set()
                    elif message.get("type") == "message":
                        self._notify(message["data"].decode())
            except (redis.RedisError, OSError) as error:  # waiters fall back to re-reading records
                self._subscribed.clear()
                log.debug("operation watcher: %s; resubscribing", error)
                self._stop.wait(self.reconnect_seconds)
            finally:
                with suppress(redis.RedisError, OSError):
                    pubsub.close()

    def _notify(self, operation_id: str) -> None:
        with self._lock:
            callbacks = list(self._callbacks.get(operation_id, ()))
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a waiter's loop already closed: nothing to tell
                log.debug("operation watcher: a callback failed", exc_info=True)
