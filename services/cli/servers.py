"""`influence serve` (the gRPC services, with in-process workers) and `influence worker` (tasks
from the Redis queues): their flags, each also from its environment variable, and how they run."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import threading
from pathlib import Path

from ..errors import InputError
from ..wire import REQUEST_LIMITS
from .flags import Flag, add, from_env

CONNECTION = (
    Flag("--redis-url", default="", help="redis://host:port/db (env INFLUENCE_REDIS_URL; default: embedded)"),
    Flag(
        "--store-url",
        default="",
        help="s3://bucket?endpoint=host:port&secure=0 or a directory (env INFLUENCE_STORE_URL; default: --state-dir)",
    ),
    Flag("--state-dir", default="", help="embedded Redis and artifacts (default .cache/influence-server)"),
    Flag(
        "--lease-seconds",
        type=float,
        default=from_env("INFLUENCE_LEASE_SECONDS", "60"),
        help="task lease, renewed while a task runs (env INFLUENCE_LEASE_SECONDS)",
    ),
    Flag(
        "--max-deliveries",
        type=int,
        default=from_env("INFLUENCE_MAX_DELIVERIES", "3"),
        help="deliveries before a task is dead-lettered (env INFLUENCE_MAX_DELIVERIES)",
    ),
    Flag("--log-level", default=from_env("INFLUENCE_LOG_LEVEL", "info")),
    Flag(
        "--log-format",
        default=from_env("INFLUENCE_LOG_FORMAT", "text"),
        help="text or json: one JSON object per line (env INFLUENCE_LOG_FORMAT)",
    ),
    Flag(
        "--metrics-port",
        type=int,
        default=from_env("INFLUENCE_METRICS_PORT", "0"),
        help="serve Prometheus metrics at http://HOST:PORT/metrics (env INFLUENCE_METRICS_PORT; 0: off)",
    ),
    Flag(
        "--metrics-host",
        default=from_env("INFLUENCE_METRICS_HOST", ""),
        help="the address the metrics port listens on (env INFLUENCE_METRICS_HOST; default: serve's --host, "
        "a worker's 127.0.0.1)",
    ),
    Flag(
        "--model-roots",
        default=from_env("INFLUENCE_MODEL_ROOTS", ""),
        metavar="DIR[:DIR]",
        help="load models only from under these directories (env INFLUENCE_MODEL_ROOTS; "
        "default: any directory the process can read)",
    ),
    Flag(
        "--allow-remote-code",
        action="store_true",
        default=lambda: os.environ.get("INFLUENCE_ALLOW_REMOTE_CODE", "") == "1",
        help="let model directories run their own Python code (trust_remote_code; default: never)",
    ),
    Flag(
        "--cache-gib",
        type=float,
        default=None,
        help="memory each worker may keep of covariance passes for their correction passes "
        "(default: 1/4 of the memory limit, the container's if any)",
    ),
    Flag(
        "--coalesce-ms",
        type=float,
        default=from_env("INFLUENCE_COALESCE_MS", "200"),
        help="a worker taking an index_score task also takes the tenant's tasks for the same index shard "
        "enqueued within this many ms of it, and scans the blocks once for all (env INFLUENCE_COALESCE_MS; "
        "0: every task alone)",
    ),
    Flag(
        "--coalesce-limit",
        type=int,
        default=from_env("INFLUENCE_COALESCE_LIMIT", "16"),
        help="at most this many tasks in one coalesced scan (env INFLUENCE_COALESCE_LIMIT)",
    ),
)
SERVER_SECURITY = (
    Flag(
        "--auth-tokens",
        default=from_env("INFLUENCE_AUTH_TOKENS", ""),
        metavar="FILE",
        help="require a token on every call: 'TOKEN TENANT' per line, re-read when it changes "
        "(env INFLUENCE_AUTH_TOKENS; default: no authentication, one tenant)",
    ),
    Flag(
        "--tls-cert",
        default=from_env("INFLUENCE_SERVE_TLS_CERT", ""),
        help="serve TLS with this PEM certificate (env INFLUENCE_SERVE_TLS_CERT)",
    ),
    Flag(
        "--tls-key",
        default=from_env("INFLUENCE_SERVE_TLS_KEY", ""),
        help="and this PEM key (env INFLUENCE_SERVE_TLS_KEY)",
    ),
    Flag(
        "--tls-client-ca",
        default=from_env("INFLUENCE_SERVE_TLS_CLIENT_CA", ""),
        help="mutual TLS: clients must present a certificate this CA signed (env INFLUENCE_SERVE_TLS_CLIENT_CA)",
    ),
    Flag(
        "--max-queued-operations",
        type=int,
        default=from_env("INFLUENCE_MAX_QUEUED_OPERATIONS", "0"),
        help="per tenant: at most this many queued or running operations (0: no quota)",
    ),
)
# --max-upload-bytes, --max-queries, ...: what one request may ask (wire.REQUEST_LIMITS)
REQUEST_LIMIT_FLAGS = tuple(
    Flag(
        limit.flag,
        dest=name,
        type=int,
        default=from_env(limit.env, str(limit.default)),
        metavar="N",
        help=f"refuse a request over N {limit.counts} with RESOURCE_EXHAUSTED "
        f"(env {limit.env}; default {limit.default}; 0: no limit)",
    )
    for name, limit in REQUEST_LIMITS.items()
)


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    add(
        parser,
        Flag("--role", default="factor,gradient,query", help="comma-separated: factor, gradient, query"),
        Flag(
            "--host",
            default=from_env("INFLUENCE_HOST", "127.0.0.1"),
            help="the address to listen on (env INFLUENCE_HOST; default 127.0.0.1: this machine only; "
            "0.0.0.0 for every interface, with --auth-tokens and TLS)",
        ),
        Flag("--port", type=int, default=from_env("INFLUENCE_PORT", "50051")),
        Flag("--workers", type=int, default=1, help="in-process workers (0: only separate `influence worker`s)"),
        *CONNECTION,
        *SERVER_SECURITY,
        *REQUEST_LIMIT_FLAGS,
    )


def add_worker_flags(parser: argparse.ArgumentParser) -> None:
    add(
        parser,
        Flag("--kinds", default="", help="comma-separated task kinds (default: all)"),
        Flag("--name", default="", help="consumer name (default: worker-PID)"),
        Flag(
            "--device",
            default=from_env("INFLUENCE_DEVICE", ""),
            choices=["", "cpu", "cuda"],
            metavar="cpu|cuda",
            help="run models on cpu or cuda; a cpu worker leaves cuda tasks to others "
            "(env INFLUENCE_DEVICE; default: cuda if available, else cpu)",
        ),
        Flag(
            "--drain-seconds",
            type=float,
            default=from_env("INFLUENCE_DRAIN_SECONDS", "0"),
            help="on SIGTERM take no further task and let the running one finish for this long, then hand "
            "its lease back and exit (env INFLUENCE_DRAIN_SECONDS; 0: finish however long it takes). "
            "Set below the pod's termination grace period",
        ),
        Flag(
            "--until-done",
            default="",
            metavar="OPERATION",
            help="exit (0) once this operation has ended: a worker of a launched Job (default: run until stopped)",
        ),
        *CONNECTION,
    )


def _connect(args):
    from ..assembly import connect
    from ..engine.model_io import ModelAccess, set_model_access

    # the operator's model policy holds for this whole process: servicers and workers alike
    set_model_access(ModelAccess.parse(args.model_roots, args.allow_remote_code))

    return connect(args.redis_url, args.store_url, args.state_dir, args.lease_seconds, args.max_deliveries)


def _worker_context(args, system):
    from ..engine.resources import gib_to_bytes
    from ..system.context import WorkerContext

    return WorkerContext(system.store, cache_bytes=gib_to_bytes(args.cache_gib), device=getattr(args, "device", ""))


def _coalescing(args) -> dict:
    """The Worker's coalescing settings from --coalesce-ms / --coalesce-limit (InputError when negative)."""
    if args.coalesce_ms < 0 or args.coalesce_limit < 1:
        raise InputError(
            f"--coalesce-ms must be >= 0 and --coalesce-limit >= 1, got {args.coalesce_ms:g} and {args.coalesce_limit}"
        )
    return {"coalesce_seconds": args.coalesce_ms / 1000, "coalesce_limit": args.coalesce_limit}


