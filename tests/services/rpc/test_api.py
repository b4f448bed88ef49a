"""The public API's conventions, over real gRPC against `influence serve` (real Redis and S3):
enums on the wire, rich error details, opaque page tokens and filters, results that can be listed
and deleted, file streams that resume, datasets registered from an s3:// URI."""

from __future__ import annotations

import filecmp
import json
import uuid

import grpc
import pytest
from google.longrunning import operations_pb2
from google.rpc import error_details_pb2, status_pb2

from services.client import InfluenceClient, model_spec
from services.client.connection import operation_metadata
from services.errors import InputError, NotFoundError
from services.gen.influence.v1 import common_pb2, factor_service_pb2, gradient_service_pb2, query_service_pb2
from services.storage import S3Store


def _rich_status(error: grpc.RpcError) -> status_pb2.Status:
    details = dict(error.trailing_metadata())["grpc-status-details-bin"]
    return status_pb2.Status.FromString(details)


def _unpacked(status: status_pb2.Status, kind):
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            return message
    raise AssertionError(f"no {kind.DESCRIPTOR.name} in {status}")


QUERIES = [query_service_pb2.Query(id="q", prompt="w1 w2", completion="w3")]


@pytest.fixture(scope="module")
def scored(served, workspace):
    """A dataset, a KFAC factor set and a score result on the served system, which the tests only
    read (a test that deletes makes its own)."""
    target, _ = served
    with InfluenceClient(target) as client:
        model = model_spec(workspace / "model")
        dataset = client.register_dataset(model, workspace / "train.jsonl")
        factor_set = client.fit_factors(model, dataset.name, strategy="kfac", fisher="empirical")
        result = client.compute_scores(model, factor_set.name, dataset.name, QUERIES, top_k=3)
    return target, model, dataset, factor_set, result


def test_enums_travel_as_enums_and_unknown_values_are_refused_with_rich_details(scored):
    target, model, dataset, factor_set, _ = scored
    assert factor_set.strategy == factor_service_pb2.STRATEGY_KFAC
    assert factor_set.fisher == factor_service_pb2.FISHER_EMPIRICAL
    with InfluenceClient(target) as client:
        assert client.get_factor_set(factor_set.name).strategy == factor_service_pb2.STRATEGY_KFAC
        request = factor_service_pb2.FitFactorsRequest(model=model, dataset=dataset.name, strategy=99)
        with pytest.raises(grpc.RpcError) as raised:
            client.factors.FitFactors(request)
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "strategy has no value 99" in error.details()
    status = _rich_status(error)
    info = _unpacked(status, error_details_pb2.ErrorInfo)
    assert (info.domain, info.reason) == ("influence.dev", "INPUT")
    assert [v.field for v in _unpacked(status, error_details_pb2.BadRequest).field_violations] == ["strategy"]


def test_a_word_the_enum_lacks_is_refused_before_anything_is_sent(scored):
    target, model, dataset, _, _ = scored
    with InfluenceClient(target) as client, pytest.raises(InputError, match="strategy must be one of"):
        client.fit_factors(model, dataset.name, strategy="magic")
    with pytest.raises(InputError, match="device must be one of cpu, cuda"):
        model_spec("/m", device="tpu")


def test_results_are_listed_in_opaque_pages_and_can_be_deleted(scored):
    target, model, dataset, factor_set, _ = scored
    with InfluenceClient(target) as client:
        names = [client.compute_scores(model, factor_set.name, dataset.name, QUERIES, top_k=3).name for _ in range(2)]
        first = client.queries.ListScoreResults(query_service_pb2.ListScoreResultsRequest(page_size=1))
        assert len(first.score_results) == 1 and first.next_page_token
        assert not first.next_page_token.isdigit()  # opaque, not an offset
        listed = [result.name for result in client.list_results()]
        assert set(names) <= set(listed) and listed == sorted(listed)
        ours = [result for result in client.list_results() if result.name in names]
        assert [r.kind for r in ours] == [query_service_pb2.RESULT_KIND_PAIRWISE] * 2
        assert all(r.create_time.seconds > 0 for r in ours)
        # a token of another collection is refused, not silently reinterpreted
        with pytest.raises(grpc.RpcError) as raised:
            client.gradients.ListDatasets(gradient_service_pb2.ListDatasetsRequest(page_token=first.next_page_token))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        client.delete_result(names[0])
        with pytest.raises(NotFoundError):
            client.get_result(names[0])
        with pytest.raises(NotFoundError):
            client.delete_result(names[0])
        assert names[0] not in [result.name for result in client.list_results()]
        assert names[1] in [result.name for result in client.list_results()]
        client.delete_result(names[1])


