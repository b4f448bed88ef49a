"""Bytes moved to and from artifact stores by this process, per backend and direction: plain
thread-safe counters (the metrics endpoint reads them; storage knows nothing of Prometheus)."""

from __future__ import annotations

import threading

_lock = threading.Lock()
_bytes: dict[tuple[str, str], int] = {}


def count(backend: str, direction: str, size: int) -> None:
    """Record `size` bytes moved; direction is "read" or "written"."""
    with _lock:
        _bytes[(backend, direction)] = _bytes.get((backend, direction), 0) + int(size)


def snapshot() -> dict[tuple[str, str], int]:
    """{(backend, direction): bytes so far}."""
    with _lock:
        return dict(_bytes)
