"""A worker process that SIGKILLs itself inside one task: `python -m tests.support.doomed_worker SPEC_JSON`.

The test's driver has already moved the task (its Redis stream entry) to this process's
consumer name; this process reads the entry, runs it as a real worker would (lease renewed by
its heartbeat thread), and at its `die_at`-th touch of the object store or of its operation's
progress sends itself SIGKILL: no handler, finally block or atexit runs, the lease is no longer
renewed, and the task stays pending under a consumer that will never come back. A task that
ends before that touch exits 0 (the driver then sees no death).

SPEC_JSON: {"redis_url", "store_url", "prefix", "lease_seconds", "max_deliveries", "consumer",
"kind", "message_id", "deliveries", "die_at", "torch_threads"}.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

from services.assembly import job_system
from services.jobs.connection import connect
from services.jobs.queue import GROUP, Task
from services.storage import open_store
from services.storage.s3 import S3Store
from services.system.runner import OperationProgress, Worker

STORE_CALLS = ("get_bytes", "put_bytes", "put_buffers", "put_file", "get_file")


def arm(die_at: int) -> None:
    """SIGKILL this process at its `die_at`-th store call or progress update."""
    remaining = [die_at]

    def touch() -> None:
        remaining[0] -= 1
        if remaining[0] == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    for name in STORE_CALLS:
        original = getattr(S3Store, name)

        def touched(store, *args, _original=original, **kwargs):
            touch()
            return _original(store, *args, **kwargs)

        setattr(S3Store, name, touched)
    advance = OperationProgress.advance

    def advanced(progress, *args, **kwargs):
        touch()
        return advance(progress, *args, **kwargs)

    OperationProgress.advance = advanced


def main(spec: dict) -> int:
    torch.set_num_threads(spec["torch_threads"])
    system = job_system(
        open_store(spec["store_url"]),
        connect(spec["redis_url"]),
        prefix=spec["prefix"],
        lease_seconds=spec["lease_seconds"],
        max_deliveries=spec["max_deliveries"],
    )
    stream = system.queue.stream(spec["kind"])
    entries = system.queue.client.xrange(stream, spec["message_id"], spec["message_id"])
    if not entries:
        print(f"{spec['message_id']} is not in {stream}", file=sys.stderr)
        return 3
    pending = system.queue.client.xpending_range(stream, GROUP, spec["message_id"], spec["message_id"], 1)
    owner = pending[0]["consumer"].decode() if pending else ""
    if owner != spec["consumer"]:
        print(f"{spec['message_id']} is held by {owner!r}, not {spec['consumer']!r}", file=sys.stderr)
        return 3
    task = Task(spec["kind"], spec["message_id"], entries[0][1][b"payload"], spec["deliveries"])
    worker = Worker(system, consumer=spec["consumer"])
    arm(spec["die_at"])
    worker.handle(task)
    worker.lease.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
