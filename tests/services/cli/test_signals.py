"""SIGTERM and SIGINT on the CLI: embedded, the redis-server and the temporary directories are gone
when the command exits; with --server the job is cancelled, unless --detach leaves it running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from google.longrunning import operations_pb2

from services.client import InfluenceClient
from services.gen.influence.v1 import common_pb2
from services.toy.models import build_tiny_model, save_model_dir
from services.toy.tokenizer import build_word_tokenizer
from tests.support.servers.ports import wait_until

pytestmark = pytest.mark.needs_servers  # every test interrupts a running fit: embedded, or on a server

WORDS = [f"w{i}" for i in range(200)]


@pytest.fixture(scope="module")
def slow_fit(tmp_path_factory):
    """A model and data whose fit takes several seconds on 2 cores."""
    root = tmp_path_factory.mktemp("signals")
    tokenizer = build_word_tokenizer(WORDS)
    save_model_dir(build_tiny_model("gpt2", len(tokenizer), n_layer=4, d_model=128, seed=0), tokenizer, root / "model")
    lines = [{"text": " ".join(WORDS[(i * 7 + j * 13) % 200] for j in range(40))} for i in range(400)]
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def start_fit(root, out, extra=(), env=None):
    command = [sys.executable, "-m", "services.cli", "fit", "--model", str(root / "model")]
    command += ["--data", str(root / "train.jsonl"), "--out", str(out), *extra]
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def read_until(process, needle: str, timeout: float = 60) -> str:
    """stderr lines of `process` until one contains `needle` (the fit has got that far)."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"never saw {needle!r}: {''.join(seen)}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_an_interrupted_embedded_command_leaves_no_server_or_directory(slow_fit, tmp_path, signum):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    process = start_fit(slow_fit, tmp_path / "out", env={**os.environ, "TMPDIR": str(scratch)})
    read_until(process, "register: 1/1")  # the embedded system is up and the fit has begun
    embedded = [path for path in scratch.iterdir() if path.name.startswith("influence-embedded-")]
    assert len(embedded) == 1
    pidfile = embedded[0] / "redis" / "redis.pid"
    wait_until(pidfile.exists, 10, "the embedded redis-server's pid file")
    servers = [psutil.Process(int(pidfile.read_text()))]
    assert "redis" in servers[0].name(), servers
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted" in err, err
    assert not any(path.name.startswith("influence-embedded-") for path in scratch.iterdir())
    for server in servers:
        wait_until(
            lambda server=server: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE, 10, "redis"
        )
    assert not (tmp_path / "out" / "manifest.json").exists()


def running_fit(client) -> operations_pb2.Operation | None:
    listed = client._call(client.operations.ListOperations, operations_pb2.ListOperationsRequest(name="operations"))
    for operation in listed.operations:
        metadata = common_pb2.OperationMetadata()
        operation.metadata.Unpack(metadata)
        if not operation.done and metadata.kind == "fit_factors":
            return operation
    return None


@pytest.mark.parametrize("detach", [False, True], ids=["cancelled", "detached"])
def test_an_interrupted_server_command_cancels_its_job_unless_detached(slow_fit, served, tmp_path, detach):
    target, _ = served
    extra = ["--server", target, *(["--detach"] if detach else [])]
    process = start_fit(slow_fit, tmp_path / "out", extra)
    read_until(process, "started; reattach with: influence wait")  # a job (register, or the fit: data is reused)
    with InfluenceClient(target) as client:
        wait_until(lambda: running_fit(client) is not None, 30, "the fit operation")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        assert process.returncode == 130, err
        name = next(word for word in err.split() if word.startswith("operations/"))
        operation = client._call(client.operations.GetOperation, operations_pb2.GetOperationRequest(name=name))
        if detach:
            assert "goes on on the server" in err and not operation.done, err
            client.cancel(name)  # the test's own cleanup
        else:
            assert "cancelled" in err and operation.done and operation.error.code == 1, err  # CANCELLED


def test_an_interrupt_while_a_job_is_being_created_is_held_until_the_job_is_named(redis_server, s3_server, tmp_path):
    """Ctrl-C landing between the server creating a job and the client reading its name would
    leave a job that the interrupted command can neither name nor cancel: the client holds the
    interrupt until it knows the name, then raises it."""
    import uuid

    from tests.support.system import Cluster, make_examples, write_jsonl

    tokenizer = build_word_tokenizer(WORDS)
    save_model_dir(build_tiny_model("gpt2", len(tokenizer), d_model=16, seed=0), tokenizer, tmp_path / "model")
    examples = make_examples(8, seed=0)
    write_jsonl(tmp_path / "train.jsonl", [{"id": e.id, "text": e.text} for e in examples])
    cluster = Cluster(redis_server.url, s3_server.url(f"b{uuid.uuid4().hex[:10]}"), workers=0)
    try:
        client = cluster.client
        dataset_operation = client.gradients.UploadDataset  # register_dataset uploads in chunks
        started = []

        def interrupted_in_flight(request, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode: inside the call
            started.append(dataset_operation(request, **kwargs))
            return started[-1]

        client.gradients.UploadDataset = interrupted_in_flight
        with pytest.raises(KeyboardInterrupt):
            client.register_dataset(str(tmp_path / "model"), tmp_path / "train.jsonl")
        assert len(started) == 1, "the interrupt cut the create call short"
        assert client.waiting_on == started[0].name
        assert cluster.system.operations.get(started[0].name.split("/")[1])["kind"] == "register_dataset"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back
    finally:
        cluster.close()
