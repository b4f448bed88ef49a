"""The artifact store's contract, run against both backends: LocalStore in a temporary directory
and S3Store against a real SeaweedFS (tests/support/servers/s3.py). Then S3-only failure modes: wrong
credentials, a server that stops, an endpoint that answers 5xx."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import threading
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as safetensors_load

from services.errors import (
    InputError,
    IntegrityError,
    NotFoundError,
    PermissionDeniedError,
    StorageError,
    StorageUnavailable,
    UnsupportedFormat,
)
from services.storage import (
    MANIFEST,
    ArtifactWriter,
    LocalStore,
    PrefixedStore,
    RetryPolicy,
    S3Store,
    delete_artifact,
    get_tensors,
    is_published,
    open_artifact,
    open_store,
    put_tensors,
)
from tests.support.servers.s3 import S3Server

FAST_RETRY = RetryPolicy(attempts=3, initial_delay=0.05, max_delay=0.2)
MiB = 1 << 20


def new_bucket() -> str:
    return f"test-{uuid.uuid4().hex[:16]}"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.needs_servers), "prefixed"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    if request.param == "prefixed":  # a tenant's part of a store, beside another tenant's object
        base = LocalStore(tmp_path / "store")
        base.put_bytes("tenants/other/datasets/d/x", b"not yours")
        base.put_bytes("tenants/t1x", b"a sibling that only looks like the prefix")
        return PrefixedStore(base, "tenants/t1")
    server = request.getfixturevalue("s3_server")
    return S3Store(server.endpoint, new_bucket(), server.access_key, server.secret_key, retry=FAST_RETRY)


def random_file(path: Path, size: int) -> str:
    """Write `size` random bytes to `path` in 1 MiB pieces; returns their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        for start in range(0, size, MiB):
            piece = os.urandom(min(MiB, size - start))
            digest.update(piece)
            handle.write(piece)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------
# Objects


def test_bytes_round_trip_replace_stat_and_missing_keys(store):
    store.put_bytes("jobs/a/spec.json", b'{"v": 1}')
    store.put_bytes("jobs/a/empty", b"")
    assert store.get_bytes("jobs/a/spec.json") == b'{"v": 1}'
    assert store.get_bytes("jobs/a/empty") == b""
    store.put_bytes("jobs/a/spec.json", b'{"v": 22}')  # replace
    assert store.get_bytes("jobs/a/spec.json") == b'{"v": 22}'
    assert store.stat("jobs/a/spec.json").size == 9 == store.size("jobs/a/spec.json")
    assert store.exists("jobs/a/spec.json")
    assert not store.exists("jobs/a/other") and not store.exists("jobs/a") and not store.exists("jobs")
    for missing in ("jobs/a/other", "jobs/a", "nothing/here"):
        with pytest.raises(NotFoundError, match="no object"):
            store.get_bytes(missing)
        with pytest.raises(NotFoundError):  # what the servicers catch and map to NOT_FOUND
            store.stat(missing)


def test_a_reader_never_sees_a_partial_write(store):
    key = "jobs/j/partial.bin"
    store.put_bytes(key, b"a" * MiB)
    seen, stop = [], threading.Event()

    def read_continuously():
        while not stop.is_set():
            data = store.get_bytes(key)
            seen.append((len(data), len(set(data))))

    reader = threading.Thread(target=read_continuously)
    reader.start()
    try:
        for fill in b"bcdefgh":
            store.put_bytes(key, bytes([fill]) * MiB)
    finally:
        stop.set()
        reader.join()
    assert seen and set(seen) == {(MiB, 1)}  # always one whole value, never a mix or a short read
    if isinstance(store, LocalStore):
        assert [p.name for p in store.root.rglob(".*")] == []  # no temporary file left behind


def test_large_files_stream_both_ways(store, tmp_path):
    size = 20 * MiB + 12345  # several multipart parts on S3, not a multiple of any chunk size
    source = tmp_path / "source.bin"
    digest = random_file(source, size)

    tracemalloc.start()
    try:
        store.put_file("blocks/00000.bin", source)
        _, upload_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        target = store.get_file("blocks/00000.bin", tmp_path / "out" / "copy.bin")
        _, download_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert target == tmp_path / "out" / "copy.bin" and sha256_of(target) == digest
    assert store.size("blocks/00000.bin") == size
    # Streaming: memory is bounded by a part/chunk, not the file (S3 holds at most two 5 MiB parts).
    assert upload_peak < 0.75 * size and download_peak < 0.25 * size, (upload_peak, download_peak)

    with pytest.raises(NotFoundError):
        store.get_file("blocks/missing.bin", tmp_path / "out" / "missing.bin")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["copy.bin"]  # no partial file left
    with pytest.raises(NotFoundError, match="no such file"):
        store.put_file("blocks/x", tmp_path / "does-not-exist")


