"""Request limits (wire.REQUEST_LIMITS; docs/reliability.md#limits) as callers meet them, over real
gRPC against real Redis and S3: a server started with small limits refuses a request one over each
with RESOURCE_EXHAUSTED, a message naming the limit's value and flag, and a BadRequest naming the
field, and accepts a request exactly at it. The dataset size is checked wherever a dataset enters:
an upload and a file:// path at the RPC, an s3:// object (which only the worker reads) by failing
the operation at once. `influence serve` takes each limit from its flag or its env variable."""

from __future__ import annotations

import json
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from services.cli import build_parser, main
from services.client import InfluenceClient, model_spec
from services.engine.records import Query
from services.errors import ResourceExhaustedError
from services.gen.influence.v1 import gradient_service_pb2, query_service_pb2
from services.rpc.common import Limits
from services.storage import S3Store
from services.wire import REQUEST_LIMITS
from tests.support.servers.influence import serving
from tests.support.system import Cluster

LIMITS = Limits(max_upload_bytes=400, max_queries=2, max_query_chars=20, max_top_k=5, max_dataset_sequences=10)


def jsonl(count: int, size: int | None = None) -> bytes:
    """`count` training sequences as JSONL, padded with trailing blanks (valid JSON) to `size` bytes."""
    data = b"".join(
        json.dumps({"id": f"s{n}", "text": f"w{n % 7} w{n % 5 + 10} w3"}).encode() + b"\n" for n in range(count)
    )
    if size is not None:
        assert len(data) <= size
        data = data[:-1] + b" " * (size - len(data)) + b"\n"
    return data


def refused(call, request, field: str) -> str:
    """The details of the RESOURCE_EXHAUSTED the call must end with; its BadRequest names `field`."""
    with pytest.raises(grpc.RpcError) as raised:
        call(request, timeout=30)
    error = raised.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f"{error.code()}: {error.details()}"
    status = status_pb2.Status.FromString(dict(error.trailing_metadata())["grpc-status-details-bin"])
    violations = [
        violation.field
        for detail in status.details
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR)
        for violation in error_details_pb2.BadRequest.FromString(detail.value).field_violations
    ]
    assert violations == [field], status
    return error.details()


@pytest.fixture(scope="module")
def limited(redis_server, s3_server, workspace):
    """A server with LIMITS, a dataset of exactly max_dataset_sequences and a KFAC factor set."""
    cluster = Cluster(redis_server.url, s3_server.url(f"b{uuid.uuid4().hex[:10]}"), limits=LIMITS)
    model = model_spec(workspace / "model")
    dataset = cluster.client.register_dataset(model, jsonl(10))
    factor_set = cluster.client.fit_factors(model, dataset.name, strategy="kfac", fisher="empirical")
    yield cluster, model, dataset, factor_set
    cluster.close()


def test_each_limit_refuses_one_over_it_naming_the_limit_and_accepts_its_value(limited, tmp_path):
    cluster, model, dataset, factor_set = limited
    client = cluster.client
    assert dataset.num_examples == 10  # max_dataset_sequences, uploaded

    def scores(queries: list[tuple[str, str]], top_k: int = 0) -> query_service_pb2.ComputeScoresRequest:
        return query_service_pb2.ComputeScoresRequest(
            model=model,
            factor_set=factor_set.name,
            dataset=dataset.name,
            top_k=top_k,
            queries=[query_service_pb2.Query(prompt=p, completion=c) for p, c in queries],
        )

    upload = gradient_service_pb2.RegisterDatasetRequest(model=model, jsonl=jsonl(5, size=401))
    assert "jsonl is 401 bytes; this server's limit is 400 (--max-upload-bytes)" in refused(
        client.gradients.RegisterDataset, upload, "jsonl"
    )
    assert "the request has 3 queries; this server's limit is 2 (--max-queries)" in refused(
        client.queries.ComputeScores, scores([("w1", "w2")] * 3), "queries"
    )
    assert "query 2 has 22 characters (prompt and completion); this server's limit is 20 (--max-query-chars)" in (
        refused(client.queries.ComputeScores, scores([("w1", "w2"), ("w1 w2 w3 w4", "w5 w6 w7 w8")]), "queries")
    )
    assert "top_k is 6; this server's limit is 5 (--max-top-k)" in refused(
        client.queries.ComputeScores, scores([("w1", "w2")], top_k=6), "top_k"
    )
    self_request = query_service_pb2.ComputeSelfInfluenceRequest(
        model=model, factor_set=factor_set.name, dataset=dataset.name, top_k=6
    )
    assert "top_k is 6; this server's limit is 5 (--max-top-k)" in refused(
        client.queries.ComputeSelfInfluence, self_request, "top_k"
    )
    over = gradient_service_pb2.RegisterDatasetRequest(model=model, jsonl=jsonl(11))
    assert len(over.jsonl) <= 400  # over the sequence limit only
    assert "jsonl: the dataset has 11 sequences; this server's limit is 10 (--max-dataset-sequences)" in refused(
        client.gradients.RegisterDataset, over, "jsonl"
    )
    (tmp_path / "over.jsonl").write_bytes(jsonl(11))
    uri = (tmp_path / "over.jsonl").as_uri()
    by_path = gradient_service_pb2.RegisterDatasetRequest(model=model, uri=uri)
    assert f"{uri}: the dataset has 11 sequences; this server's limit is 10 (--max-dataset-sequences)" in refused(
        client.gradients.RegisterDataset, by_path, "uri"
    )
    assert [d.name for d in client.list_datasets()] == [dataset.name]  # nothing over a limit was registered

    # exactly at each limit: accepted
    assert client.register_dataset(model, jsonl(5, size=400), shard_size=3).num_examples == 5
    (tmp_path / "ten.jsonl").write_bytes(jsonl(10))
    assert client.register_dataset(model, tmp_path / "ten.jsonl", by_path=True, shard_size=4).num_examples == 10
    at_limit = [Query("a", "w1", "w2"), Query("b", "w1 w2 w3 w4", "w5 w6 w17")]  # 2 queries, 20 characters
    result = client.compute_scores(model, factor_set.name, dataset.name, at_limit, top_k=5)
    assert len(list(client.score_rows(result.name))) == 2 * 5
    assert client.compute_self_influence(model, factor_set.name, dataset.name, top_k=5).num_train == 10


