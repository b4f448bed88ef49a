"""What a stage may use on its worker: the store, the caches kept between tasks, the memory budget
of the capture caches, the worker's device, and the current task's progress reporter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..engine.device import cuda_problem
from ..engine.progress import Progress
from ..engine.resources import MemoryBudget, default_cache_bytes
from ..storage import ArtifactStore
from .caches import ArtifactCache, CapturePool, ModelCache


@dataclass
class WorkerContext:
    store: ArtifactStore
    models: ModelCache | None = None
    artifacts: ArtifactCache = field(default_factory=ArtifactCache)
    # bytes every capture cache of this worker may hold together (default: ¼ of the memory limit)
    cache_bytes: int | None = None
    # index blocks this worker keeps (hot blocks of the indexes it scores against), within 1 GiB
    blocks: ArtifactCache = field(default_factory=lambda: ArtifactCache(capacity=100_000, max_bytes=1 << 30))
    progress: Progress = field(default_factory=Progress)
    # the device this worker runs models on: cpu, cuda, or "" (cuda if usable, else cpu); a task
    # whose model asks for no device runs on it, one asking for cuda on a cpu worker is refused
    device: str = ""
    # why this process cannot compute on CUDA, or None (engine.device.cuda_problem; tests that
    # simulate a GPU worker on a CPU machine give one that finds none)
    gpu_check: Callable[[], str | None] = cuda_problem
    # set when built: why this worker cannot run its device's tasks (asked for cuda, no usable
    # GPU), or None. Such a worker reports NOT_SERVING and takes no task (system/runner.py).
    device_problem: str | None = field(init=False, default=None)

    def __post_init__(self):
        self.models = self.models or ModelCache()
        problem = self.gpu_check() if self.device in ("", "cuda") else None
        if self.device == "":  # the machine's: cuda when it works
            self.device, problem = ("cpu" if problem else "cuda"), None
        self.device = self.models.place_on(self.device)  # InputError unless cpu or cuda
        if self.device == "cuda":  # one model on a GPU: a second's weights would take its fit's budget
            self.models.capacity = 1
        self.device_problem = f"asked for cuda, but {problem}" if problem else None
        self.captures = CapturePool(
            MemoryBudget(default_cache_bytes() if self.cache_bytes is None else self.cache_bytes)
        )
