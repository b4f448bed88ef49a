"""Bounded retries with exponential backoff for transient object-store failures.

A backend wraps each attempt so that a transient failure (connection refused or reset,
timeout, HTTP 5xx, throttling) raises `Transient`; anything else propagates at once. After
the last attempt the caller gets StorageUnavailable naming the operation, the attempts, the
time spent and the last cause.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from ..errors import StorageUnavailable

T = TypeVar("T")


class Transient(Exception):
    """Raised inside an attempt: this failure may go away if we try again."""

    def __init__(self, cause: BaseException):
        super().__init__(summarize(cause))
        self.cause = cause


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` tries in all; waits initial_delay, x multiplier, ... capped at max_delay,
    each scaled by a random factor in [0.5, 1] so that many clients do not retry in step."""

    attempts: int = 5
    initial_delay: float = 0.2
    max_delay: float = 3.0
    multiplier: float = 2.0

    def __post_init__(self):
        if self.attempts < 1 or self.initial_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise ValueError(f"invalid retry policy {self}")

    def delays(self) -> Iterator[float]:
        """The waits between attempts (attempts - 1 of them)."""
        delay = self.initial_delay
        for _ in range(self.attempts - 1):
            yield min(delay, self.max_delay) * random.uniform(0.5, 1.0)
            delay *= self.multiplier


def call_with_retries(attempt: Callable[[], T], policy: RetryPolicy, what: str, where: str) -> T:
    """`attempt()` until it does not raise Transient, at most policy.attempts times."""
    started = time.monotonic()
    delays = policy.delays()
    tries = 0
    while True:
        tries += 1
        try:
            return attempt()
        except Transient as failure:
            delay = next(delays, None)
            if delay is None:
                elapsed = time.monotonic() - started
                raise StorageUnavailable(
                    f"object store {where} unavailable: {what} failed {tries} time(s) in {elapsed:.1f} s; "
                    f"last error: {failure}"
                ) from failure.cause
            time.sleep(delay)


def summarize(error: BaseException) -> str:
    """One line naming the root cause, e.g. 'ConnectionRefusedError: [Errno 111] Connection refused'."""
    seen = set()
    while id(error) not in seen:  # unwrap urllib3's MaxRetryError -> NewConnectionError -> OSError
        seen.add(id(error))
        inner = getattr(error, "reason", None)
        if not isinstance(inner, BaseException):
            break
        error = inner
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__
