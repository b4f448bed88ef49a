"""The service system end to end: real redis-server, real S3 server (SeaweedFS), real gRPC over
loopback, workers as threads or as separate processes.

Equality with the in-process engine: the distributed fit sums the same per-shard float64
partials in a fixed order, so factors agree to float32 round-off of the stored tensors; scores
are asserted to 1e-5 relative (float32 storage of factors and scores).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import grpc
import pytest
import torch
from google.longrunning import operations_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from services.catalog.datasets import parse_dataset_path
from services.catalog.factor_sets import factor_set_path, load_factors
from services.engine.budget import (
    GIB,
    STATE_SHARE,
    USABLE_SHARE,
    WorkerBudget,
    module_groups,
    module_state_bytes,
    query_state_bytes,
)
from services.engine.capture import describe_all
from services.engine.fit import FitConfig, fit_factors, plan_model_fit
from services.engine.model_io import ModelRef, load_model_and_tokenizer, model_skeleton
from services.engine.modules import select_modules
from services.engine.records import read_training_jsonl
from services.engine.score import ScoreConfig, compute_scores, compute_self_influence, plan_model_score
from services.errors import DataLossError, InputError, NotFoundError, PreconditionError, ResourceExhaustedError
from services.factor_svc.jobs import FitJob
from services.gen.influence.v1 import common_pb2, factor_service_pb2, gradient_service_pb2, query_service_pb2
from services.system.caches import ArtifactCache
from tests.support.servers.ports import wait_until
from tests.support.system import QUERIES, Cluster, make_examples, unique_jsonl, write_jsonl


def test_register_fit_score_self_over_grpc_equal_the_in_process_engine(cluster, workspace, tmp_path):
    client, model = cluster.client, str(workspace / "model")
    earlier = {record["id"] for record in cluster.system.operations.list(1000)[0]}
    dataset = client.register_dataset(model, workspace / "train.jsonl", shard_size=5, max_length=64)
    assert (dataset.num_examples, dataset.num_shards) == (23, 5)
    seen_stages = []
    factor_set = client.fit_factors(model, dataset.name, batch_size=3, progress=lambda m: seen_stages.append(m.stage))
    # progress is sampled between waits, so any stage may be missed, but what is seen follows the
    # multi-shard plan in order and ends with done
    plan = ["covariance", "eigen", "correction", "finalize", "done"]
    distinct = [stage for position, stage in enumerate(seen_stages) if stage and stage not in seen_stages[:position]]
    assert distinct[-1] == "done" and all(stage in plan for stage in distinct), seen_stages
    assert [plan.index(stage) for stage in distinct] == sorted(plan.index(stage) for stage in distinct), seen_stages
    result = client.compute_scores(
        model,
        factor_set.name,
        dataset.name,
        QUERIES,
        batch_size=3,
        top_k=4,
        bottom_k=2,
        per_module=True,
        per_token=True,
    )
    self_result = client.compute_self_influence(model, factor_set.name, dataset.name, batch_size=3)
    client.download_result(result.name, tmp_path / "scores")
    client.download_result(self_result.name, tmp_path / "self")
    client.download_factors(factor_set.name, tmp_path / "factors")

    examples = read_training_jsonl(workspace / "train.jsonl")
    engine_model, tokenizer = load_model_and_tokenizer(model)
    local = fit_factors(engine_model, tokenizer, examples, FitConfig(batch_size=3, max_length=64))
    remote = load_factors(tmp_path / "factors")
    for name, factors in local.factors.items():
        # float32 captures summed per shard: round-off ~1e-7 of the largest eigenvalue
        scale = float(factors.diagonal().abs().max())
        torch.testing.assert_close(remote.factors[name].diagonal(), factors.diagonal(), rtol=1e-4, atol=1e-6 * scale)
    config = ScoreConfig(batch_size=3, max_length=64, top_k=4)
    expected = compute_scores(engine_model, tokenizer, local, examples, QUERIES, config).scores
    actual = load_file(str(tmp_path / "scores" / "scores.safetensors"))["scores"]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    expected_self = compute_self_influence(engine_model, tokenizer, local, examples, config)
    torch.testing.assert_close(
        load_file(str(tmp_path / "self" / "scores.safetensors"))["scores"], expected_self, rtol=1e-5, atol=0
    )

    report = json.loads((tmp_path / "scores" / "results.json").read_text())
    first = report["queries"][0]["top"][0]
    assert sum(t["score"] for t in first["tokens"]) == pytest.approx(first["score"], rel=1e-4)
    rows = list(client.score_rows(result.name))
    assert len(rows) == 3 * 4 and rows[0].train_id == first["id"] and rows[0].tokens
    assert not any(row.bottom for row in rows)
    both = list(client.score_rows(result.name, include_bottom=True))  # each query's top 4, then its bottom 2
    expected_order = [(False, 1), (False, 2), (False, 3), (False, 4), (True, 1), (True, 2)]
    assert [(row.bottom, row.rank) for row in both[:6]] == expected_order
    assert [row.train_id for row in both if row.bottom] == [e["id"] for q in report["queries"] for e in q["bottom"]]
    assert both[4].score <= both[5].score <= both[3].score  # the most negative first, under the top
    assert [d.name for d in client.list_datasets()].count(dataset.name) == 1
    assert [f.name for f in client.list_factor_sets()].count(factor_set.name) == 1

    # A succeeded job leaves no intermediates behind (the worker deletes jobs/{id}/ right after
    # recording success, so allow it a moment).
    ours = [r for r in cluster.system.operations.list(1000)[0] if r["id"] not in earlier]
    # (and a register_dataset, unless another test of the module registered the same data first)
    assert sorted(r["kind"] for r in ours if r["kind"] != "register_dataset") == [
        "compute_scores",
        "compute_self_influence",
        "fit_factors",
    ]
    succeeded = [r["id"] for r in ours if r["state"] == "SUCCEEDED"]
    assert len(succeeded) == len(ours)
    deadline = time.monotonic() + 10
    while any(cluster.store.list(f"jobs/{job}/") for job in succeeded) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [job for job in succeeded if cluster.store.list(f"jobs/{job}/")]


def test_a_one_shard_dataset_runs_each_job_as_one_task_with_the_same_results(cluster, workspace, tmp_path):
    """fit_one_shard / score_one_shard chain the stages in memory: the factors of every strategy
    and the scores (with module and token breakdowns) still equal the in-process engine's."""
    client, model = cluster.client, str(workspace / "model")
    dataset = client.register_dataset(model, workspace / "train.jsonl", shard_size=100, max_length=64)
    assert dataset.num_shards == 1
    examples = read_training_jsonl(workspace / "train.jsonl")
    engine_model, tokenizer = load_model_and_tokenizer(model)
    stages: list[str] = []
    for strategy in ("kfac", "diagonal", "ekfac"):  # ekfac last: the scores below use it
        stages.clear()
        factor_set = client.fit_factors(
            model, dataset.name, batch_size=3, strategy=strategy, progress=lambda m: stages.append(m.stage)
        )
        assert set(stages) <= {"fit_one_shard", "done"}, stages
        client.download_factors(factor_set.name, tmp_path / strategy)
        remote = load_factors(tmp_path / strategy)
        local = fit_factors(
            engine_model, tokenizer, examples, FitConfig(strategy=strategy, batch_size=3, max_length=64)
        )
        for name, factors in local.factors.items():
            for key, value in factors.tensors().items():
                scale = float(value.abs().max())
                torch.testing.assert_close(
                    remote.factors[name].tensors()[key], value.float(), rtol=1e-4, atol=1e-6 * scale, msg=key
                )
    stages.clear()
    result = client.compute_scores(
        model,
        factor_set.name,
        dataset.name,
        QUERIES,
        batch_size=3,
        top_k=4,
        per_module=True,
        per_token=True,
        progress=lambda m: stages.append(m.stage),
    )
    assert set(stages) <= {"score_one_shard", "done"}, stages
    client.download_result(result.name, tmp_path / "scores")
    expected = compute_scores(
        engine_model, tokenizer, local, examples, QUERIES, ScoreConfig(batch_size=3, max_length=64)
    )
    actual = load_file(str(tmp_path / "scores" / "scores.safetensors"))["scores"]
    torch.testing.assert_close(actual, expected.scores, rtol=1e-5, atol=1e-5 * float(expected.scores.abs().max()))
    first = json.loads((tmp_path / "scores" / "results.json").read_text())["queries"][0]["top"][0]
    assert sum(t["score"] for t in first["tokens"]) == pytest.approx(first["score"], rel=1e-4)


