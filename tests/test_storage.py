"""The artifact store's contract, identical for the local directory and a real S3 server."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from services.engine.errors import NotFoundError
from services.storage import LocalStore, StorageError, StorageUnavailable, open_store
from tests.servers.s3 import S3Server, s3_server  # noqa: F401


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "artifacts")
    server = request.getfixturevalue("s3_server")
    return open_store(server.url(f"b{uuid.uuid4().hex[:12]}"))


def test_round_trips_listing_and_deletion(store):
    big = os.urandom(20 * 2**20)
    store.put_bytes("jobs/a/covariance/00000.safetensors", big)
    store.put_bytes("jobs/a/spec.json", b"{}")
    store.put_bytes("jobs/b/spec.json", b"{}")
    assert store.get_bytes("jobs/a/covariance/00000.safetensors") == big
    assert store.list("jobs/a/") == ["jobs/a/covariance/00000.safetensors", "jobs/a/spec.json"]
    assert store.exists("jobs/b/spec.json") and not store.exists("jobs/c/spec.json")
    store.put_bytes("jobs/a/spec.json", b'{"v": 2}')  # replace
    assert store.get_bytes("jobs/a/spec.json") == b'{"v": 2}'
    assert store.delete_prefix("jobs/a/") == 2
    assert store.list("jobs/") == ["jobs/b/spec.json"]
    with pytest.raises(NotFoundError):
        store.get_bytes("jobs/a/spec.json")


def test_keys_that_escape_the_store_are_refused(store):
    for key in ("", "/etc/passwd", "a/../../x"):
        with pytest.raises(StorageError):
            store.put_bytes(key, b"x")


def test_wrong_credentials_are_a_clear_error(s3_server, monkeypatch):  # noqa: F811
    monkeypatch.setenv("INFLUENCE_S3_SECRET_KEY", "not-the-secret")
    with pytest.raises(StorageError, match="refused access"):
        open_store(f"s3://b{uuid.uuid4().hex[:8]}?endpoint={s3_server.endpoint}&secure=0")


def test_an_unreachable_store_fails_fast_and_recovers():
    server = S3Server().start()
    try:
        store = open_store(server.url("outage"), retries=1)
        store.put_bytes("k", b"v")
        server.stop()
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="unavailable after 2 attempts"):
            store.get_bytes("k")
        assert time.monotonic() - started < 10
        server.start()
        assert store.get_bytes("k") == b"v"  # nothing accepted was lost
    finally:
        server.cleanup()
