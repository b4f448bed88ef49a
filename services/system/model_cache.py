"""Models a worker process keeps loaded between tasks (loading one costs seconds)."""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..engine.model_io import load_model_and_tokenizer
from .specs import ModelRef

# transformers' from_pretrained is not thread-safe (it swaps global init contexts): one load at a time.
_LOADING = threading.Lock()


class ModelCache:
    """Least-recently-used cache of (model, tokenizer) by (path, device, dtype), one per worker:
    a worker's hooks must not run on a model another thread is using."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ref: ModelRef):
        key = (ref.path, ref.device, ref.dtype)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        with _LOADING:
            loaded = load_model_and_tokenizer(ref.path, ref.device, ref.dtype)
        with self._lock:
            self._entries[key] = loaded
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return loaded


class ArtifactCache:
    """Write-once artifacts a worker reads again and again (a job's eigenbases and prepared
    queries, factor sets): kept by key, least recently used first out. Safe because every key
    is written once (a retried task rewrites the same bytes)."""

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._entries: OrderedDict = OrderedDict()

    def get(self, key, load):
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = load()
        self._entries[key] = value
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return value
