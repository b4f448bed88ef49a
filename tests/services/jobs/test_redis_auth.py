"""Redis with a password, as the chart runs its in-chart Redis (--requirepass from a Secret) and
hands the URL to every pod (redis://:PASSWORD@host:6379/0): the system connects with it, a
wrong password is a clear UNAVAILABLE, and no message ever shows the password."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import redis as redis_client

from services.assembly import connect
from services.errors import QueueUnavailable
from services.jobs.connection import without_password
from tests.support.servers.ports import free_ports, wait_until


@pytest.fixture
def redis_with_password():
    password = secrets.token_urlsafe(24)
    port = free_ports(1)[0]
    directory = Path(tempfile.mkdtemp(prefix="test-redis-auth-"))
    process = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(directory),
            "--requirepass",
            password,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def ready() -> bool:
        try:
            return redis_client.Redis(port=port, password=password, socket_connect_timeout=0.2).ping()
        except redis_client.RedisError:
            return False

    try:
        wait_until(ready, 10, f"redis-server on port {port}", directory / "none.log")
        yield port, password
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.needs_servers
def test_the_system_connects_with_the_password_and_never_shows_it(redis_with_password, tmp_path):
    port, password = redis_with_password
    with connect(f"redis://:{password}@127.0.0.1:{port}/0", str(tmp_path / "store")) as system:
        system.queue.enqueue("register", b"payload")
        assert system.queue.depth("register") == 1
    for url in (f"redis://127.0.0.1:{port}/0", f"redis://:wrong-{password}@127.0.0.1:{port}/0"):
        with pytest.raises(QueueUnavailable) as caught, connect(url, str(tmp_path / "store")):
            pass
        assert password not in str(caught.value)
    closed = free_ports(1)[0]
    with pytest.raises(QueueUnavailable) as caught, connect(f"redis://:{password}@127.0.0.1:{closed}/0", str(tmp_path)):
        pass
    assert password not in str(caught.value) and "redis://:***@127.0.0.1" in str(caught.value)


def test_without_password_masks_only_the_password():
    assert without_password("redis://:s3cr3t@redis:6379/0") == "redis://:***@redis:6379/0"
    assert without_password("rediss://user:s3cr3t@redis:6380/2") == "rediss://user:***@redis:6380/2"
    assert without_password("redis://redis:6379/0") == "redis://redis:6379/0"