@contextlib.contextmanager
def _metrics(args, system, shared_state: bool, health=None):
    """Prometheus metrics on --metrics-port while the block runs (nothing when it is 0); with
    `health`, /healthz too (system/metrics.py)."""
    if not args.metrics_port:
        yield
        return
    from ..system.metrics import MetricsServer

    host = args.metrics_host or getattr(args, "host", "127.0.0.1")  # serve's --host; a worker's loopback
    server = MetricsServer(args.metrics_port, host, system=system if shared_state else None, health=health)
    try:
        yield
    finally:
        server.close()


def run_serve(args) -> int:
    from ..assembly import ROLES, serve
    from ..logs import configure_logging
    from ..rpc.auth import token_file_from_env
    from ..rpc.common import Limits
    from ..rpc.server import server_credentials, warn_if_exposed
    from ..system.runner import Worker, threads_per_worker

    tokens = token_file_from_env(args.auth_tokens)  # a bad file fails here, before anything starts
    credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    if args.max_queued_operations < 0:
        raise InputError(f"--max-queued-operations must be >= 0, got {args.max_queued_operations}")
    limits = Limits(**{name: getattr(args, name) for name in REQUEST_LIMITS})
    coalescing = _coalescing(args)
    roles = tuple(role.strip() for role in args.role.split(",") if role.strip())
    unknown = set(roles) - set(ROLES)
    if unknown or not roles:
        raise InputError(f"--role takes factor, gradient and/or query, got {args.role!r}")
    configure_logging(args.log_level, args.log_format)  # after every check: a refused serve changes nothing
    warn_if_exposed(args.host, authenticated=tokens is not None, encrypted=credentials is not None)
    with _connect(args) as system, _metrics(args, system, shared_state=True, health=system.unhealthy):
        system.max_queued_operations = args.max_queued_operations
        cores_each = threads_per_worker(args.workers)
        workers = [
            Worker(
                system,
                consumer=f"serve-{n}",
                context=_worker_context(args, system),
                torch_threads=cores_each,
                **coalescing,
            )
            for n in range(args.workers)
        ]
        share_the_gpu(workers)
        threads = [threading.Thread(target=w.run_forever, daemon=True) for w in workers]
        for thread in threads:
            thread.start()
        try:
            asyncio.run(
                serve(system, args.host, args.port, roles, limits=limits, tokens=tokens, credentials=credentials)
            )
        finally:
            for worker in workers:
                worker.stop.set()
            for thread in threads:
                thread.join(60)
    return 0


