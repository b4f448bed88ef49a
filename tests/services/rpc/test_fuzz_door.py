"""Every RPC fuzzed through the door with small limits (hypothesis): generated messages of each
method's request type (every field drawn: hostile text, NUL characters, huge and negative numbers,
NaN, unknown enum values, nested messages, bytes over the message limit), sometimes damaged on the
wire, sent with no token, a wrong one or a valid one, as unary calls or streams.

Every answer is OK or a clear status (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION,
RESOURCE_EXHAUSTED, UNAUTHENTICATED for a missing or wrong token), with a one-line message that
names no class, key layout or endpoint; never INTERNAL, UNKNOWN, a hang or a crash, and nothing is
published. Accepted jobs (no worker runs) are cancelled.
"""

from __future__ import annotations

import re
import secrets
import uuid

import grpc
import pytest
from google.longrunning import operations_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.assembly import job_system, make_server
from services.gen.influence.v1 import factor_service_pb2, gradient_service_pb2, query_service_pb2
from services.jobs.connection import connect
from services.rpc.auth import TokenFile
from services.rpc.common import Limits
from services.rpc.server import BackgroundServer
from services.storage import open_store

pytestmark = pytest.mark.needs_servers  # every test here runs real servers

TOKEN = secrets.token_hex(16)
LIMITS = Limits(
    max_message_bytes=2 * 2**20,
    max_streams_per_tenant=8,
    max_unauthenticated_streams=4,
    max_upload_bytes=64 * 2**10,
    max_queries=8,
    max_query_chars=200,
    max_top_k=50,
    max_dataset_sequences=20,
)
SERVICES = [
    factor_service_pb2.DESCRIPTOR.services_by_name["FactorService"],
    gradient_service_pb2.DESCRIPTOR.services_by_name["GradientService"],
    query_service_pb2.DESCRIPTOR.services_by_name["QueryService"],
    operations_pb2.DESCRIPTOR.services_by_name["Operations"],
]
METHODS = [method for service in SERVICES for method in service.methods]
CLEAR = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"}
CLASS_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception)\b")


@pytest.fixture(scope="module")
def door(redis_server, s3_server, tmp_path_factory):
    """A server with tokens and LIMITS on the real Redis and S3; no worker."""
    tokens = tmp_path_factory.mktemp("fuzz") / "tokens.txt"
    tokens.write_text(f"{TOKEN} alice\n")
    bucket = f"fuzz{uuid.uuid4().hex[:8]}"
    store = open_store(s3_server.url(bucket))
    system = job_system(store, connect(redis_server.url), prefix=f"f{uuid.uuid4().hex[:6]}")
    server = BackgroundServer(lambda: make_server(system, limits=LIMITS, tokens=TokenFile(tokens))).start()
    channel = grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", -1)])
    yield channel, store, [s3_server.endpoint, bucket, "tenants/", "Traceback"]
    assert not [key for key in store.list("") if key.endswith("manifest.json")], "fuzzing published an artifact"
    channel.close()
    server.stop()


TEXTS = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["", "\x00", "datasets/x", "factorSets/x", "operations/x", "indexes/x", "results/x", "datasets/../../etc",
         "file:///etc/passwd", "s3://bucket/key", "kind = fit_factors", "a" * 300, "é"]
    ),
)  # fmt: skip
BYTES = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b'{"text": "w1 w2"}\n', b"x" * (3 * 2**20)]))
SCALARS = {
    FieldDescriptor.TYPE_STRING: TEXTS,
    FieldDescriptor.TYPE_BYTES: BYTES,
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32, allow_nan=True, allow_infinity=True),
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_ENUM: st.integers(-3, 20),
}


def message_values(descriptor, depth: int = 0):
    """A strategy of {field: value} for a message type (nested messages as dicts, 3 deep)."""
    fields = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3 or field.message_type.GetOptions().map_entry:
                continue
            value = message_values(field.message_type, depth + 1)
        elif field.type in SCALARS:
            value = SCALARS[field.type]
        else:
            continue
        if field.is_repeated:
            value = st.lists(value, max_size=3)
        fields[field.name] = st.one_of(st.none(), value)
    return st.fixed_dictionaries(fields)


def build(message, values: dict):
    for name, value in values.items():
        if value is None:
            continue
        field = message.DESCRIPTOR.fields_by_name[name]
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value if field.is_repeated else [value]:
                target = getattr(message, name).add() if field.is_repeated else getattr(message, name)
                build(target, item)
                if not field.is_repeated:
                    target.SetInParent()
        elif field.is_repeated:
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return message


@st.composite
def calls(draw):
    method = draw(st.sampled_from(METHODS))
    cls = message_factory.GetMessageClass(method.input_type)
    count = draw(st.integers(1, 3)) if method.client_streaming else 1
    payloads = [build(cls(), draw(message_values(method.input_type))).SerializeToString() for _ in range(count)]
    damage = draw(st.sampled_from(["none"] * 4 + ["truncate", "flip", "garbage"]))
    if damage == "truncate" and payloads[0]:
        payloads[0] = payloads[0][: draw(st.integers(0, len(payloads[0]) - 1))]
    elif damage == "flip" and payloads[0]:
        position = draw(st.integers(0, len(payloads[0]) - 1))
        payloads[0] = payloads[0][:position] + bytes([payloads[0][position] ^ 0xFF]) + payloads[0][position + 1 :]
    elif damage == "garbage":
        payloads[0] = draw(st.binary(min_size=1, max_size=32))
    token = draw(st.sampled_from(["good"] * 4 + ["none", "wrong"]))
    return method, payloads, token


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(call=calls())
def test_every_rpc_answers_whatever_it_is_sent_clearly(door, call):
    channel, _, internals = door
    method, payloads, token = call
    metadata = {"good": (("authorization", f"Bearer {TOKEN}"),), "wrong": (("authorization", "Bearer nope"),)}
    path = f"/{method.containing_service.full_name}/{method.name}"
    output = message_factory.GetMessageClass(method.output_type)
    if method.client_streaming:
        kind = channel.stream_stream if method.server_streaming else channel.stream_unary
        request = iter(payloads)
    else:
        kind = channel.unary_stream if method.server_streaming else channel.unary_unary
        request = payloads[0]
    invoke = kind(path, response_deserializer=output.FromString)
    code, details, response = "OK", "", None
    try:
        response = invoke(request, metadata=metadata.get(token, ()), timeout=60)
        if method.server_streaming:
            for _ in zip(range(3), response, strict=False):
                pass
            response.cancel()
    except grpc.RpcError as error:
        code, details = error.code().name, error.details() or ""
    allowed = CLEAR if token == "good" else CLEAR | {"UNAUTHENTICATED"}
    assert code in allowed, f"{path}: {code}: {details}"
    assert "\n" not in details and not CLASS_NAME.search(details), f"{path}: {details}"
    assert not [text for text in internals if text in details], f"{path}: {details}"
    if token != "good":
        assert code == "UNAUTHENTICATED", f"{path} answered {code} without a valid token"
    if isinstance(response, operations_pb2.Operation) and not response.done:
        stub = channel.unary_unary("/google.longrunning.Operations/CancelOperation")
        stub(operations_pb2.CancelOperationRequest(name=response.name).SerializeToString(), metadata=metadata["good"])
