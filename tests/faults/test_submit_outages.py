"""Outages and crashes at submit, on real servers (redis-server, SeaweedFS, gRPC over loopback).

- Redis away, or the object store away, when the CLI submits: the server answers UNAVAILABLE (never
  INTERNAL), and the CLI keeps retrying with bounded backoff for its full INFLUENCE_RETRY_SECONDS
  once the server has answered (not the 10 s it gives an address that never answered), so an
  outage longer than that is ridden out and the job runs once.
- A submission that fails after writing its inputs (Redis failing after the spec write, the store
  failing after the upload) leaves nothing behind once the outage ends: its inputs are deleted by a
  worker's sweep, and the same request then makes its job once.
- A request id survives the API server dying in the middle of a create (SIGKILL at the exact points
  of JobSystem.submit, through its test-only crash hook): the client's retries with the same
  request id make one job, never two, and nothing is left of the attempt that died.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from services.assembly import job_system, make_server
from services.cli import main
from services.client import InfluenceClient
from services.engine.model_io import ModelRef
from services.errors import UnavailableError
from services.gen.influence.v1 import common_pb2, gradient_service_pb2
from services.gradient_svc.jobs import RegisterJob
from services.jobs.connection import connect
from services.rpc.server import BackgroundServer
from services.storage import open_store
from services.storage.retry import RetryPolicy
from services.system.runner import Worker
from services.toy.models import build_tiny_model, save_model_dir
from services.toy.tokenizer import build_word_tokenizer
from tests.support.servers.influence import wait_serving
from tests.support.servers.ports import free_ports, wait_until
from tests.support.servers.redis import RedisServer
from tests.support.servers.s3 import S3Server

WORDS = [f"w{i}" for i in range(40)]
OUTAGE_SECONDS = 15  # longer than the 10 s a client gives a server that never answered


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outages")
    tokenizer = build_word_tokenizer(WORDS)
    save_model_dir(build_tiny_model("gpt2", len(tokenizer), d_model=16, seed=0), tokenizer, root / "model")
    lines = [{"id": f"t{n}", "text": " ".join(WORDS[(n * 7 + k) % 40] for k in range(8))} for n in range(12)]
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


class System:
    """A JobSystem on a Redis and a store, the gRPC services and one worker thread."""

    def __init__(self, redis_url: str, store, *, workers: int = 1):
        self.store = store
        self.system = job_system(store, connect(redis_url), prefix=f"o{uuid.uuid4().hex[:6]}", lease_seconds=5)
        self.server = BackgroundServer(lambda: make_server(self.system)).start()
        self.workers = [Worker(self.system, consumer=f"w{n}") for n in range(workers)]
        self.threads = [threading.Thread(target=w.run_forever, kwargs={"block_ms": 100}) for w in self.workers]
        for thread in self.threads:
            thread.start()

    def operations(self, kind: str) -> list:
        with InfluenceClient(self.server.target) as client:
            return client.list_operations(kind)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop.set()
        for thread in self.threads:
            thread.join(60)
        self.server.stop()


def fit_through_the_cli(system: System, inputs: Path, out: Path, capsys) -> tuple[int, float]:
    started = time.monotonic()
    model, data = str(inputs / "model"), str(inputs / "train.jsonl")
    arguments = ["--server", system.server.target, "--model", model, "--data", data, "--shard-size", "6"]
    code = main(["fit", *arguments, "--out", str(out), "--quiet"])
    return code, time.monotonic() - started


def test_redis_down_at_submit_is_unavailable_and_the_cli_waits_it_out(inputs, tmp_path, capsys):
    redis = RedisServer().start()
    system = System(redis.url, open_store(str(tmp_path / "store")))
    try:
        redis.stop()
        threading.Timer(OUTAGE_SECONDS, redis.start).start()
        code, seconds = fit_through_the_cli(system, inputs, tmp_path / "factors", capsys)
        assert code == 0, capsys.readouterr().err
        assert seconds > OUTAGE_SECONDS and (tmp_path / "factors" / "manifest.json").exists()
        assert len(system.operations("register_dataset")) == 1 and len(system.operations("fit_factors")) == 1
    finally:
        system.close()
        redis.cleanup()


def test_the_store_down_at_submit_is_unavailable_and_the_cli_waits_it_out(redis_server, inputs, tmp_path, capsys):
    s3 = S3Server().start()
    store = open_store(s3.url(f"o{uuid.uuid4().hex[:8]}"))
    store.exists("probe")  # the bucket exists before the outage
    system = System(redis_server.url, store)
    try:
        s3.stop()
        threading.Timer(OUTAGE_SECONDS, s3.start).start()
        code, seconds = fit_through_the_cli(system, inputs, tmp_path / "factors", capsys)
        assert code == 0, capsys.readouterr().err
        assert seconds > OUTAGE_SECONDS and (tmp_path / "factors" / "manifest.json").exists()
        assert len(system.operations("register_dataset")) == 1 and len(system.operations("fit_factors")) == 1
    finally:
        system.close()
        s3.cleanup()


@pytest.mark.parametrize("failing", ["redis after the spec", "the store after the upload"])
def test_a_submission_that_fails_midway_leaves_no_inputs_behind(inputs, failing):
    """The outage begins at the worst moment (a hook on the real store stops the real server right
    after the named write): the submission fails UNAVAILABLE, its own clean-up cannot run, and once
    the outage is over a worker's sweep deletes what it wrote; the same request then makes one job."""
    redis, s3 = RedisServer().start(), S3Server().start()
    store = open_store(s3.url(f"o{uuid.uuid4().hex[:8]}"))
    store.retry = RetryPolicy(attempts=2, initial_delay=0.1, max_delay=0.2)
    system = job_system(store, connect(redis.url), prefix=f"o{uuid.uuid4().hex[:6]}")
    system.submit_grace_seconds = 1.0
    stopped, stop_after = (redis, "/spec.json") if failing.startswith("redis") else (s3, "/upload.jsonl")
    write, outages = store.put_bytes, []

    def put_bytes(key: str, data: bytes) -> None:
        write(key, data)
        if key.startswith("jobs/") and key.endswith(stop_after) and not outages:  # once
            outages.append(key)
            stopped.stop()

    store.put_bytes = put_bytes
    job = RegisterJob(ModelRef(str(inputs / "model")), dataset_id="cprobe", shard_size=6)
    submit = dict(request_id="the-request", target="datasets/cprobe", upload=(inputs / "train.jsonl").read_bytes())
    try:
        with pytest.raises(UnavailableError):
            system.submit("register_dataset", job, **submit)
        stopped.start()
        assert store.list("jobs/"), "the failed submission's inputs are there until a sweep"
        time.sleep(1.5)  # past the grace
        worker = Worker(system, consumer="sweeper")
        worker.run_once(100)  # sweeps first; no task is queued
        assert store.list("jobs/") == [], "a sweep deletes what the failed submission wrote"
        assert system.operations.list(10)[0] == [], "and it made no operation"
        record = system.submit("register_dataset", job, **submit)
        assert system.submit("register_dataset", job, **submit)["id"] == record["id"]
        assert [r["id"] for r in system.operations.list(10)[0]] == [record["id"]]
        assert {key.split("/")[1] for key in store.list("jobs/")} == {record["id"]}
    finally:
        redis.cleanup()
        s3.cleanup()


