"""Assembling a gRPC server: the chosen service roles, Operations, health and reflection."""

from __future__ import annotations

import asyncio
import logging
import threading

import grpc
from google.longrunning import operations_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..client import MAX_MESSAGE_BYTES
from ..factor_svc import FactorServicer
from ..gen.influence.v1 import (
    factor_service_pb2,
    factor_service_pb2_grpc,
    gradient_service_pb2,
    gradient_service_pb2_grpc,
    query_service_pb2,
    query_service_pb2_grpc,
)
from ..gradient_svc import GradientServicer
from ..jobs.ended import EndedWatcher
from ..query_svc import QueryServicer
from ..system.runner import JobSystem
from .common import Limits
from .operations import OperationsServicer

log = logging.getLogger("influence.server")
ROLES = ("factor", "gradient", "query")


def build_server(
    system: JobSystem, watcher: EndedWatcher, roles: tuple[str, ...] = ROLES, limits: Limits | None = None
) -> grpc.aio.Server:
    """An aio server with the roles' services, Operations, health (per service) and reflection.
    `watcher` (the caller closes it after the server stopped) wakes WaitOperation calls."""
    limits = limits or Limits()
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    names = [reflection.SERVICE_NAME, health.SERVICE_NAME, "google.longrunning.Operations"]
    if "factor" in roles:
        factor_service_pb2_grpc.add_FactorServiceServicer_to_server(FactorServicer(system, limits), server)
        names.append(factor_service_pb2.DESCRIPTOR.services_by_name["FactorService"].full_name)
    if "gradient" in roles:
        gradient_service_pb2_grpc.add_GradientServiceServicer_to_server(GradientServicer(system, limits), server)
        names.append(gradient_service_pb2.DESCRIPTOR.services_by_name["GradientService"].full_name)
    if "query" in roles:
        query_service_pb2_grpc.add_QueryServiceServicer_to_server(QueryServicer(system, limits), server)
        names.append(query_service_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name)
    operations_pb2_grpc.add_OperationsServicer_to_server(OperationsServicer(system, watcher), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *names]:
        asyncio.get_event_loop().create_task(health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING))
    reflection.enable_server_reflection(names, server)
    return server


class BackgroundServer:
    """A server on its own event loop in a thread (embedded mode and tests). `port` after start."""

    def __init__(
        self,
        system: JobSystem,
        host: str = "127.0.0.1",
        port: int = 0,
        roles=ROLES,
        grace: float = 1.0,
        limits: Limits | None = None,
    ):
        self.system, self.host, self.requested_port, self.roles, self.grace = system, host, port, roles, grace
        self.limits = limits
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="grpc-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main():
            self._stop = asyncio.Event()
            watcher = EndedWatcher(self.system.operations)
            server = build_server(self.system, watcher, self.roles, self.limits)
            self.port = server.add_insecure_port(f"{self.host}:{self.requested_port}")
            await server.start()
            self._ready.set()
            await self._stop.wait()
            await server.stop(self.grace)
            watcher.close()

        self._loop.run_until_complete(main())
        self._loop.close()

    def start(self) -> BackgroundServer:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("gRPC server did not start within 30 s")
        return self

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(self.grace + 10)


async def serve_forever(system: JobSystem, host: str, port: int, roles: tuple[str, ...], grace: float = 10.0) -> None:
    """Serve until SIGTERM/SIGINT, then stop gracefully (in-flight RPCs get `grace` seconds)."""
    import signal

    watcher = EndedWatcher(system.operations)
    server = build_server(system, watcher, roles)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    log.info("serving %s on %s:%d", ",".join(roles), host, bound)
    print(f"influence: serving {','.join(roles)} on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(grace)
    watcher.close()