def test_the_score_stages_equal_the_in_memory_chain_bit_for_bit(cluster, workspace, tmp_path):
    """One scoring orchestration: a five-shard dataset (prepare -> score x5 -> merge), a one-shard
    dataset (score_one_shard, the engine's score_in_memory) and the in-process engine give the same
    scores, breakdowns, TF-IDF candidates, top-k and token scores bit for bit when each batch is one
    sequence (sharding then changes no arithmetic)."""
    client, model = cluster.client, str(workspace / "model")
    sharded = client.register_dataset(model, workspace / "train.jsonl", shard_size=5, max_length=64)
    whole = client.register_dataset(model, workspace / "train.jsonl", shard_size=100, max_length=64)
    assert (sharded.num_shards, whole.num_shards) == (5, 1)
    factor_set = client.fit_factors(model, whole.name, batch_size=3)
    options = {"batch_size": 1, "top_k": 4, "per_module": True, "per_token": True, "tfidf": 4}
    outputs, stages = [], []
    for dataset, plan in ((sharded, {"prepare", "score", "merge"}), (whole, {"score_one_shard"})):
        stages.clear()
        result = client.compute_scores(
            model, factor_set.name, dataset.name, QUERIES, progress=lambda m: stages.append(m.stage), **options
        )
        assert set(stages) <= plan | {"done"}, stages
        out = tmp_path / f"scores-{dataset.num_shards}"
        client.download_result(result.name, out)
        outputs.append((load_file(str(out / "scores.safetensors")), json.loads((out / "results.json").read_text())))
    (sharded_tensors, sharded_report), (whole_tensors, whole_report) = outputs
    assert set(whole_tensors) == {"scores", "per_module", "scored", "top_index", "top_per_module"}
    assert set(sharded_tensors) == set(whole_tensors)
    for key, value in whole_tensors.items():
        assert torch.equal(sharded_tensors[key], value), key
    assert not bool(whole_tensors["scored"].any(0).all()), "some sequences are no query's TF-IDF candidate"
    assert sharded_report["queries"] == whole_report["queries"]
    assert sharded_report["tfidf"] == whole_report["tfidf"]
    assert all(entry["tokens"] for query in whole_report["queries"] for entry in query["top"])

    client.download_factors(factor_set.name, tmp_path / "factors")
    engine_model, tokenizer = load_model_and_tokenizer(model)
    expected = compute_scores(
        engine_model,
        tokenizer,
        load_factors(tmp_path / "factors"),
        read_training_jsonl(workspace / "train.jsonl"),
        QUERIES,
        ScoreConfig(max_length=64, **options),
    )
    assert torch.equal(whole_tensors["scores"], expected.scores)
    assert torch.equal(whole_tensors["per_module"], expected.per_module)
    assert torch.equal(whole_tensors["top_index"], torch.tensor([[e.index for e in top] for top in expected.top]))


