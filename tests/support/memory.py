"""Memory measured from outside a process, for tests that bound what a server keeps."""

from __future__ import annotations

import threading

import psutil


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