def test_list_is_recursive_sorted_and_a_plain_prefix_match(store):
    keys = ["jobs/b/spec.json", "jobs/a/covariance/00001.st", "jobs/ab/spec.json", "jobs/a/covariance/00000.st", "top"]
    for key in keys:
        store.put_bytes(key, key.encode())
    assert store.list() == sorted(keys) == store.list("")
    assert store.list("jobs/a/") == ["jobs/a/covariance/00000.st", "jobs/a/covariance/00001.st"]
    assert store.list("jobs/a") == ["jobs/a/covariance/00000.st", "jobs/a/covariance/00001.st", "jobs/ab/spec.json"]
    assert store.list("jobs/a/covariance/00001") == ["jobs/a/covariance/00001.st"]
    assert store.list("to") == ["top"]
    assert store.list("nothing/") == [] and store.list("jobs/c") == []


def test_delete_and_delete_prefix(store):
    for key in ("factors/f1/a", "factors/f1/sub/b", "factors/f10/a", "factors/f2/a"):
        store.put_bytes(key, b"x")
    store.delete("factors/f2/a")
    store.delete("factors/f2/a")  # deleting what is gone is a no-op
    store.delete("never/existed")
    assert store.delete_prefix("factors/f1/") == 2
    assert store.list() == ["factors/f10/a"]
    assert store.delete_prefix("factors/f1/") == 0
    with pytest.raises(InputError, match="non-empty prefix"):
        store.delete_prefix("")
    store.put_bytes("factors/f2/a", b"back")  # a key can come back after its directory emptied
    assert store.get_bytes("factors/f2/a") == b"back"


@pytest.mark.parametrize("key", ["", "/etc/passwd", "a/../../x", "a//b", "a/./b", ".hidden", "a/.tmp", "a\\b", "x/"])
def test_malformed_keys_are_refused(store, key):
    with pytest.raises(InputError):
        store.put_bytes(key, b"x")
    with pytest.raises(InputError):
        store.get_bytes(key)


def test_tensors_round_trip_through_safetensors(store):
    base = torch.randn(6, 4, dtype=torch.float64)
    tensors = {
        "A": torch.randn(3, 5),
        "lambda": torch.rand(5, dtype=torch.float64),
        "blocks": torch.randn(2, 3, 4).to(torch.bfloat16),
        "ids": torch.arange(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
        "view_a": base[:3],  # two views of one storage: safetensors alone would refuse these
        "view_b": base[3:],
        "transposed": base.t(),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "mask": torch.tensor([True, False, True]),
        "small": torch.tensor([-3, 4], dtype=torch.int8),
        "count": torch.tensor([3], dtype=torch.int32),
    }
    size = put_tensors(store, "jobs/j/covariance/00000.safetensors", tensors)
    assert size == store.size("jobs/j/covariance/00000.safetensors")
    loaded = get_tensors(store, "jobs/j/covariance/00000.safetensors")
    assert sorted(loaded) == sorted(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name
    # Our encoder writes the layout itself: the header is valid JSON padded to 8 bytes and
    # every tensor starts aligned to its element size (safetensors' parser checks the rest).
    data = store.get_bytes("jobs/j/covariance/00000.safetensors")
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_size])
    assert header_size % 8 == 0 and set(header) == set(tensors)
    for name, entry in header.items():
        assert (8 + header_size + entry["data_offsets"][0]) % tensors[name].element_size() == 0, name
    assert get_tensors(store, "jobs/j/covariance/00000.safetensors").keys() == safetensors_load(data).keys()
    store.put_bytes("jobs/j/garbage.safetensors", b"not safetensors")
    with pytest.raises(IntegrityError, match="not a valid safetensors"):
        get_tensors(store, "jobs/j/garbage.safetensors")


# ------------------------------------------------------------------------------------------
# Artifacts: manifest last, verified reads, idempotent publishing


def write_factors(store, prefix: str, source: Path, metadata: dict | None = None):
    writer = ArtifactWriter(store, prefix)
    writer.add_tensors("mlp.safetensors", {"A": torch.eye(3), "S": torch.ones(2, 2)})
    writer.add_bytes("notes.txt", b"hello")
    writer.add_file("big.bin", source)
    return writer


