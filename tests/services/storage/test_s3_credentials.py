"""S3 credentials without static keys (INFLUENCE_S3_CREDENTIALS=chain, what the chart sets when no
keys are configured): the minio SDK's chain finds them in the environment, as it would a web
identity token or an instance role in a cluster; none found is a clear PERMISSION_DENIED at
once. Against a real S3 server (SeaweedFS) with authentication on."""

from __future__ import annotations

import os
import time
import uuid

import pytest
from minio.credentials.providers import ChainedProvider, Provider

from services.errors import InputError, PermissionDeniedError, StorageUnavailable
from services.storage import open_store
from services.storage.s3 import S3Store

KEY_VARIABLES = (
    "INFLUENCE_S3_ACCESS_KEY",
    "INFLUENCE_S3_SECRET_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MINIO_ACCESS_KEY",
    "MINIO_SECRET_KEY",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@pytest.fixture
def no_keys(monkeypatch, tmp_path):
    for name in KEY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws, no ~/.mc
    monkeypatch.setenv("INFLUENCE_S3_CREDENTIALS", "chain")


def url(server) -> str:
    return f"s3://test-{uuid.uuid4().hex[:16]}?endpoint={server.endpoint}&secure=0"


def test_the_chain_takes_credentials_from_the_environment(s3_server, no_keys, monkeypatch):
    for access, secret in (("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY")):
        monkeypatch.setenv(access, s3_server.access_key)
        monkeypatch.setenv(secret, s3_server.secret_key)
        store = open_store(url(s3_server))
        assert isinstance(store, S3Store) and store.client._provider is not None
        store.put_bytes("k", b"v")
        assert store.get_bytes("k") == b"v"
        monkeypatch.delenv(access)
        monkeypatch.delenv(secret)


def test_static_keys_win_over_the_chain(s3_server, no_keys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("INFLUENCE_S3_ACCESS_KEY", s3_server.access_key)
    monkeypatch.setenv("INFLUENCE_S3_SECRET_KEY", "wrong-secret")
    with pytest.raises(PermissionDeniedError):
        open_store(url(s3_server))


def test_an_unreachable_credentials_endpoint_is_unavailable_and_bounded(s3_server, no_keys, monkeypatch):
    """Env and files empty, so the chain asks the container-credentials endpoint, here a closed
    local port: UNAVAILABLE (retryable: a metadata endpoint comes back) naming it, within bounded
    retries, never a hang."""
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1:9/creds")
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="port=9"):
        open_store(url(s3_server))
    assert time.monotonic() - started < 30


def test_a_chain_whose_providers_all_decline_is_permission_denied(s3_server):
    """A provider that declines raises ValueError (minio's contract); all declining is a clear
    PERMISSION_DENIED at once, not a retry."""

    class Declines(Provider):
        def retrieve(self):
            raise ValueError("no credentials here")

    started = time.monotonic()
    with pytest.raises(PermissionDeniedError, match="no S3 credentials found by the chain"):
        S3Store(
            s3_server.endpoint, f"test-{uuid.uuid4().hex[:16]}", None, None, credentials=ChainedProvider([Declines()])
        )
    assert time.monotonic() - started < 5


def test_an_unknown_credentials_mode_is_bad_input(s3_server, monkeypatch):
    monkeypatch.setenv("INFLUENCE_S3_CREDENTIALS", "magic")
    with pytest.raises(InputError, match="INFLUENCE_S3_CREDENTIALS"):
        open_store(url(s3_server))
    assert "INFLUENCE_S3_CREDENTIALS" in os.environ
