"""The whole system in one process: embedded Redis, a local artifact directory, the gRPC
services on a loopback port and in-process workers. Same code paths as a cluster."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

from ..jobs.connection import EmbeddedRedis
from ..jobs.operations import OperationStore
from ..jobs.queue import TaskQueue
from ..rpc.server import BackgroundServer
from ..storage import LocalStore
from .runner import JobSystem, Worker
from .stages import StageContext


class EmbeddedSystem:
    """Start with `with EmbeddedSystem() as system:`; `system.target` is the gRPC address.

    One worker by default: on a small machine torch already uses every core inside one task,
    and one worker keeps the covariance pass's captures for its correction pass.
    """

    def __init__(self, directory: str | Path | None = None, workers: int = 1, lease_seconds: float = 60.0):
        self._temporary = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="influence-embedded-"))
        self.workers_count = workers
        self.lease_seconds = lease_seconds
        self.redis: EmbeddedRedis | None = None
        self.server: BackgroundServer | None = None
        self.workers: list[Worker] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> EmbeddedSystem:
        self.redis = EmbeddedRedis(self.directory / "redis")
        client = self.redis.client()
        self.system = JobSystem(
            LocalStore(self.directory / "artifacts"),
            OperationStore(client),
            TaskQueue(client, lease_seconds=self.lease_seconds),
        )
        self.server = BackgroundServer(self.system).start()
        for number in range(self.workers_count):
            worker = Worker(self.system, consumer=f"embedded-{number}", context=StageContext(self.system.store))
            thread = threading.Thread(
                target=worker.run_forever, kwargs={"block_ms": 100}, name=f"worker-{number}", daemon=True
            )
            thread.start()
            self.workers.append(worker)
            self._threads.append(thread)
        return self

    @property
    def target(self) -> str:
        return self.server.target

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop.set()
        for thread in self._threads:
            thread.join(30)
        if self.server is not None:
            self.server.stop()
        if self.redis is not None:
            self.redis.stop()
        if self._temporary:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> EmbeddedSystem:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