def test_an_artifact_is_invisible_until_its_manifest_is_written(store, tmp_path):
    source = tmp_path / "big.bin"
    random_file(source, 3 * MiB)
    writer = write_factors(store, "factors/f1", source)
    assert store.list("factors/f1/") == ["factors/f1/big.bin", "factors/f1/mlp.safetensors", "factors/f1/notes.txt"]
    assert not is_published(store, "factors/f1")
    with pytest.raises(NotFoundError, match="no published artifact"):
        open_artifact(store, "factors/f1")

    manifest = writer.publish({"strategy": "ekfac", "modules": ["mlp"], "n_tokens": 123})
    assert "factors/f1/manifest.json" in store.list("factors/f1/")
    artifact = open_artifact(store, "factors/f1/")  # trailing slash or not: the same artifact
    assert artifact.manifest == manifest
    assert artifact.metadata == {"strategy": "ekfac", "modules": ["mlp"], "n_tokens": 123}
    assert artifact.names() == ["big.bin", "mlp.safetensors", "notes.txt"]
    assert artifact.entry("big.bin").size == 3 * MiB
    assert artifact.read_bytes("notes.txt") == b"hello"
    assert torch.equal(artifact.read_tensors("mlp.safetensors")["A"], torch.eye(3))
    copy = artifact.get_file("big.bin", tmp_path / "copy.bin")
    assert copy.read_bytes() == source.read_bytes()
    artifact.verify()
    with pytest.raises(NotFoundError, match="has no file"):
        artifact.read_bytes("other.bin")
    with pytest.raises(StorageError, match="already published"):
        writer.add_bytes("late.txt", b"x")

    document = json.loads(store.get_bytes("factors/f1/manifest.json"))
    assert document["format_version"] == 1
    assert document["files"]["notes.txt"] == {"sha256": hashlib.sha256(b"hello").hexdigest(), "size": 5}

    assert delete_artifact(store, "factors/f1") == 3
    assert store.list("factors/") == [] and not is_published(store, "factors/f1")


def test_the_writer_as_a_context_manager_publishes_only_on_success(store):
    with pytest.raises(RuntimeError, match="task crashed"), ArtifactWriter(store, "indexes/i1") as writer:
        writer.add_bytes("blocks/00000.safetensors", b"part")
        raise RuntimeError("task crashed")
    assert store.list("indexes/i1/") == ["indexes/i1/blocks/00000.safetensors"]  # files, but no manifest
    with pytest.raises(NotFoundError):
        open_artifact(store, "indexes/i1")

    with ArtifactWriter(store, "indexes/i1", metadata={"shards": 1}) as writer:
        writer.add_bytes("blocks/00000.safetensors", b"part")
    assert open_artifact(store, "indexes/i1").metadata == {"shards": 1}
    with pytest.raises(InputError, match="reserved"):
        ArtifactWriter(store, "indexes/i2").add_bytes(MANIFEST, b"{}")
    with pytest.raises(InputError, match="plain JSON"):
        ArtifactWriter(store, "indexes/i2").publish({"bad": object()})


def test_reads_are_checked_against_the_manifest(store, tmp_path):
    source = tmp_path / "big.bin"
    random_file(source, 2 * MiB)
    write_factors(store, "factors/f1", source).publish({})
    artifact = open_artifact(store, "factors/f1")

    store.put_bytes("factors/f1/notes.txt", b"hellO")  # same size, different bytes
    with pytest.raises(IntegrityError, match=r"notes\.txt is corrupted"):
        artifact.read_bytes("notes.txt")
    with pytest.raises(IntegrityError, match=r"notes\.txt is corrupted"):
        artifact.verify()

    put_tensors(store, "factors/f1/mlp.safetensors", {"A": torch.zeros(3, 3), "S": torch.ones(2, 2)})
    with pytest.raises(IntegrityError, match=r"mlp\.safetensors is corrupted"):
        artifact.read_tensors("mlp.safetensors")

    store.put_bytes("factors/f1/big.bin", source.read_bytes()[:-1])  # truncated
    with pytest.raises(IntegrityError, match=r"big\.bin is corrupted"):
        artifact.get_file("big.bin", tmp_path / "copy.bin")
    assert not (tmp_path / "copy.bin").exists()  # a corrupted download is not left behind

    store.delete("factors/f1/big.bin")
    with pytest.raises(IntegrityError, match="listed in the manifest but missing"):
        artifact.read_bytes("big.bin")


def test_unreadable_or_newer_manifests_are_refused(store):
    store.put_bytes("factors/f1/manifest.json", b"{not json")
    with pytest.raises(IntegrityError, match="unreadable"):
        open_artifact(store, "factors/f1")
    store.put_bytes("factors/f1/manifest.json", json.dumps({"format_version": 99, "files": {}}).encode())
    with pytest.raises(UnsupportedFormat, match="format version 99"):
        open_artifact(store, "factors/f1")


