"""Models a worker process keeps loaded between tasks (loading one costs seconds)."""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..engine.model_io import load_model_and_tokenizer
from .specs import ModelRef


class ModelCache:
    """Least-recently-used cache of (model, tokenizer) by (path, device, dtype)."""

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
        loaded = load_model_and_tokenizer(ref.path, ref.device, ref.dtype)
        with self._lock:
            self._entries[key] = loaded
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return loaded
