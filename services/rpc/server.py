"""Serving gRPC: an aio server with the given servicers, health (per service) and reflection, in
the foreground until a signal, or on a background thread (embedded mode and tests). Which
servicers a server has is the caller's choice (services/assembly.py)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..wire import MAX_MESSAGE_BYTES

log = logging.getLogger("influence.server")

# add(server) registers one servicer; name is its full service name (for health and reflection)
Registration = tuple[str, Callable[[grpc.aio.Server], None]]

# The health service name a liveness probe asks for: SERVING while the process answers at all,
# whatever its dependencies (Redis or the store away makes the others NOT_SERVING: readiness). A
# liveness probe on dependencies would restart every API pod during a Redis outage.
LIVENESS = "liveness"

# How many bytes of one call the server reads ahead of its handler (the HTTP/2 stream window). Fixed:
# gRPC's BDP probing would grow it to tens of MiB per stream, and a flood of large requests (even
# refused ones, until their refusal reaches the caller) would then sit in the server's buffers
# (bench/abuse.py: +330 MiB, against +14 MiB fixed). 4 MiB in flight keeps an upload over a
# 20 ms link at ~200 MB/s.
RECEIVE_WINDOW_BYTES = 4 * 2**20


def build_server(
    registrations: list[Registration],
    probe: Callable[[], str | None] | None = None,
    probe_seconds: float = 5.0,
    interceptors: tuple = (),
    max_receive_bytes: int = MAX_MESSAGE_BYTES,
) -> tuple[grpc.aio.Server, Callable[[], None]]:
    """(server, stop_probe): an aio server with the registered services, health (overall and per
    service, and LIVENESS: always SERVING) and reflection. Health is SERVING, or, with a `probe`
    (None when healthy, else the reason: Redis or the store unreachable), follows the probe, run on a thread every
    `probe_seconds`; `stop_probe()` ends that loop (call it when the server stops).
    `interceptors`: e.g. rpc/door.py's Door. A message larger than `max_receive_bytes` (0: no limit)
    is refused with RESOURCE_EXHAUSTED by gRPC from its length prefix, before its body is received."""
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", max_receive_bytes or -1),
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", RECEIVE_WINDOW_BYTES),
        ],
    )
    names = [reflection.SERVICE_NAME, health.SERVICE_NAME]
    for name, add in registrations:
        add(server)
        names.append(name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(names, server)
    loop = asyncio.get_event_loop()
    follower = loop.create_task(_keep_health(health_servicer, ["", *names], probe, probe_seconds))
    return server, lambda: loop.call_soon_threadsafe(follower.cancel)


async def _keep_health(health_servicer, names: list[str], probe: Callable[[], str | None] | None, seconds: float):
    """SERVING for every name, then (with a probe) whatever the probe says, every `seconds`;
    LIVENESS is SERVING throughout."""
    await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    for name in names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    serving = True
    while probe is not None:
        reason = await asyncio.to_thread(probe)
        if (reason is None) != serving:
            serving = reason is None
            if serving:
                log.info("dependencies reachable again: SERVING")
            else:
                log.warning("NOT_SERVING: %s", reason)
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in names:
                await health_servicer.set(name, status)
        await asyncio.sleep(seconds)


class BackgroundServer:
    """A server on its own event loop in a thread. `make()` (called on that loop) returns the
    server and a `close()` to call after it stopped. `port` after start."""

    def __init__(self, make: Callable, host: str = "127.0.0.1", port: int = 0, grace: float = 1.0):
        self.make, self.host, self.requested_port, self.grace = make, host, port, grace
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="grpc-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main():
            self._stop = asyncio.Event()
            server, close = self.make()
            self.port = server.add_insecure_port(f"{self.host}:{self.requested_port}")
            await server.start()
            self._ready.set()
            await self._stop.wait()
            await server.stop(self.grace)
            close()

        self._loop.run_until_complete(main())
        leftovers = asyncio.all_tasks(self._loop)  # e.g. a health probe between two checks
        for task in leftovers:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
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


def server_credentials(tls_cert: str, tls_key: str, tls_client_ca: str = "") -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files (None without a certificate: plaintext). With a client CA,
    mutual TLS: a client must present a certificate that CA signed."""
    from ..errors import InputError

    if not tls_cert and not tls_key:
        if tls_client_ca:
            raise InputError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    if not (tls_cert and tls_key):
        raise InputError("give both --tls-cert and --tls-key")

    def read(path: str, flag: str) -> bytes:
        try:
            return open(path, "rb").read()
        except OSError as error:
            raise InputError(f"cannot read {flag} {path}: {error.strerror}") from None

    return grpc.ssl_server_credentials(
        [(read(tls_key, "--tls-key"), read(tls_cert, "--tls-cert"))],
        root_certificates=read(tls_client_ca, "--tls-client-ca") if tls_client_ca else None,
        require_client_auth=bool(tls_client_ca),
    )


def loopback(host: str) -> bool:
    """Whether `host` (an address to listen on) reaches this machine only."""
    host = host.strip("[]")
    if host == "localhost" or host.startswith("unix:"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve to anything
        return False


def warn_if_exposed(host: str, *, authenticated: bool, encrypted: bool) -> None:
    """Log a warning when serving beyond this machine without tokens or without TLS."""
    if loopback(host) or (authenticated and encrypted):
        return
    missing = " and ".join(
        what
        for what, present in (
            ("without tokens (--auth-tokens): anyone who reaches it is the default tenant", authenticated),
            ("without TLS (--tls-cert, --tls-key): calls and tokens travel in plaintext", encrypted),
        )
        if not present
    )
    log.warning("listening on %s, beyond this machine, %s", host, missing)


def bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    """Listen on `address` (host:port, or unix:PATH), with TLS when given credentials; the port."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


async def serve_until_signalled(
    make: Callable,
    host: str,
    port: int,
    label: str,
    grace: float = 10.0,
    credentials: grpc.ServerCredentials | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then stop gracefully (in-flight RPCs get `grace` seconds)."""
    import signal

    server, close = make()
    bound = bind(server, f"{host}:{port}", credentials)
    await server.start()
    scheme = "TLS" if credentials is not None else "plaintext"
    log.info("serving %s on %s:%d (%s)", label, host, bound, scheme)
    print(f"influence: serving {label} on {host}:{bound} ({scheme})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(grace)
    close()
