"""Hostile callers at the door (services/rpc/door.py), on real servers over real gRPC.

- Nothing large is read before it is allowed: unauthenticated and oversized messages, unary and
  streamed, leave the memory of an `influence serve` process flat (measured: its RSS).
- Malformed requests to every RPC (bytes that do not parse, text that is not UTF-8, NUL
  characters) are INVALID_ARGUMENT naming the field, never UNKNOWN or INTERNAL.
- Calls in flight are limited per tenant and for calls without a token.
- What callers read names no endpoint, key layout, class or server path, whatever failed (the
  store or Redis away, damaged bytes, a missing object in a job).
- `influence serve` listens on loopback (and so does its metrics port) unless told otherwise, and
  warns when it listens beyond the machine without tokens or TLS.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import psutil
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2, message_factory
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.assembly import job_system, make_server
from services.client import InfluenceClient
from services.errors import UnavailableError
from services.gen.influence.v1 import common_pb2, factor_service_pb2, gradient_service_pb2, query_service_pb2
from services.jobs.connection import connect
from services.rpc.auth import TokenFile
from services.rpc.common import Limits
from services.rpc.server import BackgroundServer
from services.storage import open_store
from services.storage.retry import RetryPolicy
from services.system.runner import Worker
from services.toy.models import build_tiny_model, save_model_dir
from services.toy.tokenizer import build_word_tokenizer
from tests.support.memory import PeakRss
from tests.support.servers.influence import wait_serving
from tests.support.servers.ports import free_ports, wait_until
from tests.support.servers.redis import RedisServer
from tests.support.servers.s3 import S3Server

pytestmark = pytest.mark.needs_servers  # every test here runs real servers

WORDS = [f"w{i}" for i in range(40)]
TOKENS = {"alice": secrets.token_hex(16), "bob": secrets.token_hex(16)}
CLASS_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception)\b")
MiB = 2**20


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A tiny model (model/), TRAIN.jsonl (train.jsonl) and a tokens file (tokens.txt)."""
    root = tmp_path_factory.mktemp("door")
    tokenizer = build_word_tokenizer(WORDS)
    save_model_dir(build_tiny_model("gpt2", len(tokenizer), d_model=16, seed=0), tokenizer, root / "model")
    lines = [{"id": f"t{n}", "text": " ".join(WORDS[(n * 3 + k) % 40] for k in range(6))} for n in range(12)]
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (root / "tokens.txt").write_text("".join(f"{token} {tenant}\n" for tenant, token in TOKENS.items()))
    return root


@contextlib.contextmanager
def serve_process(redis_url: str, s3: S3Server, directory: Path, *args: str, env: dict | None = None):
    """`influence serve` as its own process ((process, port, log path)), no --host unless in `args`."""
    port = free_ports(1)[0]
    log = directory / f"serve-{port}.log"
    environment = {
        **os.environ,
        **s3.env(),
        "INFLUENCE_REDIS_URL": redis_url,
        "INFLUENCE_STORE_URL": s3.url(f"door{uuid.uuid4().hex[:8]}"),
        "INFLUENCE_QUEUE_PREFIX": f"door{uuid.uuid4().hex[:6]}",
        "INFLUENCE_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", "--state-dir", str(directory / "state"), *args],
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_serving(f"127.0.0.1:{port}", process, log)
        yield process, port, log
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def token_metadata(tenant: str) -> tuple:
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