def test_the_last_page_is_never_empty(scored):
    target, *_ = scored
    with InfluenceClient(target) as client:
        total = len(client.list_results())
        page = client.queries.ListScoreResults(query_service_pb2.ListScoreResultsRequest(page_size=total))
        assert len(page.score_results) == total and page.next_page_token == ""


def test_operations_filter_is_aip160_and_unknown_terms_are_refused(scored):
    target, *_ = scored
    with InfluenceClient(target) as client:
        request = operations_pb2.ListOperationsRequest(filter='kind = "compute_scores" AND state = SUCCEEDED')
        filtered = []
        while True:
            page = client.operations.ListOperations(request)
            filtered += [operation.name for operation in page.operations]
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
        expected = [
            operation.name
            for operation in client.list_operations()  # all of them, filtered here
            if operation_metadata(operation).kind == "compute_scores"
            and operation.done
            and not operation.HasField("error")
        ]
        assert expected and sorted(filtered) == sorted(expected)  # the module's score, at least
        for bad in ("owner = me", "kind = nonsense", "kind ~ fit"):
            with pytest.raises(grpc.RpcError) as raised:
                client.operations.ListOperations(operations_pb2.ListOperationsRequest(filter=bad))
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad


def test_a_broken_file_stream_resumes_where_it_stopped(scored, tmp_path):
    target, _, _, _, result = scored
    name = result.name
    with InfluenceClient(target) as client:
        clean = client.download_result(name, tmp_path / "clean")
        real = client.queries.StreamResultFiles
        calls = []

        class Dropped(grpc.RpcError):
            def code(self):
                return grpc.StatusCode.UNAVAILABLE

            def details(self):
                return "connection dropped (test)"

        def flaky(request, **kwargs):
            """The real stream, cut after two chunks on each of the first two calls."""
            calls.append((request.resume_file, request.resume_offset))
            request.chunk_bytes = 64
            for number, chunk in enumerate(real(request, **kwargs)):
                if len(calls) <= 2 and number == 2:
                    raise Dropped()
                yield chunk

        client.queries.StreamResultFiles = flaky
        resumed = client.download_result(name, tmp_path / "resumed")
    assert len(calls) == 3 and calls[0] == ("", 0) and calls[1][1] > 0
    files = sorted(path.name for path in clean.iterdir())
    assert files == sorted(path.name for path in resumed.iterdir())
    assert filecmp.cmpfiles(clean, resumed, files, shallow=False)[0] == files


def test_resume_outside_the_artifact_is_refused(scored):
    target, _, _, _, result = scored
    with InfluenceClient(target) as client:
        for request, field in (
            (common_pb2.StreamArtifactFilesRequest(name=result.name, resume_file="nope.bin"), "resume_file"),
            (
                common_pb2.StreamArtifactFilesRequest(
                    name=result.name, resume_file="results.json", resume_offset=10**9
                ),
                "resume_offset",
            ),
        ):
            with pytest.raises(grpc.RpcError) as raised:
                list(client.queries.StreamResultFiles(request))
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            violations = _unpacked(_rich_status(raised.value), error_details_pb2.BadRequest).field_violations
            assert [v.field for v in violations] == [field]


def test_a_dataset_registers_from_an_s3_uri_without_passing_through_the_api(scored, s3_server, workspace):
    target, model, dataset, _, _ = scored
    bucket = f"uploads-{uuid.uuid4().hex[:8]}"
    store = S3Store(s3_server.endpoint, bucket, s3_server.access_key, s3_server.secret_key)
    store.put_bytes("corpora/train.jsonl", (workspace / "train.jsonl").read_bytes())
    store.put_bytes("corpora/broken.jsonl", b'{"text": "w1 w2"}\n{"text": "w3 \xff"}\n')
    with InfluenceClient(target) as client:
        registered = client.register_dataset(model, f"s3://{bucket}/corpora/train.jsonl")
        assert registered.num_examples == dataset.num_examples and registered.num_tokens == dataset.num_tokens
        with pytest.raises(NotFoundError, match="training data not found"):
            client.register_dataset(model, f"s3://{bucket}/corpora/missing.jsonl")
        with pytest.raises(InputError, match="2: not UTF-8 text"):
            client.register_dataset(model, f"s3://{bucket}/corpora/broken.jsonl")
        with pytest.raises(InputError, match="s3://BUCKET/KEY"):
            client.register_dataset(model, f"s3://{bucket}")
    rows = [json.loads(line) for line in (workspace / "train.jsonl").read_text().splitlines()]
    assert registered.num_examples == len(rows)