def test_health_and_reflection_answer_on_every_service(cluster):
    channel = grpc.insecure_channel(cluster.server.target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "influence.v1.FactorService", "influence.v1.GradientService", "influence.v1.QueryService"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in next(responses).list_services_response.service}
    assert {"influence.v1.FactorService", "google.longrunning.Operations"} <= names
    channel.close()


def test_create_calls_are_idempotent_by_request_id(cluster, workspace):
    request = gradient_service_pb2.RegisterDatasetRequest(
        request_id=uuid.uuid4().hex,
        model=common_pb2.ModelSpec(path=str(workspace / "model")),
        jsonl=unique_jsonl(workspace),  # new data: the first call starts a job, not a published dataset's answer
        shard_size=10,
    )
    before = {d.name for d in cluster.client.list_datasets()}
    first = cluster.client.gradients.RegisterDataset(request)
    assert not first.done
    second = cluster.client.gradients.RegisterDataset(request)
    assert first.name == second.name
    cluster.client.wait(first)
    assert len({d.name for d in cluster.client.list_datasets()} - before) == 1


def test_wait_operation_returns_when_the_operation_ends_not_at_its_next_recheck(cluster, workspace, monkeypatch):
    """The Redis notification, not the fallback re-read (set to a minute here), ends the wait."""
    from google.protobuf import duration_pb2

    from services.rpc.operations import OperationsServicer

    monkeypatch.setattr(OperationsServicer, "RECHECK_SECONDS", 60.0)
    request = gradient_service_pb2.RegisterDatasetRequest(
        request_id=uuid.uuid4().hex,
        model=common_pb2.ModelSpec(path=str(workspace / "model")),
        jsonl=unique_jsonl(workspace),  # new data: a job to wait for
        shard_size=10,
    )
    operation = cluster.client.gradients.RegisterDataset(request)
    assert not operation.done
    started = time.monotonic()
    waited = cluster.client.operations.WaitOperation(
        operations_pb2.WaitOperationRequest(name=operation.name, timeout=duration_pb2.Duration(seconds=60)),
        timeout=90,
    )
    assert waited.done and not waited.HasField("error")
    assert time.monotonic() - started < 30  # the task takes well under a second; the recheck is at 60 s