# -- the API server killed at submit -------------------------------------------------------


def serve(port: int, env: dict, log: Path, *args: str) -> subprocess.Popen:
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_serving(f"127.0.0.1:{port}", process, log)
    return process


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest.mark.parametrize("point", ["submit:written", "submit:created"])
def test_a_request_id_survives_the_api_server_killed_at_submit(redis_server, s3_server, inputs, tmp_path, point):
    """The server SIGKILLs itself at `point` of a create call (after the inputs are written; after
    the operation is made); a new server comes up, and the client sends the same request (same
    request id) twice, as retries after lost replies do: one operation, done once; nothing of the
    attempt that died is left."""
    port, bucket = free_ports(1)[0], f"crash{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        **s3_server.env(),
        "INFLUENCE_REDIS_URL": redis_server.url,
        "INFLUENCE_STORE_URL": s3_server.url(bucket),
        "INFLUENCE_QUEUE_PREFIX": f"crash{uuid.uuid4().hex[:6]}",
        "INFLUENCE_SUBMIT_GRACE_SECONDS": "2",
        "INFLUENCE_LOG_LEVEL": "warning",
        "HF_HUB_OFFLINE": "1",
    }
    log = tmp_path / "serve.log"
    request = gradient_service_pb2.RegisterDatasetRequest(
        request_id=uuid.uuid4().hex,
        model=common_pb2.ModelSpec(path=str(inputs / "model")),
        jsonl=(inputs / "train.jsonl").read_bytes(),
        shard_size=6,
    )
    dying = serve(port, {**env, "INFLUENCE_TEST_CRASH_AT": point}, log, "--workers", "0")
    try:
        with InfluenceClient(f"127.0.0.1:{port}", retries=0) as client, pytest.raises(UnavailableError):
            client._create(client.gradients.RegisterDataset, request)
        assert dying.wait(30) == -signal.SIGKILL, "the server died at the crash point"
    finally:
        stop(dying)
    server = serve(port, env, log, "--workers", "1")
    try:
        with InfluenceClient(f"127.0.0.1:{port}") as client:
            first = client._create(client.gradients.RegisterDataset, request)
            again = client._create(client.gradients.RegisterDataset, request)
            assert again.name == first.name, "the same request id makes one operation"
            dataset = client.unpack(client.wait(first, timeout=120), gradient_service_pb2.Dataset)
            assert dataset.num_examples == 12
            assert [operation.name for operation in client.list_operations("register_dataset")] == [first.name]
        store = open_store(s3_server.url(bucket))
        wait_until(lambda: not store.list("jobs/"), 30, "no job inputs left (swept, or deleted by the job's end)")
    finally:
        stop(server)
