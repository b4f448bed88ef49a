"""The top-level assembly: the one place that knows every service, and composes them into a
running system.

    STAGE_TABLE                   every job plan and stage, from the three services
    connect(redis_url, ...)       a JobSystem on Redis and an object store (embedded defaults)
    make_server(system, roles)    a gRPC server with the chosen services, Operations, health, reflection
    serve(system, ...)            that server until SIGTERM/SIGINT (`influence serve`)

Import direction: cli/commands/embedded/assembly -> the services (factor_svc, gradient_svc,
query_svc) -> system, rpc -> jobs, storage -> engine -> errors. Nothing below imports upward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

from google.longrunning import operations_pb2_grpc

from .factor_svc import stages as factor_stages
from .factor_svc.servicer import FactorServicer
from .gen.influence.v1 import (
    factor_service_pb2,
    factor_service_pb2_grpc,
    gradient_service_pb2,
    gradient_service_pb2_grpc,
    query_service_pb2,
    query_service_pb2_grpc,
)
from .gradient_svc import stages as gradient_stages
from .gradient_svc.servicer import GradientServicer
from .jobs.connection import EmbeddedRedis
from .jobs.connection import connect as connect_redis
from .jobs.ended import EndedWatcher
from .jobs.operations import DEFAULT_TTL_SECONDS, OperationStore
from .jobs.queue import TaskQueue
from .query_svc import stages as query_stages
from .query_svc.servicer import QueryServicer
from .rpc.auth import TokenFile
from .rpc.common import Limits
from .rpc.door import Door
from .rpc.observed import Observed
from .rpc.operations import OperationsServicer
from .rpc.server import build_server, serve_until_signalled
from .storage import open_store
from .system import metrics
from .system.plans import StageTable
from .system.runner import JobSystem

STAGE_TABLE = StageTable(
    plans=[*gradient_stages.PLANS, *factor_stages.PLANS, *query_stages.PLANS],
    stages=[*gradient_stages.STAGES, *factor_stages.STAGES, *query_stages.STAGES],
)
ROLES = ("factor", "gradient", "query")
DEFAULT_STATE_DIR = ".cache/influence-server"
DEFAULT_MAX_QUEUED_TASKS = 10_000


def job_system(store, client, *, prefix: str = "influence", lease_seconds: float = 60.0, max_deliveries: int = 3):
    """A JobSystem over a store and a Redis client, with every service's stages. Operation records
    expire INFLUENCE_OPERATION_TTL_SECONDS (default 7 days) after their operation ended; a job is
    refused (RESOURCE_EXHAUSTED) while its first stage's queue holds INFLUENCE_MAX_QUEUED_TASKS
    tasks (default 10,000; 0: no bound); a task running over INFLUENCE_MAX_TASK_SECONDS (default 0:
    no limit) is taken to hang and reclaimed by another worker a lease later; a submission that has
    not made its operation INFLUENCE_SUBMIT_GRACE_SECONDS (default 900) after it began is abandoned
    and its inputs swept."""
    ttl = int(os.environ.get("INFLUENCE_OPERATION_TTL_SECONDS", DEFAULT_TTL_SECONDS))
    return JobSystem(
        store,
        OperationStore(client, prefix=prefix, ttl_seconds=ttl),
        TaskQueue(
            client,
            prefix=prefix,
            lease_seconds=lease_seconds,
            max_deliveries=max_deliveries,
            max_task_seconds=float(os.environ.get("INFLUENCE_MAX_TASK_SECONDS", "0")),
        ),
        STAGE_TABLE,
        max_queued_tasks=int(os.environ.get("INFLUENCE_MAX_QUEUED_TASKS", DEFAULT_MAX_QUEUED_TASKS)),
        submit_grace_seconds=float(os.environ.get("INFLUENCE_SUBMIT_GRACE_SECONDS", "900")),
    )


@contextlib.contextmanager
def connect(
    redis_url: str = "",
    store_url: str = "",
    state_dir: str = "",
    lease_seconds: float = 60.0,
    max_deliveries: int = 3,
) -> Iterator[JobSystem]:
    """A JobSystem. Without a Redis URL an embedded Redis is started under `state_dir`; without a
    store URL, artifacts go to `state_dir`/artifacts (the single-machine defaults).
    INFLUENCE_QUEUE_PREFIX namespaces the Redis keys (several systems can share one Redis)."""
    state = Path(state_dir or os.environ.get("INFLUENCE_STATE_DIR") or DEFAULT_STATE_DIR)
    redis_url = redis_url or os.environ.get("INFLUENCE_REDIS_URL", "")
    store_url = store_url or os.environ.get("INFLUENCE_STORE_URL", "") or str(state / "artifacts")
    embedded = None
    try:
        if redis_url:
            client = connect_redis(redis_url)
        else:
            embedded = EmbeddedRedis(state / "redis")
            client = embedded.client()
        yield job_system(
            open_store(store_url),
            client,
            prefix=os.environ.get("INFLUENCE_QUEUE_PREFIX", "influence"),
            lease_seconds=lease_seconds,
            max_deliveries=max_deliveries,
        )
    finally:
        if embedded is not None:
            embedded.stop()


def make_server(
    system: JobSystem, roles: tuple[str, ...] = ROLES, limits: Limits | None = None, tokens: TokenFile | None = None
):
    """(server, close): an aio server with the roles' services and Operations; `close()` after
    it stopped releases the operation watcher. Call on the event loop that will serve. Every call
    passes the Door (rpc/door.py) under `limits`; with `tokens`, every call but health and reflection
    needs a token, and runs as its tenant."""
    limits = limits or Limits()
    if tokens is not None:  # tenants: none may name the server's own files
        limits = dataclasses.replace(limits, server_paths=False)
    watcher = EndedWatcher(system.operations)
    registrations = []
    if "factor" in roles:
        registrations.append(
            (
                factor_service_pb2.DESCRIPTOR.services_by_name["FactorService"].full_name,
                lambda server: factor_service_pb2_grpc.add_FactorServiceServicer_to_server(
                    FactorServicer(system, limits), server
                ),
            )
        )
    if "gradient" in roles:
        registrations.append(
            (
                gradient_service_pb2.DESCRIPTOR.services_by_name["GradientService"].full_name,
                lambda server: gradient_service_pb2_grpc.add_GradientServiceServicer_to_server(
                    GradientServicer(system, limits), server
                ),
            )
        )
    if "query" in roles:
        registrations.append(
            (
                query_service_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name,
                lambda server: query_service_pb2_grpc.add_QueryServiceServicer_to_server(
                    QueryServicer(system, limits), server
                ),
            )
        )
    registrations.append(
        (
            "google.longrunning.Operations",
            lambda server: operations_pb2_grpc.add_OperationsServicer_to_server(
                OperationsServicer(system.operations, watcher, system.table.operation_kinds), server
            ),
        )
    )
    server, stop_probe = build_server(
        registrations,
        probe=system.unhealthy,
        interceptors=(Observed(metrics.observe_rpc), Door(tokens, limits)),
        max_receive_bytes=limits.max_message_bytes,
    )

    def close() -> None:
        stop_probe()
        watcher.close()

    return server, close


async def serve(
    system: JobSystem,
    host: str,
    port: int,
    roles: tuple[str, ...] = ROLES,
    *,
    limits: Limits | None = None,
    tokens: TokenFile | None = None,
    credentials=None,
) -> None:
    """`influence serve`: the roles' services until SIGTERM/SIGINT (TLS with `credentials`)."""
    await serve_until_signalled(
        lambda: make_server(system, roles, limits, tokens), host, port, ",".join(roles), credentials=credentials
    )
