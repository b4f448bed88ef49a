"""Connecting a server or worker process to Redis and the object store, from flags and env."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..jobs.connection import EmbeddedRedis, connect
from ..jobs.operations import OperationStore
from ..jobs.queue import TaskQueue
from ..storage import open_store
from .runner import JobSystem

DEFAULT_STATE_DIR = ".cache/influence-server"


@contextlib.contextmanager
def system_from_args(args):
    """A JobSystem. Without a Redis URL an embedded Redis is started under --state-dir; without
    a store URL, artifacts go to --state-dir/artifacts (the single-machine defaults).
    INFLUENCE_QUEUE_PREFIX namespaces the Redis keys (several systems can share one Redis)."""
    state = Path(args.state_dir or os.environ.get("INFLUENCE_STATE_DIR") or DEFAULT_STATE_DIR)
    redis_url = args.redis_url or os.environ.get("INFLUENCE_REDIS_URL", "")
    store_url = args.store_url or os.environ.get("INFLUENCE_STORE_URL", "") or str(state / "artifacts")
    embedded = None
    try:
        if redis_url:
            client = connect(redis_url)
        else:
            embedded = EmbeddedRedis(state / "redis")
            client = embedded.client()
        prefix = os.environ.get("INFLUENCE_QUEUE_PREFIX", "influence")
        yield JobSystem(
            open_store(store_url),
            OperationStore(client, prefix=prefix),
            TaskQueue(client, prefix=prefix, lease_seconds=args.lease_seconds, max_deliveries=args.max_deliveries),
        )
    finally:
        if embedded is not None:
            embedded.stop()
