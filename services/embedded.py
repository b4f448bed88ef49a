"""The whole system in one process: embedded Redis, a local artifact directory, the gRPC
services on a loopback port and in-process workers. Same code paths as a cluster.

Two ways to use it:

    with EmbeddedSystem() as system:                 # workers in background threads
        with InfluenceClient(system.target) as client: ...

    with EmbeddedSystem(foreground=True) as system:  # the CLI and the demo
        result = system.run(lambda client: ...)      # the caller's thread runs worker 0

Foreground mode exists for speed. torch's CPU kernels use one OpenMP team per calling thread;
once two threads own teams that together exceed the cores (the caller's thread owns one as soon
as it ran a parallel torch op, e.g. while training the demo model), every parallel region of
either waits on the other: measured 2-5x slower small ops and a 2x slower demo fit on 2 cores.
Running the work on the caller's thread, and the client calls on a helper thread that never
touches torch, keeps one team in the process.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from .assembly import job_system, make_server
from .jobs.connection import EmbeddedRedis
from .rpc.server import BackgroundServer
from .storage import LocalStore
from .system.context import WorkerContext
from .system.runner import Worker, threads_per_worker

T = TypeVar("T")
# the embedded server is plaintext on loopback without tokens, whatever INFLUENCE_TOKEN/TLS_* say
PLAINTEXT = {"token": "", "tls_ca": "", "tls_cert": "", "tls_key": ""}


class EmbeddedSystem:
    """Start with `with EmbeddedSystem() as system:`; `system.target` is the gRPC address.

    One worker by default: on a small machine torch already uses every core inside one task,
    and one worker keeps the covariance pass's captures for its correction pass. With
    `foreground`, worker 0 runs only inside `run`, on the calling thread.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        workers: int = 1,
        lease_seconds: float = 60.0,
        foreground: bool = False,
        cache_bytes: int | None = None,
        coalesce_seconds: float = 0.0,
    ):
        self._temporary = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="influence-embedded-"))
        self.workers_count = workers
        self.lease_seconds = lease_seconds
        self.foreground = foreground
        self.cache_bytes = cache_bytes  # each worker's capture-cache budget (None: ¼ of the memory limit)
        self.coalesce_seconds = coalesce_seconds  # each worker's batch window (Worker.coalesce_seconds; 0: off)
        self.redis: EmbeddedRedis | None = None
        self.server: BackgroundServer | None = None
        self.workers: list[Worker] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> EmbeddedSystem:
        self.redis = EmbeddedRedis(self.directory / "redis")
        self.system = job_system(
            LocalStore(self.directory / "artifacts"), self.redis.client(), lease_seconds=self.lease_seconds
        )
        self.server = BackgroundServer(lambda: make_server(self.system)).start()
        threads = threads_per_worker(self.workers_count)
        for number in range(self.workers_count):
            worker = Worker(
                self.system,
                consumer=f"embedded-{number}",
                context=WorkerContext(self.system.store, cache_bytes=self.cache_bytes),
                torch_threads=threads,
                coalesce_seconds=self.coalesce_seconds,
            )
            self.workers.append(worker)
            if self.foreground and number == 0:
                continue
            thread = threading.Thread(
                target=worker.run_forever, kwargs={"block_ms": 100}, name=f"worker-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def run(self, body: Callable[..., T]) -> T:
        """body(client) on a helper thread while this thread runs worker 0; body's result (or
        its exception, raised here). Needs `foreground=True`."""
        from .client import InfluenceClient

        if not self.foreground:
            raise RuntimeError("EmbeddedSystem.run needs foreground=True (worker 0 is already in a thread)")
        worker, outcome = self.workers[0], {}

        def call() -> None:
            try:
                with InfluenceClient(self.target, **PLAINTEXT) as client:
                    outcome["value"] = body(client)
            except BaseException as error:  # re-raised on the caller's thread
                outcome["error"] = error
            finally:
                worker.stop.set()

        helper = threading.Thread(target=call, name="embedded-client", daemon=True)
        previous_threads = torch.get_num_threads()
        worker.stop.clear()
        helper.start()
        try:
            worker.run_forever(block_ms=50)
        finally:
            torch.set_num_threads(previous_threads)
        helper.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

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
