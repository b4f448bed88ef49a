"""Hostile input, generated (hypothesis): every RPC and the CLI's input files answer with the right
status (or exit code) and a clear one-line message; never INTERNAL, a crash, a hang or an artifact.

The RPCs run against a real server on the real redis-server and S3 server, with a registered
dataset and fitted factors so that requests can reach deep validation; no worker runs while
fuzzing, so accepted jobs only queue (and are counted: each is an operation, none publishes).
"""

from __future__ import annotations

import json
import math
import uuid

import grpc
import pytest
from google.longrunning import operations_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.engine.records import read_queries_jsonl, read_training_jsonl
from services.errors import DomainError
from services.gen.influence.v1 import common_pb2, factor_service_pb2, gradient_service_pb2, query_service_pb2
from tests.support.system import Cluster

CLEAR = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def target(redis_server, s3_server, workspace):
    """A server with a dataset and a factor set, and no worker once they exist."""
    cluster = Cluster(redis_server.url, s3_server.url(f"b{uuid.uuid4().hex[:10]}"))
    model = str(workspace / "model")
    dataset = cluster.client.register_dataset(model, workspace / "train.jsonl", shard_size=12)
    factors = cluster.client.fit_factors(model, dataset.name)
    for worker in cluster.workers:
        worker.stop.set()
    for thread in cluster.threads:
        thread.join(30)
    published = set(cluster.store.list(""))
    yield cluster, model, dataset.name, factors.name
    assert not {key for key in cluster.store.list("") if key.endswith("manifest.json")} - published, (
        "fuzzing published an artifact"
    )
    cluster.close()


def answered(call, request):
    """The call's outcome: an Operation (accepted) or a clear status; anything else fails."""
    try:
        return call(request, timeout=30)
    except grpc.RpcError as error:
        details = error.details() or ""
        assert error.code() in CLEAR, f"{error.code()}: {details}"
        assert details and "\n" not in details and "Traceback" not in details, details
        return error


names = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["", "datasets/", "factorSets/x", "datasets/../../etc", "indexes/zz", "datasets/" + "a" * 65]),
)
doubles = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e308]))
ints32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, 10**9, -1]))
texts = st.one_of(st.text(max_size=200), st.sampled_from(["", " ", "\x00", "w1 " * 3000]))
ids = st.one_of(st.integers(), st.none(), st.lists(st.integers(), max_size=2), st.sampled_from(["x", "x"]))


@FUZZ
@given(
    real_names=st.booleans(),
    factor_set=names,
    dataset=names,
    top_k=ints32,
    damping=st.one_of(st.none(), doubles),
    damping_factor=st.one_of(st.none(), doubles),
    query_rank=ints32,
    batch_size=ints32,
    tfidf=ints32,
    rescore=st.one_of(st.none(), ints32),
    queries=st.lists(st.tuples(texts, texts, texts), max_size=6),
    duplicate=st.booleans(),
)
def test_compute_scores_answers_every_request_clearly(
    target,
    real_names,
    factor_set,
    dataset,
    top_k,
    damping,
    damping_factor,
    query_rank,
    batch_size,
    tfidf,
    rescore,
    queries,
    duplicate,
):
    cluster, model, real_dataset, real_factors = target
    request = query_service_pb2.ComputeScoresRequest(
        model=common_pb2.ModelSpec(path=model),
        factor_set=real_factors if real_names else factor_set,
        dataset=real_dataset if real_names else dataset,
        top_k=top_k,
        query_rank=query_rank,
        batch_size=batch_size,
        tfidf=tfidf,
        queries=[query_service_pb2.Query(id=i, prompt=p, completion=c) for i, p, c in queries]
        + ([query_service_pb2.Query(id="same", prompt="a", completion="b")] * 2 if duplicate else []),
    )
    if damping is not None:
        request.damping = damping
    if damping_factor is not None:
        request.damping_factor = damping_factor
    if rescore is not None:
        request.rescore = rescore
    outcome = answered(cluster.client.queries.ComputeScores, request)
    if isinstance(outcome, operations_pb2.Operation):  # accepted: every field was valid
        assert 1 <= (top_k or 10) <= 10_000 and queries and not duplicate
        for value in (damping, damping_factor):
            assert value is None or (math.isfinite(value) and value >= 0)
        cluster.client.cancel(outcome.name)