def test_unauthenticated_and_oversized_messages_leave_the_servers_memory_flat(
    redis_server, s3_server, inputs, tmp_path
):
    """3 unauthenticated and 3 authenticated callers send 64 MiB requests at once, unary and as
    upload streams; every one is refused, and the server's RSS stays flat: nothing of a refused
    body is buffered (before the door: a 512 MiB limit and the token checked after the body)."""
    with serve_process(
        redis_server.url, s3_server, tmp_path, "--host", "127.0.0.1", "--workers", "0",
        "--auth-tokens", str(inputs / "tokens.txt"),
    ) as (process, port, _):  # fmt: skip
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)])
        register = channel.unary_unary(
            "/influence.v1.GradientService/RegisterDataset",
            request_serializer=gradient_service_pb2.RegisterDatasetRequest.SerializeToString,
        )
        upload = channel.stream_unary(
            "/influence.v1.GradientService/UploadDataset",
            request_serializer=gradient_service_pb2.UploadDatasetRequest.SerializeToString,
        )
        model = common_pb2.ModelSpec(path=str(inputs / "model"))
        big = b'{"text": "w1 w2"}\n' * (64 * MiB // 18)
        unary = gradient_service_pb2.RegisterDatasetRequest(model=model, jsonl=big)

        def stream():
            yield gradient_service_pb2.UploadDatasetRequest(
                request=gradient_service_pb2.RegisterDatasetRequest(model=model)
            )
            yield gradient_service_pb2.UploadDatasetRequest(data=big)

        listing = gradient_service_pb2.ListDatasetsRequest()
        list_datasets = channel.unary_unary(
            "/influence.v1.GradientService/ListDatasets",
            request_serializer=gradient_service_pb2.ListDatasetsRequest.SerializeToString,
            response_deserializer=gradient_service_pb2.ListDatasetsResponse.FromString,
        )
        for _ in range(5):  # warm up: the server's own allocations settle before measuring
            list_datasets(listing, metadata=token_metadata("alice"), timeout=30)
        time.sleep(1)
        codes = []

        def attack(call, request, metadata) -> None:
            try:
                call(request() if callable(request) else request, metadata=metadata, timeout=60)
                codes.append("OK")
            except grpc.RpcError as error:
                codes.append(error.code().name)

        attacks = [
            (call, request, metadata)
            for metadata in ((), token_metadata("alice"))
            for call, request in ((register, unary), (upload, stream))
            for _ in range(3)
        ]
        with PeakRss(process.pid) as rss:
            before = rss.peak
            threads = [threading.Thread(target=attack, args=arguments) for arguments in attacks]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(180)
            time.sleep(1)
        after = psutil.Process(process.pid).memory_info().rss
        grown, kept = (rss.peak - before) / MiB, (after - before) / MiB
        print(f"serve RSS {before / MiB:.0f} MiB before, peak +{grown:.0f} MiB, after +{kept:.0f} MiB")
        assert sorted(codes) == ["RESOURCE_EXHAUSTED"] * 6 + ["UNAUTHENTICATED"] * 6, codes
        assert grown < 48 and kept < 32, (
            f"12 refused 64 MiB requests grew the server by {grown:.0f} MiB (kept {kept:.0f})"
        )
        assert list_datasets(listing, metadata=token_metadata("alice"), timeout=30) is not None  # still serving
        channel.close()


# -- malformed requests, every RPC ----------------------------------------------------------

SERVICES = [
    factor_service_pb2.DESCRIPTOR.services_by_name["FactorService"],
    gradient_service_pb2.DESCRIPTOR.services_by_name["GradientService"],
    query_service_pb2.DESCRIPTOR.services_by_name["QueryService"],
    operations_pb2.DESCRIPTOR.services_by_name["Operations"],
]
METHODS = [method for service in SERVICES for method in service.methods]


def text_field(descriptor, depth: int = 0) -> list[str] | None:
    """The path (field names) to a string field of a message type, at most 3 deep."""
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated:
            return [field.name]
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated and depth < 2:
            inner = text_field(field.message_type, depth + 1)
            if inner:
                return [field.name, *inner]
    return None


def with_text(message_class, path: list[str], value: str) -> bytes:
    message = message_class()
    target = message
    for name in path[:-1]:
        target = getattr(target, name)
    setattr(target, path[-1], value)
    return message.SerializeToString()


@pytest.fixture(scope="module")
def in_process(redis_server, tmp_path_factory):
    """A server (every service, the door without tokens) over a local store; no worker."""
    system = job_system(
        open_store(str(tmp_path_factory.mktemp("store"))), connect(redis_server.url), prefix=f"d{uuid.uuid4().hex[:6]}"
    )
    server = BackgroundServer(lambda: make_server(system)).start()
    yield server.target
    server.stop()


def raw_call(channel: grpc.Channel, method, payload: bytes) -> grpc.RpcError:
    """Send `payload` as the request (the first message of a stream) to `method`; its error."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    if method.client_streaming:
        call = (channel.stream_stream if method.server_streaming else channel.stream_unary)(path)
        request = iter([payload])
    else:
        call = (channel.unary_stream if method.server_streaming else channel.unary_unary)(path)
        request = payload
    try:
        outcome = call(request, timeout=30)
        if method.server_streaming:
            list(outcome)
    except grpc.RpcError as error:
        return error
    pytest.fail(f"{path} accepted {payload[:40]!r}")


@pytest.mark.parametrize("method", METHODS, ids=[f"{m.containing_service.name}.{m.name}" for m in METHODS])
def test_every_rpc_answers_malformed_bytes_bad_utf8_and_nul_with_invalid_argument_naming_the_field(in_process, method):
    channel = grpc.insecure_channel(in_process)
    message_class = message_factory.GetMessageClass(method.input_type)
    cases = [(b"\xff\xff\xff\xff\xff", None)]
    path = text_field(method.input_type)
    if path is not None:
        field = ".".join(path)
        cases.append((with_text(message_class, path, "zqzq").replace(b"zqzq", b"z\xffqz"), field))
        cases.append((with_text(message_class, path, "zq\x00zq"), field))
    for payload, field in cases:
        error = raw_call(channel, method, payload)
        details = error.details() or ""
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{payload[:20]!r}: {error.code()}: {details}"
        assert not CLASS_NAME.search(details) and "\n" not in details, details
        assert (field or method.input_type.full_name) in details, details
    channel.close()


# -- calls in flight ------------------------------------------------------------------------


def test_calls_in_flight_are_limited_per_tenant_and_without_a_token(redis_server, inputs, tmp_path):
    system = job_system(
        open_store(str(tmp_path / "store")), connect(redis_server.url), prefix=f"d{uuid.uuid4().hex[:6]}"
    )
    limits = Limits(max_streams_per_tenant=2, max_unauthenticated_streams=1)
    server = BackgroundServer(
        lambda: make_server(system, limits=limits, tokens=TokenFile(inputs / "tokens.txt"))
    ).start()
    channel = grpc.insecure_channel(server.target)
    try:
        operations = operations_pb2_grpc.OperationsStub(channel)
        pending, _ = system.for_tenant("alice").operations.create("fit_factors", {}, tenant="alice")
        wait = operations_pb2.WaitOperationRequest(
            name=f"operations/{pending['id']}", timeout=duration_pb2.Duration(seconds=4)
        )
        held = [operations.WaitOperation.future(wait, metadata=token_metadata("alice"), timeout=30) for _ in range(2)]
        time.sleep(1)  # both are in flight
        probe = operations_pb2.GetOperationRequest(name=f"operations/{pending['id']}")
        with pytest.raises(grpc.RpcError) as refused:
            operations.GetOperation(probe, metadata=token_metadata("alice"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit is 2 (--max-streams-per-tenant)" in refused.value.details(), refused.value.details()
        with pytest.raises(grpc.RpcError) as other:  # bob is not held back by alice's calls
            operations.GetOperation(probe, metadata=token_metadata("bob"), timeout=10)
        assert other.value.code() == grpc.StatusCode.NOT_FOUND
        for call in held:
            assert not call.result().done  # they ran their course
        assert operations.GetOperation(probe, metadata=token_metadata("alice"), timeout=10).name == probe.name

        health = health_pb2_grpc.HealthStub(channel)
        watching = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watching).status == health_pb2.HealthCheckResponse.SERVING  # one call without a token in flight
        with pytest.raises(grpc.RpcError) as refused:
            health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "(--max-unauthenticated-streams)" in refused.value.details()
        watching.cancel()
        wait_until(lambda: _serving(health), 10, "the cancelled watch's place to be given back")
    finally:
        channel.close()
        server.stop()


def _serving(health) -> bool:
    try:
        return health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


# -- what callers read ---------------------------------------------------------------------


def test_what_callers_read_names_no_endpoint_key_layout_class_or_path(inputs, tmp_path):
    """A tenant's calls while the store is away, while Redis is away, on damaged bytes, on a job
    whose input vanished, and with malformed requests: each answer's message (and a failed
    operation's) is free of the store's endpoint and bucket, the tenants/ layout, Redis's
    address, class names and the server's own directories."""
    redis, s3 = RedisServer().start(), S3Server().start()
    bucket = f"leak{uuid.uuid4().hex[:8]}"
    store = open_store(s3.url(bucket))
    store.retry = RetryPolicy(attempts=2, initial_delay=0.1, max_delay=0.2)
    system = job_system(store, connect(redis.url), prefix=f"d{uuid.uuid4().hex[:6]}")
    server = BackgroundServer(lambda: make_server(system, tokens=TokenFile(inputs / "tokens.txt"))).start()
    client = InfluenceClient(server.target, token=TOKENS["alice"], retries=0)
    worker = Worker(system, consumer="leak")
    forbidden = [s3.endpoint, bucket, "tenants/", str(redis.port), str(tmp_path), "Traceback"]
    told: list[str] = []

    def answer(call, request, streaming: bool = False) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as raised:
            outcome = call(request, timeout=60)
            if streaming:
                list(outcome)
        told.append(raised.value.details() or "")
        return raised.value

    try:
        model = common_pb2.ModelSpec(path=str(inputs / "model"))
        registering = client.gradients.RegisterDataset(
            gradient_service_pb2.RegisterDatasetRequest(model=model, jsonl=(inputs / "train.jsonl").read_bytes())
        )
        worker.run_once(100)
        dataset = client.unpack(client.wait(registering, timeout=60), gradient_service_pb2.Dataset)
        dataset_key = f"tenants/alice/datasets/{dataset.name.split('/')[1]}/shards/00000.json"

        # damaged bytes: DATA_LOSS naming the file as the tenant knows it
        good = store.get_bytes(dataset_key)
        store.put_bytes(dataset_key, b"[]")
        files = common_pb2.StreamArtifactFilesRequest(name=dataset.name)
        assert answer(client.gradients.StreamDatasetFiles, files, streaming=True).code() == grpc.StatusCode.DATA_LOSS
        assert "datasets/" in told[-1]
        store.put_bytes(dataset_key, good)

        # a job whose input vanished before a worker took it: its operation's error
        again = gradient_service_pb2.RegisterDatasetRequest(model=model, jsonl=b'{"text": "w1 w2 w3"}\n')
        operation = client.gradients.RegisterDataset(again)
        store.delete_prefix(f"tenants/alice/jobs/{operation.name.split('/')[1]}/upload")
        worker.run_once(100)
        ended = client.get_operation(operation.name)
        assert ended.done and ended.error.code == grpc.StatusCode.NOT_FOUND.value[0]
        told.append(ended.error.message)

        # malformed requests
        nul_name = gradient_service_pb2.GetDatasetRequest(name="datasets/\x00")
        assert answer(client.gradients.GetDataset, nul_name).code() == grpc.StatusCode.INVALID_ARGUMENT
        nul_model = gradient_service_pb2.RegisterDatasetRequest(
            model=common_pb2.ModelSpec(path=str(inputs / "model") + "\x00"), jsonl=b'{"text": "w1 w2"}\n'
        )
        assert answer(client.gradients.RegisterDataset, nul_model).code() == grpc.StatusCode.INVALID_ARGUMENT

        # the store away: UNAVAILABLE, one sentence
        s3.stop()
        for call, request in (
            (client.gradients.GetDataset, gradient_service_pb2.GetDatasetRequest(name=dataset.name)),
            (client.gradients.ListDatasets, gradient_service_pb2.ListDatasetsRequest()),
            (client.factors.FitFactors, factor_service_pb2.FitFactorsRequest(model=model, dataset=dataset.name)),
        ):
            error = answer(call, request)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert error.details() == "the object store is unavailable; retry later", error.details()
        with pytest.raises(UnavailableError, match="the object store is unavailable"):
            client.register_dataset(model, inputs / "train.jsonl", shard_size=5)
        s3.start()

        # Redis away
        redis.stop()
        error = answer(client.operations.GetOperation, operations_pb2.GetOperationRequest(name=operation.name))
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "retry later" in error.details()
        error = answer(
            client.factors.FitFactors, factor_service_pb2.FitFactorsRequest(model=model, dataset=dataset.name)
        )
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        redis.start()
    finally:
        client.close()
        server.stop()
        redis.cleanup()
        s3.cleanup()
    for message in told:
        leaked = [text for text in forbidden if text in message] + CLASS_NAME.findall(message)
        assert message and not leaked, f"{message!r} shows {leaked}"


# -- where serve listens -------------------------------------------------------------------


def listening(pid: int) -> dict[int, str]:
    """{port: address} of the process's listening TCP sockets (IPv4 addresses as IPv4, "::" as 0.0.0.0)."""
    return {
        connection.laddr.port: "0.0.0.0" if connection.laddr.ip == "::" else connection.laddr.ip.removeprefix("::ffff:")
        for connection in psutil.Process(pid).net_connections(kind="tcp")
        if connection.status == psutil.CONN_LISTEN
    }


def test_serve_listens_on_loopback_unless_told_and_warns_when_exposed_without_tokens_or_tls(
    redis_server, s3_server, tmp_path
):
    metrics = free_ports(1)[0]
    with serve_process(redis_server.url, s3_server, tmp_path, "--workers", "0", "--metrics-port", str(metrics)) as (
        process,
        port,
        log,
    ):
        sockets = listening(process.pid)
        assert sockets.get(port) == "127.0.0.1" and sockets.get(metrics) == "127.0.0.1", sockets
        assert "beyond this machine" not in log.read_text()
    with serve_process(redis_server.url, s3_server, tmp_path, "--workers", "0", "--host", "0.0.0.0") as (
        process,
        port,
        log,
    ):
        assert listening(process.pid).get(port) == "0.0.0.0"
        text = log.read_text()
        assert "listening on 0.0.0.0, beyond this machine, without tokens (--auth-tokens)" in text, text
        assert "without TLS" in text
