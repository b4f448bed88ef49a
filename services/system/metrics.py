"""Prometheus metrics, served over HTTP at /metrics (`influence serve|worker --metrics-port`).

What this process did:
    influence_rpc_seconds{method, code}          histogram: each gRPC call it answered (rate, errors,
                                                 latency per method: rpc/observed.py)
    influence_build_info{version, python, torch} 1: which build runs
    process_*, python_*                          CPU, memory, open files, start time; the interpreter
    influence_task_seconds{kind, outcome}        histogram: wall time of each task it ran
                                                 (outcome: succeeded, failed, retry, cancelled,
                                                 dead_lettered, skipped)
    influence_worker_serving{consumer, device}   1 while a worker takes tasks, 0 when it cannot
                                                 (asked for cuda without a usable GPU: NOT_SERVING;
                                                 `influence worker`'s /healthz then answers 503)
    influence_store_bytes_total{backend, direction}  bytes read from / written to the artifact store
The shared state, read from Redis when scraped (API servers export it; workers do not, so a sum
over pods does not multiply it — take max() over the servers):
    influence_queue_tasks{kind, state}           waiting / running tasks per stream
    influence_queue_lag_seconds{kind}            age of the oldest waiting task (0 when none waits)
    influence_dead_letters{kind}                 tasks dead-lettered so far
    influence_operations{state}                  operations by state (the newest 10,000)
    influence_up{dependency}                     1 if Redis / the store answered this scrape
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from ..storage import traffic

REGISTRY = CollectorRegistry(auto_describe=True)
TASK_SECONDS = Histogram(
    "influence_task_seconds",
    "Wall time of the tasks this process ran, by kind and outcome.",
    ["kind", "outcome"],
    registry=REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200),
)

RPC_SECONDS = Histogram(
    "influence_rpc_seconds",
    "Duration of the gRPC calls this server answered, by method and status code.",
    ["method", "code"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

BUILD_INFO = Gauge(
    "influence_build_info",
    "Always 1; the labels say which build runs: the package version, Python and torch.",
    ["version", "python", "torch"],
    registry=REGISTRY,
)

WORKER_SERVING = Gauge(
    "influence_worker_serving",
    "1 while a worker takes tasks; 0 when it cannot (asked for cuda without a usable GPU).",
    ["consumer", "device"],
    registry=REGISTRY,
)


class StoreTraffic(Collector):
    def collect(self):
        family = CounterMetricFamily(
            "influence_store_bytes",
            "Bytes this process read from or wrote to the artifact store.",
            labels=["backend", "direction"],
        )
        for (backend, direction), size in sorted(traffic.snapshot().items()):
            family.add_metric([backend, direction], size)
        yield family


REGISTRY.register(StoreTraffic())
# the process: CPU seconds, resident memory, open files, start time (process_*), and Python's own
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)


def observe_rpc(method: str, code: str, seconds: float) -> None:
    """One answered call (rpc/observed.py's callback)."""
    RPC_SECONDS.labels(method, code).observe(seconds)


def record_build() -> None:
    """Set influence_build_info once per process (torch's version read from its metadata: no import)."""
    import platform
    from importlib import metadata

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "unknown"

    BUILD_INFO.labels(version("influence-services"), platform.python_version(), version("torch")).set(1)


class SystemState(Collector):
    """Queue depth and lag per task kind, dead letters, operations by state: read at scrape time."""

    def __init__(self, system):
        self.system = system

    def collect(self):
        up = GaugeMetricFamily("influence_up", "1 if the dependency answered this scrape.", labels=["dependency"])
        tasks = GaugeMetricFamily("influence_queue_tasks", "Tasks per stream and state.", labels=["kind", "state"])
        lag = GaugeMetricFamily(
            "influence_queue_lag_seconds", "Age of the oldest waiting task (0 when none waits).", labels=["kind"]
        )
        dead = GaugeMetricFamily("influence_dead_letters", "Tasks dead-lettered so far.", labels=["kind"])
        operations = GaugeMetricFamily(
            "influence_operations", "Operations by state (the newest 10,000).", labels=["state"]
        )
        try:
            for kind in self.system.table.kinds:
                stats = self.system.queue.stats(kind)
                tasks.add_metric([kind, "waiting"], stats.waiting)
                tasks.add_metric([kind, "running"], stats.running)
                lag.add_metric([kind], stats.oldest_waiting_seconds)
                dead.add_metric([kind], stats.dead_letters)
            for state, count in self.system.operations.count_states().items():
                operations.add_metric([state], count)
            up.add_metric(["redis"], 1)
        except Exception:  # Redis away: report it down, keep the endpoint answering
            up.add_metric(["redis"], 0)
            yield up
            return
        try:
            self.system.store.exists("health-probe")
            up.add_metric(["store"], 1)
        except Exception:
            up.add_metric(["store"], 0)
        yield from (up, tasks, lag, dead, operations)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:
        """Scrapes every few seconds are not worth a log line each."""


class MetricsServer:
    """/metrics on `port` (0: a free one, see `.port`) until `close()`; with a system, its
    shared state too. With `health` (None when serving, else why not), GET /healthz answers 200
    "SERVING" or 503 "NOT_SERVING: why" (readiness: a worker's, which serves no gRPC health, and a
    TLS server's, whose gRPC health the kubelet cannot ask); GET /livez answers 200 while the process
    does (liveness)."""

    def __init__(self, port: int, host: str = "127.0.0.1", system=None, health: Callable[[], str | None] | None = None):
        record_build()
        self._state = SystemState(system) if system is not None else None
        if self._state is not None:
            REGISTRY.register(self._state)
        metrics_app = make_wsgi_app(REGISTRY)

        def app(environ, start_response):
            if environ.get("PATH_INFO") == "/livez":  # the process answers: a liveness probe's question
                start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
                return [b"alive\n"]
            if environ.get("PATH_INFO") != "/healthz" or health is None:
                return metrics_app(environ, start_response)
            problem = health()
            status = "200 OK" if problem is None else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [("SERVING\n" if problem is None else f"NOT_SERVING: {problem}\n").encode()]

        self._server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_Quiet)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        self.port = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        if self._state is not None:
            REGISTRY.unregister(self._state)