@FUZZ
@given(
    lines=st.lists(
        st.one_of(
            st.binary(max_size=60),
            st.builds(lambda t: json.dumps({"text": t}).encode(), texts),
            st.builds(lambda v: json.dumps({"id": v, "text": "w1 w2"}).encode(), ids),
            st.sampled_from([b"[]", b"{}", b'{"text": 3}', b'{"text": "a"', b"\xff\xfe", b'{"id": "x", "text": "w1"}']),
        ),
        max_size=8,
    ),
    shard_size=ints32,
    max_length=ints32,
)
def test_register_dataset_answers_every_upload_clearly(target, lines, shard_size, max_length):
    cluster, model, _, _ = target
    request = gradient_service_pb2.RegisterDatasetRequest(
        model=common_pb2.ModelSpec(path=model), jsonl=b"\n".join(lines), shard_size=shard_size, max_length=max_length
    )
    outcome = answered(cluster.client.gradients.RegisterDataset, request)
    if isinstance(outcome, operations_pb2.Operation) and not outcome.done:
        cluster.client.cancel(outcome.name)


@FUZZ
@given(
    dataset=names,
    real_dataset=st.booleans(),
    # enums on the wire: every number, known or not (proto3 enums are open)
    strategy=st.one_of(st.integers(0, 5), ints32),
    fisher=st.one_of(st.integers(0, 3), ints32),
    modules=st.one_of(st.sampled_from(["", "mlp", "all", "(", "[", "nothing-matches", ".*"]), st.text(max_size=20)),
    batch_size=ints32,
    max_examples=st.integers(-(2**63), 2**63 - 1),
    cache_gib=st.one_of(st.none(), doubles),
)
def test_fit_factors_answers_every_request_clearly(
    target, dataset, real_dataset, strategy, fisher, modules, batch_size, max_examples, cache_gib
):
    cluster, model, real, _ = target
    request = factor_service_pb2.FitFactorsRequest(
        model=common_pb2.ModelSpec(path=model),
        dataset=real if real_dataset else dataset,
        strategy=strategy,
        fisher=fisher,
        modules=modules,
        batch_size=batch_size,
        max_examples=max_examples,
    )
    if cache_gib is not None:
        request.cache_gib = cache_gib
    outcome = answered(cluster.client.factors.FitFactors, request)
    if isinstance(outcome, operations_pb2.Operation):
        assert cache_gib is None or (math.isfinite(cache_gib) and cache_gib >= 0)
        cluster.client.cancel(outcome.name)


@FUZZ
@given(name=names, page_size=ints32, page_token=st.text(max_size=20))
def test_reads_and_lists_answer_clearly(target, name, page_size, page_token):
    cluster, _, _, _ = target
    client = cluster.client
    answered(client.operations.GetOperation, operations_pb2.GetOperationRequest(name=name))
    answered(client.gradients.GetDataset, gradient_service_pb2.GetDatasetRequest(name=name))
    answered(client.factors.GetFactorSet, factor_service_pb2.GetFactorSetRequest(name=name))
    answered(client.queries.GetScoreResult, query_service_pb2.GetScoreResultRequest(name=name))
    answered(
        client.operations.ListOperations,
        operations_pb2.ListOperationsRequest(name="operations", page_size=page_size, page_token=page_token),
    )
    listing = gradient_service_pb2.ListDatasetsRequest(page_size=page_size, page_token=page_token)
    answered(client.gradients.ListDatasets, listing)


def test_limits_are_named_when_exceeded(target):
    cluster, model, dataset, factors = target
    many = [query_service_pb2.Query(id=str(n), prompt="w1", completion="w2") for n in range(5000)]
    request = query_service_pb2.ComputeScoresRequest(
        model=common_pb2.ModelSpec(path=model), factor_set=factors, dataset=dataset, queries=many
    )
    error = answered(cluster.client.queries.ComputeScores, request)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit is 4096 (--max-queries)" in error.details(), error.details()
    request = query_service_pb2.ComputeScoresRequest(
        model=common_pb2.ModelSpec(path=model), factor_set=factors, dataset=dataset, queries=many[:1], top_k=10**9
    )
    error = answered(cluster.client.queries.ComputeScores, request)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit is 10000 (--max-top-k)" in error.details(), error.details()
    big = gradient_service_pb2.RegisterDatasetRequest(
        model=common_pb2.ModelSpec(path=model), jsonl=b'{"text": "w1"}\n' * (2**20 // 15 + 1)
    )
    error = answered(cluster.client.gradients.RegisterDataset, big)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit is 1048576 (--max-upload-bytes)" in error.details(), error.details()


@settings(max_examples=150, deadline=None)
@given(content=st.binary(max_size=400), kind=st.sampled_from(["training", "queries"]))
def test_the_clis_input_files_are_read_or_refused_naming_the_file(tmp_path_factory, content, kind):
    path = tmp_path_factory.mktemp("fuzz") / f"{kind}.jsonl"
    path.write_bytes(content)
    try:
        records = read_training_jsonl(path) if kind == "training" else read_queries_jsonl(path)
    except DomainError as error:
        assert error.exit_code == 2 and str(path) in str(error) and "\n" not in str(error), error
        return
    assert records and len({record.id for record in records}) == len(records)
