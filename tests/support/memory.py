"""Memory measured from outside a process, for tests that bound what a server keeps; an
out-of-memory error raised on demand, for tests of the budget's rule (engine/budget.within_memory)."""

from __future__ import annotations

import threading

import psutil
import torch


class PeakRss:
    """The highest RSS of a process while the block runs (sampled every 10 ms)."""

    def __init__(self, pid: int):
        self.process, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()


class RunsOutOfMemory:
    """A forward pre-hook that raises torch's out-of-memory error for batches larger than `most`
    (an allocation failure at a batch size, as a GPU would raise it), recording every batch size."""

    def __init__(self, most: int):
        self.most, self.batches = most, []

    def __call__(self, module, args, kwargs):
        size = kwargs["input_ids"].shape[0]
        self.batches.append(size)
        if size > self.most:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated at batch {size})")