def share_the_gpu(workers) -> None:
    """In-process workers on a GPU load a model each on it (threads never share a model: a pass's
    capture hooks and frozen parameters are its own), so the servicers of this process plan each
    worker with its share of the GPU (INFLUENCE_WORKERS_PER_GPU, engine/budget.py): a model whose
    copies do not all fit is refused at submission (RESOURCE_EXHAUSTED, naming --workers)."""
    import logging

    on_gpu = sum(worker.context.device == "cuda" for worker in workers)
    if on_gpu > 1:
        os.environ["INFLUENCE_WORKERS_PER_GPU"] = str(on_gpu)
        logging.getLogger("influence.serve").warning(
            "%d workers share one GPU: each loads its own model and plans with 1/%d of the GPU's memory "
            "(jobs whose model does not fit that are refused; serve --workers 1 for the whole GPU)",
            on_gpu,
            on_gpu,
        )


def run_worker(args) -> int:
    from ..assembly import STAGE_TABLE
    from ..logs import configure_logging
    from ..system.runner import Worker

    coalescing = _coalescing(args)
    configure_logging(args.log_level, args.log_format)
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()] if args.kinds else STAGE_TABLE.kinds
    STAGE_TABLE.check_kinds(kinds)
    with _connect(args) as system:
        worker = Worker(
            system,
            kinds=kinds,
            consumer=args.name or f"worker-{Path('/proc/self').resolve().name}",
            context=_worker_context(args, system),
            **coalescing,
        )
        with _metrics(args, system, shared_state=False, health=lambda: worker.not_serving):
            signal.signal(signal.SIGTERM, lambda *_: worker.drain(args.drain_seconds, then=_exit_now))
            if args.until_done:
                stop_when_ended(system, args.until_done.removeprefix("operations/"), worker.stop)
            if worker.not_serving:
                print(f"influence: worker {worker.consumer} NOT_SERVING: {worker.not_serving}", flush=True)
            else:
                print(f"influence: worker {worker.consumer} taking {','.join(kinds)}", flush=True)
            worker.run_forever()
    return 0


def _exit_now() -> None:
    """A drained worker's exit, from its drain thread while the main thread still runs the task it
    handed back: the task's result would be discarded anyway (another worker has it)."""
    import logging

    logging.shutdown()
    os._exit(0)


def stop_when_ended(system, operation: str, stop, every: float = 2.0) -> None:
    """Set `stop` once `operation` has ended (or does not exist): a launched worker's exit."""
    from ..jobs.operations import TERMINAL

    def watch() -> None:
        while not stop.wait(every):
            try:
                record = system.operations.get(operation)
            except Exception:  # Redis away for a moment: ask again
                continue
            if record is None or record["state"] in TERMINAL:
                stop.set()

    threading.Thread(target=watch, name="until-done", daemon=True).start()