def test_wait_operation_still_ends_when_the_notification_is_lost(cluster, workspace, monkeypatch):
    """Pub/sub may drop a message: the waiter's periodic re-read of the record then ends the wait."""
    from services.jobs.ended import EndedWatcher
    from services.rpc.operations import OperationsServicer

    monkeypatch.setattr(OperationsServicer, "RECHECK_SECONDS", 0.05)
    monkeypatch.setattr(EndedWatcher, "_notify", lambda self, operation_id: None)
    request = gradient_service_pb2.RegisterDatasetRequest(
        model=common_pb2.ModelSpec(path=str(workspace / "model")), jsonl=unique_jsonl(workspace), shard_size=10
    )
    operation = cluster.client.gradients.RegisterDataset(request)  # new data: a job to wait for
    assert not operation.done
    dataset = cluster.client.unpack(cluster.client.wait(operation, timeout=60), gradient_service_pb2.Dataset)
    assert dataset.num_examples == 24


def _fit(c, **fields):
    return factor_service_pb2.FitFactorsRequest(**{"model": c.model, "dataset": c.dataset, **fields})


Q = query_service_pb2.Query


def _score(c, **fields):
    query = Q(prompt="w1", completion="w2")
    defaults = {"model": c.model, "factor_set": c.factor_set, "dataset": c.dataset, "queries": [query]}
    return query_service_pb2.ComputeScoresRequest(**{**defaults, **fields})


def _register(c, **fields):
    return gradient_service_pb2.RegisterDatasetRequest(model=c.model, **fields)


# id, the client's stub and method, the request (from the module's valid parts: model, dataset,
# identity factor set), the status, and what its message must say
BAD_REQUESTS = [
    ("unknown-dataset", "factors.FitFactors", lambda c: _fit(c, dataset="datasets/nope"),
     "NOT_FOUND", "dataset 'datasets/nope' not found"),
    ("malformed-name", "gradients.GetDataset", lambda c: gradient_service_pb2.GetDatasetRequest(name="nope"),
     "INVALID_ARGUMENT", "name must look like 'datasets/ID'"),
    ("missing-model", "factors.FitFactors", lambda c: _fit(c, model=None),
     "INVALID_ARGUMENT", "model.path is required"),
    ("model-directory-not-found", "factors.FitFactors", lambda c: _fit(c, model=common_pb2.ModelSpec(path="/no/such")),
     "NOT_FOUND", "model directory not found"),
    ("unknown-strategy", "factors.FitFactors", lambda c: _fit(c, strategy=99),
     "INVALID_ARGUMENT", "strategy has no value 99"),
    ("tokenizer-mismatch", "factors.FitFactors", lambda c: _fit(c, model=c.other_vocab),
     "FAILED_PRECONDITION", "tokenised with another tokenizer"),
    ("empty-queries", "queries.ComputeScores", lambda c: _score(c, queries=[]),
     "INVALID_ARGUMENT", "queries is empty"),
    ("empty-completion", "queries.ComputeScores", lambda c: _score(c, queries=[Q(prompt="w1", completion=" ")]),
     "INVALID_ARGUMENT", "'completion' is empty"),
    ("negative-top-k", "queries.ComputeScores", lambda c: _score(c, top_k=-1),
     "INVALID_ARGUMENT", "top_k must be >= 0"),
    ("unknown-factor-set", "queries.ComputeScores", lambda c: _score(c, factor_set="factorSets/nope"),
     "NOT_FOUND", "factor set 'factorSets/nope' not found"),
    ("malformed-jsonl", "gradients.RegisterDataset", lambda c: _register(c, jsonl=b'{"text": "w1"}\n{oops\n'),
     "INVALID_ARGUMENT", "jsonl:2: malformed JSON"),
    ("empty-upload", "gradients.RegisterDataset", lambda c: _register(c),
     "INVALID_ARGUMENT", "jsonl is empty"),
    ("oversize-upload", "gradients.RegisterDataset", lambda c: _register(c, jsonl=b'{"text": "w1 w2"}\n' * 70_000),
     "RESOURCE_EXHAUSTED", "this server's limit is 1048576 (--max-upload-bytes)"),
    ("unknown-operation", "operations.GetOperation",
     lambda c: operations_pb2.GetOperationRequest(name="operations/nope"),
     "NOT_FOUND", "operation 'operations/nope' not found"),
    ("bad-page-token", "gradients.ListDatasets", lambda c: gradient_service_pb2.ListDatasetsRequest(page_token="x"),
     "INVALID_ARGUMENT", "page_token is not one this server issued"),
]  # fmt: skip