def test_republishing_the_same_content_is_harmless(store, tmp_path):
    source = tmp_path / "big.bin"
    random_file(source, MiB)
    write_factors(store, "factors/f1", source).publish({"fit": {"strategy": "ekfac", "damping": 0.1}})
    first = store.get_bytes("factors/f1/manifest.json")
    reader = open_artifact(store, "factors/f1")

    # A retried task (at-least-once delivery) writes the same artifact again, metadata in another order.
    write_factors(store, "factors/f1", source).publish({"fit": {"damping": 0.1, "strategy": "ekfac"}})
    assert store.get_bytes("factors/f1/manifest.json") == first
    assert store.list("factors/") == [f"factors/f1/{n}" for n in ("big.bin", MANIFEST, "mlp.safetensors", "notes.txt")]
    reader.verify()  # a reader that opened the first publication still reads consistent files


# ------------------------------------------------------------------------------------------
# open_store


def test_open_store_urls(tmp_path, s3_server, monkeypatch):
    local = open_store(f"file://{tmp_path}/a")
    local.put_bytes("k", b"v")
    assert isinstance(local, LocalStore) and open_store(str(tmp_path / "a")).get_bytes("k") == b"v"
    assert open_store(local.describe()).get_bytes("k") == b"v"
    for bad in (
        "ftp://x",
        "s3://bucket",
        "s3://bucket?endpoint=h:1&typo=1",
        "s3://b/path?endpoint=h:1",
        "file://host/x",
    ):
        with pytest.raises(InputError):
            open_store(bad)

    # Credentials from the environment: INFLUENCE_S3_* first, AWS_* as the fallback.
    for name in ("INFLUENCE_S3_ACCESS_KEY", "INFLUENCE_S3_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    bucket = new_bucket()
    remote = open_store(f"s3://{bucket}?endpoint={s3_server.endpoint}&secure=0")
    remote.put_bytes("k", b"v")
    assert isinstance(remote, S3Store) and open_store(remote.describe()).get_bytes("k") == b"v"
    monkeypatch.setenv("INFLUENCE_S3_SECRET_KEY", "wrong-secret")  # takes precedence over AWS_*
    with pytest.raises(PermissionDeniedError):
        open_store(remote.describe())


# ------------------------------------------------------------------------------------------
# S3 failure modes


def test_wrong_credentials_are_a_clear_error_at_once(s3_server):
    bucket = new_bucket()
    S3Store(s3_server.endpoint, bucket, s3_server.access_key, s3_server.secret_key).put_bytes("k", b"v")
    for access_key, secret_key in [
        (s3_server.access_key, "not-the-secret"),
        ("unknown-access-key", s3_server.secret_key),
        (None, None),
    ]:
        started = time.monotonic()
        with pytest.raises(PermissionDeniedError, match=r"refused access .*check the credentials"):
            S3Store(s3_server.endpoint, bucket, access_key, secret_key)
        assert time.monotonic() - started < 2  # an auth failure is not retried


@pytest.mark.needs_servers
@pytest.mark.slow
def test_a_stopped_server_raises_storage_unavailable_after_bounded_retries(tmp_path):
    with S3Server() as server:
        store = S3Store(server.endpoint, new_bucket(), server.access_key, server.secret_key, retry=FAST_RETRY)
        store.put_bytes("jobs/j/spec.json", b"kept")
        server.stop()
        for operation in (
            lambda: store.get_bytes("jobs/j/spec.json"),
            lambda: store.put_bytes("jobs/j/other", b"x"),
            lambda: store.list("jobs/"),
            lambda: store.get_file("jobs/j/spec.json", tmp_path / "x"),
        ):
            started = time.monotonic()
            with pytest.raises(StorageUnavailable, match=r"unavailable: .* failed 3 time\(s\).*Connection refused"):
                operation()
            assert time.monotonic() - started < 3
        server.start()
        assert store.get_bytes("jobs/j/spec.json") == b"kept"  # nothing acknowledged was lost


def test_an_endpoint_nobody_listens_on_fails_fast():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: connection refused
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"create bucket failed 3 time\(s\)"):
        S3Store(f"127.0.0.1:{port}", "bucket", "k", "s", retry=FAST_RETRY)
    assert time.monotonic() - started < 2


def test_server_errors_are_retried_then_reported():
    requests = []

    class Overloaded(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            requests.append(self.command)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET = do_PUT = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Overloaded)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(StorageUnavailable, match=r"failed 3 time\(s\).*503"):
            S3Store(f"127.0.0.1:{server.server_address[1]}", "bucket", "k", "s", retry=FAST_RETRY)
        assert len(requests) == 3  # exactly our attempts: the SDK's pool adds no retries of its own
    finally:
        server.shutdown()
        server.server_close()
