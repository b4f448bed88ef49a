"""The machine's resources as this process may use them: cores (the cgroup's CPU limit), memory,
and the budget the fit's capture cache draws on. (What a fit plans from them, its batch size and
module groups: budget.py.)

A container's limit (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`) is what the kernel
enforces, not the host's RAM: a worker in a 16 GiB pod on a 512 GiB node that sized its cache from
the node would be OOM-killed. The default capture budget is a quarter of the smaller of the two.

A `MemoryBudget` is shared by every capture cache of a process (in-process fit, or a worker's
caches across jobs and shards): each cache reserves what it keeps and frees it when released, so
k caches together never exceed the budget.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

_CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def cgroup_limit_bytes(paths=_CGROUP_LIMITS) -> int | None:
    """The container's memory limit, or None when unlimited or not in a memory cgroup."""
    for path in paths:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit():
            return None
        limit = int(text)
        return limit if limit < 2**60 else None  # v1 reports "unlimited" as a huge number
    return None


def memory_limit_bytes() -> int:
    """What this process may use: the container's limit if any, else physical memory."""
    physical = physical_memory_bytes()
    limit = cgroup_limit_bytes()
    return min(physical, limit) if limit else physical


def default_cache_bytes() -> int:
    """The default capture-cache budget: a quarter of `memory_limit_bytes()`."""
    return memory_limit_bytes() // 4


def gib_to_bytes(gib: float | None) -> int | None:
    return None if gib is None else int(gib * 2**30)


class MemoryBudget:
    """A byte budget shared by threads: `reserve` takes bytes if they fit, `free` gives them back."""

    def __init__(self, total_bytes: int):
        self.total = max(0, int(total_bytes))
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        """Take `nbytes` if the total stays within the budget; False (nothing taken) otherwise."""
        with self._lock:
            if self.used + nbytes > self.total:
                return False
            self.used += nbytes
            return True

    def free(self, nbytes: int) -> None:
        with self._lock:
            self.used = max(0, self.used - nbytes)


_CGROUP_CPU_LIMITS = (
    Path("/sys/fs/cgroup/cpu.max"),  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
    Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),  # cgroup v1: the quota alone (-1: none), period beside it
)


def cgroup_cpu_limit(paths=_CGROUP_CPU_LIMITS) -> int | None:
    """The container's CPU limit in whole cores (quota / period, rounded up), or None when unlimited
    or not in a CPU cgroup. A pod limited to 4 cores on a 64-core node sees 64 CPUs in its affinity
    mask: threads sized by the node would be throttled by the kernel to 4 cores' worth of time."""
    v2, v1 = paths
    try:
        quota, _, period = v2.read_text().strip().partition(" ")
        if quota == "max":
            return None
        return max(1, -(-int(quota) // int(period or 100_000)))
    except (OSError, ValueError):
        pass
    try:
        quota = int(v1.read_text().strip())
        period = int((v1.parent / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return None
    return max(1, -(-quota // period)) if quota > 0 and period > 0 else None


def available_cores() -> int:
    """CPU threads this process may use: OMP_NUM_THREADS if set, else the CPUs it is allowed on,
    at most the container's CPU limit (`cgroup_cpu_limit`)."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return min(allowed, limit) if limit else allowed


@contextlib.contextmanager
def single_threaded_torch() -> Iterator[None]:
    """torch ops on one thread each inside the block (for work spread over a thread pool)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