@pytest.fixture(scope="module")
def valid_parts(cluster, workspace):
    """What a bad request is made of besides its one bad part: the model, a dataset and an
    identity factor set on the module's cluster."""
    client, model = cluster.client, str(workspace / "model")
    dataset = client.register_dataset(model, workspace / "train.jsonl", shard_size=10)
    factor_set = client.fit_factors(model, dataset.name, strategy="identity")
    return SimpleNamespace(
        model=common_pb2.ModelSpec(path=model),
        other_vocab=common_pb2.ModelSpec(path=str(workspace / "other-vocab")),
        dataset=dataset.name,
        factor_set=factor_set.name,
    )


@pytest.mark.parametrize(
    ("call", "request_of", "code", "message"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_get_the_right_status_and_a_clear_message(cluster, valid_parts, call, request_of, code, message):
    stub, method = call.split(".")
    with pytest.raises(grpc.RpcError) as raised:
        getattr(getattr(cluster.client, stub), method)(request_of(valid_parts))
    assert raised.value.code() == grpc.StatusCode[code], raised.value.details()
    assert message in raised.value.details()


def test_factors_of_another_model_fail_the_operation_with_failed_precondition(cluster, workspace):
    client = cluster.client
    dataset = client.register_dataset(str(workspace / "model"), workspace / "train.jsonl", shard_size=10)
    factor_set = client.fit_factors(str(workspace / "model"), dataset.name, strategy="kfac")
    with pytest.raises(PreconditionError, match="another model"):
        client.compute_scores(str(workspace / "other-model"), factor_set.name, dataset.name, QUERIES)
    with pytest.raises(NotFoundError):
        client.get_result("results/nope")
    with pytest.raises(InputError, match="must look like"):
        client.get_factor_set("factors/x")


def test_cancellation_reaches_running_tasks(cluster, workspace, tmp_path):
    client, model = cluster.client, str(workspace / "model")
    examples = make_examples(400, seed=3, max_len=40)
    write_jsonl(tmp_path / "big.jsonl", [{"text": e.text} for e in examples])
    dataset = client.register_dataset(model, tmp_path / "big.jsonl", shard_size=400)
    request = factor_service_pb2.FitFactorsRequest(
        model=common_pb2.ModelSpec(path=model), dataset=dataset.name, batch_size=1, request_id=uuid.uuid4().hex
    )
    operation = client.factors.FitFactors(request)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        record = cluster.system.operations.get(operation.name.split("/")[1])
        if record["counters"].get("tokens_processed", 0) > 0:
            break
        time.sleep(0.05)
    client.operations.CancelOperation(operations_pb2.CancelOperationRequest(name=operation.name))
    started = time.monotonic()
    while cluster.system.queue.depth("covariance") and time.monotonic() - started < 20:
        time.sleep(0.1)
    assert cluster.system.queue.depth("covariance") == 0, "the running task should stop between batches"
    assert time.monotonic() - started < 10
    done = client.operations.GetOperation(operations_pb2.GetOperationRequest(name=operation.name))
    assert done.done and done.error.code == 1  # CANCELLED
    assert cluster.system.queue.depth("eigen") == 0


def test_a_task_that_keeps_failing_is_dead_lettered_and_fails_its_operation(redis_server, s3_server, workspace):
    cluster = Cluster(redis_server.url, s3_server.url(f"b{uuid.uuid4().hex[:10]}"), lease_seconds=0.5, max_deliveries=2)
    try:
        client, model = cluster.client, str(workspace / "model")
        dataset = client.register_dataset(model, workspace / "train.jsonl", shard_size=10)
        dataset_id = dataset.name.split("/")[1]
        prefix = f"datasets/{dataset_id}/"
        # The worker that registered the dataset keeps the shards it wrote and would never read
        # the damaged copies below: start it afresh, as another worker would be.
        cluster.workers[0].context.artifacts = ArtifactCache()

        # A shard whose bytes differ from its manifest: an integrity error fails the job at once.
        good = cluster.store.get_bytes(prefix + "shards/00001.safetensors")
        cluster.store.put_bytes(prefix + "shards/00001.safetensors", b"not a safetensors file")
        with pytest.raises(DataLossError, match="corrupted"):
            client.fit_factors(model, dataset.name)

        def replace_shard(data: bytes) -> None:
            """Write `data` as shard 1 and make the manifest vouch for it (a bad writer)."""
            cluster.store.put_bytes(prefix + "shards/00001.safetensors", data)
            manifest = json.loads(cluster.store.get_bytes(prefix + "manifest.json"))
            manifest["files"]["shards/00001.safetensors"] = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
            }
            cluster.store.put_bytes(prefix + "manifest.json", json.dumps(manifest).encode())

        # Bytes the manifest vouches for but that are no safetensors file: fails at once too.
        replace_shard(b"not a safetensors file")
        with pytest.raises(DataLossError, match="not a valid safetensors file"):
            client.fit_factors(model, dataset.name)

        # A valid file without the tensors a shard holds: an unexpected error, so the task is
        # retried; after the delivery limit it is dead-lettered and the operation fails with it.
        replace_shard(save_tensors({"unrelated": torch.zeros(3)}))
        # (its caller reads no internals; the dead letter keeps the cause for the operator)
        with pytest.raises(Exception, match=r"failed 2 times; last error: internal error: the server's log"):
            client.fit_factors(model, dataset.name)
        letters = cluster.system.queue.dead_letters("covariance")
        assert len(letters) == 1 and b"failed 2 times; last error: KeyError" in letters[0]["cause"]
        assert good
    finally:
        cluster.close()


@pytest.mark.slow
def test_a_worker_killed_mid_task_does_not_change_the_result(redis_server, s3_server, workspace, tmp_path):
    """SIGKILL a worker process during a covariance task; another worker reclaims the task after
    its lease and the factors equal those of an undisturbed run bit for bit."""
    store_url = s3_server.url(f"b{uuid.uuid4().hex[:10]}")
    examples = make_examples(240, seed=4, max_len=60)
    write_jsonl(tmp_path / "train.jsonl", [{"id": e.id, "text": e.text} for e in examples])
    model = str(workspace / "model")

    def run(kill: bool) -> dict:
        cluster = Cluster(redis_server.url, store_url, workers=0, lease_seconds=1.0)
        env = {
            **os.environ,
            "INFLUENCE_S3_ACCESS_KEY": s3_server.access_key,
            "INFLUENCE_S3_SECRET_KEY": s3_server.secret_key,
        }
        command = [
            sys.executable,
            "-m",
            "services.cli",
            "worker",
            "--redis-url",
            redis_server.url,
            "--store-url",
            store_url,
            "--lease-seconds",
            "1",
            "--log-level",
            "warning",
        ]
        prefix_env = {**env, "INFLUENCE_QUEUE_PREFIX": cluster.prefix}
        first = subprocess.Popen(command, env=prefix_env, start_new_session=True)
        second = None
        try:
            dataset = cluster.client.register_dataset(model, tmp_path / "train.jsonl", shard_size=80, max_length=64)
            operation = cluster.client.factors.FitFactors(
                factor_service_pb2.FitFactorsRequest(
                    model=common_pb2.ModelSpec(path=model), dataset=dataset.name, batch_size=2
                )
            )
            operation_id = operation.name.split("/")[1]
            if kill:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    record = cluster.system.operations.get(operation_id)
                    if record["counters"].get("tokens_processed", 0) > 0:
                        break
                    time.sleep(0.02)
                os.killpg(first.pid, signal.SIGKILL)
                first.wait(10)
            second = subprocess.Popen(command, env=prefix_env, start_new_session=True) if kill else None
            factor_set = cluster.client.unpack(
                cluster.client.wait(operation, timeout=240), factor_service_pb2.FactorSet
            )
            out = tmp_path / ("killed" if kill else "undisturbed")
            cluster.client.download_factors(factor_set.name, out)
            return {"factors": load_factors(out), "record": cluster.system.operations.get(operation_id)}
        finally:
            for process in (first, second):
                if process is not None and process.poll() is None:
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(30)
            cluster.close()

    undisturbed = run(kill=False)
    killed = run(kill=True)
    for name, factors in undisturbed["factors"].factors.items():
        for field, value in factors.tensors().items():
            assert torch.equal(getattr(killed["factors"].factors[name], field), value), (name, field)
    assert killed["record"]["state"] == "SUCCEEDED"


def test_stream_blocks_relays_a_workers_job_and_a_consumer_leaving_cancels_it(cluster, workspace):
    client, model = cluster.client, str(workspace / "model")
    dataset = client.register_dataset(model, workspace / "train.jsonl", shard_size=23)

    def stream(**fields):
        request = gradient_service_pb2.StreamBlocksRequest(
            dataset=dataset.name, shard=0, model=common_pb2.ModelSpec(path=model), **fields
        )
        return client.gradients.StreamBlocks(request)

    def blocks_jobs() -> list[dict]:
        return [r for r in cluster.system.operations.list(100)[0] if r["kind"] == "stream_blocks"]

    # A complete stream: every sequence once, in order, and the worker's blocks deleted after.
    blocks = list(stream(block_size=5))
    assert [len(b.example_ids) for b in blocks] == [5, 5, 5, 5, 3]
    assert [i for b in blocks for i in b.example_ids] == [f"t{n}" for n in range(23)]
    (finished,) = blocks_jobs()
    assert finished["state"] == "SUCCEEDED"
    assert not cluster.store.list(f"jobs/{finished['id']}/blocks/")

    # A consumer that leaves after one block cancels the worker's job.
    responses = stream(block_size=1)
    next(responses)
    responses.cancel()
    wait_until(lambda: any(r["state"] == "CANCELLED" for r in blocks_jobs()), 20, "the blocks job cancelled")

    # A job that fails on the worker ends the stream with the job's status code.
    with pytest.raises(grpc.RpcError) as raised:
        list(stream(modules=r"^nothing\.matches$"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "matches no linear module" in raised.value.details()


def test_a_fit_over_a_workers_budget_runs_per_shard_and_module_group_with_the_same_factors(
    cluster, workspace, tmp_path
):
    """A fit planned in module groups (FitJob.module_groups, what the servicer plans when the factors
    exceed its workers' budget: engine/budget.py; a tiny model's would not, so the groups are given
    here): covariance, eigen and correction run per (shard, group), each group's sums and eigenbases
    written and read on their own, and the factor files are the bytes of the one-group fit's."""
    client, model = cluster.client, str(workspace / "model")
    dataset = client.register_dataset(model, workspace / "train.jsonl", shard_size=8, max_length=64)
    assert dataset.num_shards == 3
    whole = client.fit_factors(model, dataset.name, batch_size=3, modules="all")
    skeleton = model_skeleton(model)
    tracked = describe_all(select_modules(skeleton, "all"))
    groups = module_groups(tracked, max(module_state_bytes(m) for m in tracked.values()))
    assert len(groups) >= 4
    job = FitJob(
        ModelRef(model, ""),
        dataset_id=parse_dataset_path(dataset.name),
        shards=3,
        factor_set_id=uuid.uuid4().hex[:20],
        config=FitConfig(modules="all", batch_size=3, max_length=64),
        module_groups=groups,
        batch_size=3,
    )
    record = cluster.system.submit("fit_factors", job, target=factor_set_path(job.factor_set_id))
    stages = []
    done = client.wait_for(f"operations/{record['id']}", lambda m: stages.append((m.stage, m.shards_total)))
    grouped = client.unpack(done, factor_service_pb2.FactorSet)
    assert ("covariance", 3 * len(groups)) in stages or ("eigen", len(groups)) in stages, stages
    client.download_factors(whole.name, tmp_path / "whole")
    client.download_factors(grouped.name, tmp_path / "grouped")
    files = sorted(path.name for path in (tmp_path / "whole").glob("*.safetensors"))
    assert files == sorted(path.name for path in (tmp_path / "grouped").glob("*.safetensors")) and files
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "grouped" / name).read_bytes(), name
    provenance = json.loads((tmp_path / "grouped" / "manifest.json").read_text())["metadata"]["provenance"]
    assert provenance["module_groups"] == len(groups) and provenance["effective_batch_sizes"] == [3]


def _host_gib_for_groups(weights: int, state_bytes: int) -> str:
    """INFLUENCE_WORKER_HOST_GIB of a worker whose module groups hold at most `state_bytes` of state
    (engine/budget.py: half of 80 % of the budget less the weights)."""
    return repr(((state_bytes / STATE_SHARE + weights) / USABLE_SHARE + 1) / GIB)


@pytest.mark.slow
def test_the_servicers_plan_a_fit_and_a_score_in_module_groups_from_the_workers_budget(
    cluster, workspace, tmp_path, monkeypatch
):
    """The servicers' own planning end to end: with a small INFLUENCE_WORKER_HOST_GIB (the workers'
    budget the API server plans with) FitFactors plans module groups (the manifest's provenance says
    how many, and the batch sizes used) and ComputeScores plans its own (prepare per group, score per
    (shard, group); results.json's settings say how many): the factors and the scores, per-module
    scores, damping-check overlaps, top-k, bottom-k and token scores are those of one group at the
    same batch size, on a sharded and a one-shard dataset; a budget the model's weights alone
    exceed is refused at submission, in one line."""
    client, model = cluster.client, str(workspace / "model")
    length = 8  # short sequences: a batch's captures fit beside a group of this tiny model's state
    sharded = client.register_dataset(model, workspace / "train.jsonl", shard_size=8, max_length=length)
    whole_data = client.register_dataset(model, workspace / "train.jsonl", shard_size=100, max_length=length)
    skeleton = model_skeleton(model)
    weights = sum(p.numel() * p.element_size() for p in skeleton.parameters())
    tracked = describe_all(select_modules(skeleton, "all"))

    fit_budget = _host_gib_for_groups(weights, max(module_state_bytes(m) for m in tracked.values()))
    monkeypatch.setenv("INFLUENCE_WORKER_HOST_GIB", fit_budget)
    fit_plan = plan_model_fit(
        skeleton, FitConfig(modules="all", batch_size=3, max_length=length), WorkerBudget.of_process("")
    )
    assert len(fit_plan.groups) >= 4
    grouped = client.fit_factors(model, sharded.name, batch_size=3, modules="all")
    monkeypatch.delenv("INFLUENCE_WORKER_HOST_GIB")
    whole = client.fit_factors(model, sharded.name, batch_size=fit_plan.batch_size, modules="all")
    for name, fit in (("whole", whole), ("grouped", grouped)):
        client.download_factors(fit.name, tmp_path / name)
    files = sorted(path.name for path in (tmp_path / "whole").glob("*.safetensors"))
    assert files
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "grouped" / name).read_bytes(), name
    provenance = json.loads((tmp_path / "grouped" / "manifest.json").read_text())["metadata"]["provenance"]
    assert provenance["module_groups"] == len(fit_plan.groups)
    assert provenance["effective_batch_sizes"] == [fit_plan.batch_size]

    options = {"top_k": 4, "bottom_k": 2, "per_module": True, "per_token": True, "damping_check": True}
    state = query_state_bytes(3 * len(QUERIES))  # --damping-check prepares each query at three dampings
    score_budget = _host_gib_for_groups(weights, max(state(m) for m in tracked.values()))
    monkeypatch.setenv("INFLUENCE_WORKER_HOST_GIB", score_budget)
    config = ScoreConfig(batch_size=3, max_length=length, damping_check=True)
    score_plan = plan_model_score(skeleton, list(tracked), config, len(QUERIES), WorkerBudget.of_process(""))
    monkeypatch.delenv("INFLUENCE_WORKER_HOST_GIB")
    assert len(score_plan.groups) >= 4
    for dataset, plan in ((sharded, {"prepare", "score", "merge"}), (whole_data, {"score_one_shard"})):
        outputs = []
        for host_gib in (None, score_budget):
            if host_gib:
                monkeypatch.setenv("INFLUENCE_WORKER_HOST_GIB", host_gib)
            stages = []
            result = client.compute_scores(
                model,
                whole.name,
                dataset.name,
                QUERIES,
                batch_size=3 if host_gib else score_plan.batch_size,
                progress=lambda m, seen=stages: seen.append((m.stage, m.shards_total)),
                **options,
            )
            monkeypatch.delenv("INFLUENCE_WORKER_HOST_GIB", raising=False)
            assert {stage for stage, _ in stages} <= plan | {"done"}, stages
            if host_gib and dataset is sharded:  # a task per group, per (shard, group)
                tasks = {("prepare", len(score_plan.groups)), ("score", sharded.num_shards * len(score_plan.groups))}
                assert tasks & set(stages), stages
            out = tmp_path / f"scores-{dataset.num_shards}-{bool(host_gib)}"
            client.download_result(result.name, out)
            outputs.append((load_file(str(out / "scores.safetensors")), json.loads((out / "results.json").read_text())))
        (one_tensors, one_report), (grouped_tensors, grouped_report) = outputs
        assert set(one_tensors) == set(grouped_tensors)
        for key, value in one_tensors.items():
            assert torch.equal(grouped_tensors[key], value), key
        assert grouped_report["queries"] == one_report["queries"]
        assert grouped_report["damping_check"] == one_report["damping_check"]
        assert all(entry["tokens"] for query in one_report["queries"] for entry in query["top"])
        assert grouped_report["settings"]["module_groups"] == len(score_plan.groups)
        assert one_report["settings"]["module_groups"] == 1
        assert grouped_report["settings"]["effective_batch_sizes"] == [score_plan.batch_size]

    monkeypatch.setenv("INFLUENCE_WORKER_HOST_GIB", repr(weights / 2 / GIB))
    for submit in (
        lambda: client.fit_factors(model, sharded.name, batch_size=3),
        lambda: client.compute_scores(model, whole.name, sharded.name, QUERIES, top_k=3),
    ):
        with pytest.raises(ResourceExhaustedError) as refused:
            submit()
        assert "leave nothing of the worker's memory" in str(refused.value) and "\n" not in str(refused.value)