def test_an_s3_dataset_over_the_limit_fails_its_operation_at_once(limited, s3_server):
    """The API server never reads an s3:// source: the RPC is accepted, and the worker, reading the
    object, fails the operation with RESOURCE_EXHAUSTED (a retried task would end ABORTED)."""
    cluster, model, _, _ = limited
    bucket = f"uploads{uuid.uuid4().hex[:8]}"
    store = S3Store(s3_server.endpoint, bucket, s3_server.access_key, s3_server.secret_key)
    store.put_bytes("over.jsonl", jsonl(440))  # over both limits: the upload limit does not apply to a uri
    store.put_bytes("at.jsonl", jsonl(10))
    request = gradient_service_pb2.RegisterDatasetRequest(model=model, uri=f"s3://{bucket}/over.jsonl")
    before = [d.name for d in cluster.client.list_datasets()]
    operation = cluster.client.gradients.RegisterDataset(request, timeout=30)  # accepted: no RpcError
    with pytest.raises(ResourceExhaustedError) as raised:
        cluster.client.wait(operation, timeout=60)
    assert str(raised.value).endswith(
        f"s3://{bucket}/over.jsonl: the dataset has 440 sequences; this server's limit is 10 (--max-dataset-sequences)"
    )
    assert [d.name for d in cluster.client.list_datasets()] == before
    registered = cluster.client.register_dataset(model, f"s3://{bucket}/at.jsonl")
    assert registered.num_examples == 10


def test_serve_takes_each_limit_from_its_flag_or_env(monkeypatch, capsys):
    for name, limit in REQUEST_LIMITS.items():
        assert (limit.flag, limit.env) == ("--" + name.replace("_", "-"), "INFLUENCE_" + name.upper())
        monkeypatch.delenv(limit.env, raising=False)
        assert getattr(build_parser().parse_args(["serve"]), name) == limit.default
        assert getattr(build_parser().parse_args(["serve", limit.flag, "7"]), name) == 7
        monkeypatch.setenv(limit.env, "9")
        assert getattr(build_parser().parse_args(["serve"]), name) == 9
        assert getattr(build_parser().parse_args(["serve", limit.flag, "7"]), name) == 7  # the flag wins
    assert main(["serve", "--max-top-k", "-1"]) == 2
    assert "--max-top-k must be >= 0 (0: no limit), got -1" in capsys.readouterr().err
    monkeypatch.setenv("INFLUENCE_MAX_QUERIES", "many")
    with pytest.raises(SystemExit) as exited:
        main(["serve"])
    assert exited.value.code == 2 and "invalid int value: 'many'" in capsys.readouterr().err
    assert build_parser().parse_args(["worker"]).command == "worker"  # other commands are unaffected


@pytest.mark.slow
def test_influence_serve_applies_its_limits(redis_server, s3_server, workspace, tmp_path):
    """The real process: --max-upload-bytes from the command line, the dataset limit from env."""
    model = model_spec(workspace / "model")
    limits = ("--max-upload-bytes", "400")
    with (
        serving(redis_server, s3_server, tmp_path, limits, {"INFLUENCE_MAX_DATASET_SEQUENCES": "10"}) as (target, _),
        InfluenceClient(target) as client,
    ):
        with pytest.raises(ResourceExhaustedError, match=r"limit is 400 \(--max-upload-bytes\)"):
            client.register_dataset(model, jsonl(5, size=401))
        with pytest.raises(ResourceExhaustedError, match=r"has 11 sequences; this server's limit is 10 \(--max-d"):
            client.register_dataset(model, jsonl(11))
        assert client.register_dataset(model, jsonl(10)).num_examples == 10
