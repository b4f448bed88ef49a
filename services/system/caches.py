"""What a worker keeps between tasks: loaded models (loading one costs seconds), write-once
artifacts, and the fit's capture caches within one memory budget."""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

from ..engine.fit import CaptureCache
from ..engine.model_io import ModelRef, load_model_and_tokenizer, load_tokenizer
from ..engine.resources import MemoryBudget
from ..errors import InputError, WrongWorkerError

# transformers' from_pretrained is not thread-safe (it swaps global init contexts): one load at a time.
_LOADING = threading.Lock()


class ModelCache:
    """Least-recently-used cache of (model, tokenizer) by (path, device, dtype), one per worker:
    a worker's hooks must not run on a model another thread is using. A model asked for on
    device "" runs on the worker's `device` (its pool's)."""

    def __init__(
        self,
        capacity: int = 2,
        loader: Callable | None = None,
        tokenizer_loader: Callable | None = None,
        device: str = "",
    ):
        """`loader(path, device, dtype, tokenizer=..., base=...)` -> (model, tokenizer) and
        `tokenizer_loader(path, base)` default to loading local Hugging Face directories."""
        self.capacity = capacity
        self.loader = loader or load_model_and_tokenizer
        self.tokenizer_loader = tokenizer_loader or load_tokenizer
        self._entries: OrderedDict = OrderedDict()
        self._tokenizers: OrderedDict = OrderedDict()  # (path, base) -> tokenizer, for tokenising alone
        self._lock = threading.Lock()
        self.place_on(device)  # this worker's device

    def place_on(self, device: str) -> str:
        """Run models on `device` (cpu, cuda, or "": cuda if available, else cpu); returns it resolved.
        (A worker resolves "" itself, by whether CUDA works: system/context.py.)"""
        if device not in ("", "cpu", "cuda"):
            raise InputError(f"worker device must be cpu or cuda, got {device!r}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return self.device

    def placed(self, ref: ModelRef) -> ModelRef:
        """`ref` on this worker's device: a ref without a device takes the worker's; a cuda ref on a
        CPU worker raises WrongWorkerError, so the task goes back to the queue for a GPU worker."""
        if not ref.device:
            return dataclasses.replace(ref, device=self.device)
        if ref.device.startswith("cuda") and self.device == "cpu":
            raise WrongWorkerError("this worker runs on cpu and the task's model asks for cuda; left for a GPU worker")
        return ref

    def get(self, ref: ModelRef):
        ref = self.placed(ref)
        key = (ref.path, ref.device, ref.dtype, ref.base)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            tokenizer = self._tokenizers.get((ref.path, ref.base))
        with _LOADING:
            loaded = self.loader(ref.path, ref.device, ref.dtype, tokenizer=tokenizer, base=ref.base)
        with self._lock:
            self._entries[key] = loaded
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return loaded

    def tokenizer(self, path: str, base: str = ""):
        """The tokenizer of the model directory `path` (with an adapter's `base`: ModelRef.base; a
        dataset registration needs no model); a model loaded later from `path` shares it."""
        with self._lock:
            for (entry_path, _, _, entry_base), (_, tokenizer) in self._entries.items():
                if (entry_path, entry_base) == (path, base):
                    return tokenizer
            if (path, base) in self._tokenizers:
                self._tokenizers.move_to_end((path, base))
                return self._tokenizers[(path, base)]
        tokenizer = self.tokenizer_loader(path, base)
        with self._lock:
            self._tokenizers[(path, base)] = tokenizer
            while len(self._tokenizers) > self.capacity:
                self._tokenizers.popitem(last=False)
        return tokenizer


def tensor_bytes(value, depth: int = 0) -> int:
    """Bytes of the tensors in `value` (a tensor, or dicts, lists and dataclasses of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if depth > 4:
        return 0
    if isinstance(value, dict):
        return sum(tensor_bytes(item, depth + 1) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(item, depth + 1) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "__dict__"):  # dataclasses.fields() costs ~10 µs a call: 5 ms a shard
            return sum(tensor_bytes(item, depth + 1) for item in vars(value).values())
        return sum(tensor_bytes(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value))
    return 0


class ArtifactCache:
    """Write-once artifacts a worker reads again and again (a job's eigenbases, partial sums and
    prepared queries, factor sets): kept by key, least recently used first out, within
    `capacity` entries and `max_bytes` of tensors (a value larger than that is not kept).
    Safe because every key is written once (a retried task rewrites the same bytes). A stage
    that writes such an artifact `put`s it too, so the next stage on this worker skips the
    read, the manifest check and the decoding.
    """

    def __init__(self, capacity: int = 64, max_bytes: int = 1 << 30):
        self.capacity, self.max_bytes = capacity, max_bytes
        self._entries: OrderedDict = OrderedDict()  # key -> (value, bytes)
        self._bytes = 0

    def __contains__(self, key) -> bool:
        return key in self._entries

    def get(self, key, load):
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key][0]
        return self.put(key, load())

    def put(self, key, value):
        """Keep `value` under `key` (if it fits); returns it."""
        size = tensor_bytes(value)
        if key in self._entries:
            self._bytes -= self._entries.pop(key)[1]
        if size <= self.max_bytes:
            self._entries[key] = (value, size)
            self._bytes += size
            while len(self._entries) > self.capacity or self._bytes > self.max_bytes:
                self._bytes -= self._entries.popitem(last=False)[1][1]
        return value

    def forget_prefix(self, prefix: str) -> None:
        """Drop every entry whose key is a store key starting with `prefix` (a finished job's)."""
        for key in [key for key in self._entries if isinstance(key, str) and key.startswith(prefix)]:
            self._bytes -= self._entries.pop(key)[1]

    def take(self, key, load):
        """The value under `key`, removed from the cache (else `load()`): for a value read once
        and then changed in place, like a partial sum merged into others."""
        if key in self._entries:
            value, size = self._entries.pop(key)
            self._bytes -= size
            return value
        return load()


class CapturePool:
    """The capture caches a worker keeps, by (job, shard), all drawing on one `MemoryBudget`.

    A covariance task's cache is kept only once the task succeeded (`keep`), taken by the same
    shard's correction task on this worker (`take`), and released when its job ends for any reason
    (`release_ended`: succeeded, failed, cancelled, or the correction ran on another worker)."""

    def __init__(self, budget: MemoryBudget):
        self.budget = budget
        self._caches: dict[tuple[str, int], CaptureCache] = {}
        self._lock = threading.Lock()

    def keep(self, job: str, shard: int, cache: CaptureCache) -> None:
        with self._lock:
            previous = self._caches.pop((job, shard), None)
            self._caches[(job, shard)] = cache
        if previous is not None and previous is not cache:
            previous.release()

    def take(self, job: str, shard: int) -> CaptureCache | None:
        with self._lock:
            return self._caches.pop((job, shard), None)

    def jobs(self) -> set[str]:
        with self._lock:
            return {job for job, _ in self._caches}

    def release_job(self, job: str) -> None:
        with self._lock:
            released = [self._caches.pop(key) for key in [key for key in self._caches if key[0] == job]]
        for cache in released:
            cache.release()

    def release_ended(self, ended: Callable[[str], bool]) -> None:
        """Release the caches of every job for which `ended(job)` is true."""
        for job in self.jobs():
            if ended(job):
                self.release_job(job)

    @property
    def bytes(self) -> int:
        return self.budget.used
