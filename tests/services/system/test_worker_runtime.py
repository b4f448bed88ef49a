"""The job runtime's resources: one capture-cache budget per worker, honoured end to end and freed
when a job ends for any reason; an event loop that a stalled store read cannot block; and the
small contracts of the requests (damping_factor 0, validated self-influence, token counts)."""

from __future__ import annotations

import gc
import json
import threading
import time

import grpc
import pytest
import torch
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.assembly import job_system, make_server
from services.client import InfluenceClient
from services.embedded import EmbeddedSystem
from services.engine import model_io
from services.engine.fit import FitConfig, fit_factors
from services.engine.model_io import load_model_and_tokenizer
from services.engine.records import read_training_jsonl
from services.engine.resources import cgroup_limit_bytes
from services.engine.score import ScoreConfig, compute_scores
from services.errors import InputError, NotFoundError
from services.gen.influence.v1 import common_pb2, factor_service_pb2, gradient_service_pb2
from services.jobs.connection import EmbeddedRedis
from services.rpc.server import BackgroundServer
from services.storage import LocalStore
from services.system.context import WorkerContext
from services.system.runner import Worker
from tests.support.stepping import registered, step
from tests.support.system import QUERIES


@pytest.mark.parametrize("cache_gib", [None, 0.0], ids=["worker budget", "cache_gib=0"])
@pytest.mark.needs_servers
def test_a_cancelled_fit_releases_its_capture_cache_and_cache_gib_is_honoured(workspace, cache_gib):
    model = common_pb2.ModelSpec(path=str(workspace / "model"))
    with EmbeddedSystem(workers=0, lease_seconds=0.5) as system, InfluenceClient(system.target) as client:
        worker = Worker(system.system, consumer="A")
        dataset = registered(client, worker, model, (workspace / "train.jsonl").read_bytes(), shard_size=12)
        request = factor_service_pb2.FitFactorsRequest(model=model, dataset=dataset.name, batch_size=4)
        if cache_gib is not None:
            request.cache_gib = cache_gib
        operation = client.factors.FitFactors(request)
        step(worker, "covariance")
        held = worker.context.captures.bytes
        if cache_gib == 0:
            assert held == 0 and not worker.context.captures.jobs()
            return
        assert held > 0 and worker.context.captures.jobs() == {operation.name.removeprefix("operations/")}
        client.operations.CancelOperation(operations_pb2.CancelOperationRequest(name=operation.name))
        worker.run_once(block_ms=10)  # no task for a cancelled job; the worker notices it ended
        assert worker.context.captures.bytes == 0 and not worker.context.captures.jobs()


@pytest.mark.needs_servers
def test_capture_caches_share_one_budget_per_worker(workspace, tmp_path):
    """Two covariance shards on one worker whose budget holds one shard's captures, not two: the
    second cache gives up (its correction recomputes), the worker never holds more than its
    budget, and the published factors are the same bytes as with room for both."""
    model = common_pb2.ModelSpec(path=str(workspace / "model"))
    data = (workspace / "train.jsonl").read_bytes()
    published, one_shard = [], None
    for budget in (1 << 30, "one and a half shards"):
        with EmbeddedSystem(workers=0) as system, InfluenceClient(system.target) as client:
            cache_bytes = budget if isinstance(budget, int) else one_shard * 3 // 2
            worker = Worker(
                system.system, consumer="A", context=WorkerContext(system.system.store, cache_bytes=cache_bytes)
            )
            dataset = registered(client, worker, model, data, shard_size=12)
            fit = client.factors.FitFactors(
                factor_service_pb2.FitFactorsRequest(model=model, dataset=dataset.name, batch_size=4)
            )
            job = fit.name.removeprefix("operations/")
            step(worker, "covariance")
            one_shard = one_shard or worker.context.captures.bytes
            step(worker, "covariance")
            held = worker.context.captures.bytes
            assert held <= cache_bytes
            kept = {job_shard for job_shard in worker.context.captures._caches}
            assert kept == ({(job, 0), (job, 1)} if isinstance(budget, int) else {(job, 0)}), (held, cache_bytes)
            for kind in ("eigen", "correction", "correction", "finalize"):
                step(worker, kind)
            assert worker.context.captures.bytes == 0
            operation = client.operations.GetOperation(operations_pb2.GetOperationRequest(name=fit.name))
            factors = client.unpack(operation, factor_service_pb2.FactorSet)
            out = client.download_factors(factors.name, tmp_path / str(len(published)))
            published.append(json.loads((out / "manifest.json").read_text())["files"])
    assert published[0] == published[1]


class StallingStore(LocalStore):
    """A LocalStore whose reads under factors/ block until released (an S3 read that hangs)."""

    def __init__(self, root):
        super().__init__(root)
        self.release = threading.Event()
        self.stalled = threading.Event()

    def get_bytes(self, key: str) -> bytes:
        if key.startswith("factors/"):
            self.stalled.set()
            self.release.wait(30)
        return super().get_bytes(key)


@pytest.mark.needs_servers
def test_a_stalled_store_read_delays_neither_health_checks_nor_other_callers_waits(workspace, tmp_path):
    redis = EmbeddedRedis(tmp_path / "redis")
    store = StallingStore(tmp_path / "store")
    system = job_system(store, redis.client())
    server = BackgroundServer(lambda: make_server(system)).start()
    worker = Worker(system, consumer="A")
    try:
        with InfluenceClient(server.target) as client:
            model = common_pb2.ModelSpec(path=str(workspace / "model"))
            done = client.gradients.RegisterDataset(
                gradient_service_pb2.RegisterDatasetRequest(model=model, jsonl=b'{"text": "w1 w2 w3"}\n')
            )
            step(worker, "register")
            outcome = {}

            def read_stalled_factor_set():
                try:
                    client.get_factor_set("factorSets/abc")
                except NotFoundError as error:
                    outcome["error"] = error

            stalled = threading.Thread(target=read_stalled_factor_set, daemon=True)
            stalled.start()
            assert store.stalled.wait(10)
            channel = grpc.insecure_channel(server.target)
            started = time.monotonic()
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            waited = client.operations.WaitOperation(
                operations_pb2.WaitOperationRequest(name=done.name, timeout=duration_pb2.Duration(seconds=5)),
                timeout=5,
            )
            assert waited.done and time.monotonic() - started < 1.0
            channel.close()
            store.release.set()
            stalled.join(10)
            assert "not found" in str(outcome["error"])
    finally:
        store.release.set()
        server.stop()
        redis.stop()


@pytest.mark.needs_servers
def test_damping_factor_zero_reaches_the_workers_and_self_influence_validates(workspace, tmp_path):
    model_dir = str(workspace / "model")
    examples = read_training_jsonl(workspace / "train.jsonl")
    model, tokenizer = load_model_and_tokenizer(model_dir)
    factors = fit_factors(model, tokenizer, examples, FitConfig(strategy="diagonal", batch_size=4))
    expected = {
        f: compute_scores(model, tokenizer, factors, examples, QUERIES, ScoreConfig(damping_factor=f))
        for f in (0.0, 0.1)
    }
    with EmbeddedSystem() as system, InfluenceClient(system.target) as client:
        dataset = client.register_dataset(model_dir, workspace / "train.jsonl")
        fitted = client.fit_factors(model_dir, dataset.name, strategy="diagonal", batch_size=4)
        for factor in (0.0, 0.1):
            result = client.compute_scores(model_dir, fitted.name, dataset.name, QUERIES, damping_factor=factor)
            client.download_result(result.name, tmp_path / str(factor))
            from safetensors.torch import load_file

            scores = load_file(str(tmp_path / str(factor) / "scores.safetensors"))["scores"]
            torch.testing.assert_close(
                scores, expected[factor].scores, rtol=1e-4, atol=1e-5 * float(scores.abs().max())
            )
        assert not torch.allclose(expected[0.0].scores, expected[0.1].scores)
        with pytest.raises(InputError, match="damping"):
            client.compute_self_influence(model_dir, fitted.name, dataset.name, damping=-1.0)
        with pytest.raises(InputError, match="damping_factor must be >= 0"):
            client.compute_self_influence(model_dir, fitted.name, dataset.name, damping_factor=-0.5)


@pytest.mark.needs_servers
def test_a_fit_on_max_examples_counts_only_their_tokens(workspace):
    model_dir = str(workspace / "model")
    examples = read_training_jsonl(workspace / "train.jsonl")
    model, tokenizer = load_model_and_tokenizer(model_dir)
    with EmbeddedSystem() as system, InfluenceClient(system.target) as client:
        dataset = client.register_dataset(model_dir, workspace / "train.jsonl", shard_size=4)
        for strategy in ("diagonal", "ekfac"):
            remote = client.fit_factors(model_dir, dataset.name, strategy=strategy, max_examples=6)
            local = fit_factors(model, tokenizer, examples, FitConfig(strategy=strategy, max_examples=6))
            assert (remote.num_sequences, remote.num_tokens) == (6, local.n_tokens), strategy
            assert local.n_tokens == sum(len(tokenizer(e.text)["input_ids"]) for e in examples[:6])


def test_fingerprints_are_remembered_per_model_object_not_per_id(workspace):
    model, _ = load_model_and_tokenizer(str(workspace / "model"))
    model_io.cached_fingerprint(model, ["transformer.h.0.mlp.c_fc"])
    assert model in model_io._FINGERPRINTS
    del model
    gc.collect()
    assert len(model_io._FINGERPRINTS) == 0, "a dropped model leaves no entry a new model could inherit"


def test_the_container_memory_limit_bounds_the_default_budget(tmp_path):
    limit = tmp_path / "memory.max"
    limit.write_text("1073741824\n")
    assert cgroup_limit_bytes([limit]) == 2**30
    limit.write_text("max\n")
    assert cgroup_limit_bytes([limit]) is None
    assert cgroup_limit_bytes([tmp_path / "absent"]) is None


@pytest.mark.needs_servers
def test_a_one_task_fit_reports_each_step_with_its_units(workspace):
    """Operation metadata carries the running task's step: a one-shard K-FAC fit ends on its
    eigendecomposition with every module done, reported in modules."""
    model = common_pb2.ModelSpec(path=str(workspace / "model"))
    with EmbeddedSystem(workers=0) as system, InfluenceClient(system.target) as client:
        worker = Worker(system.system, consumer="A")
        dataset = registered(client, worker, model, (workspace / "train.jsonl").read_bytes(), shard_size=100)
        seen = []
        real_stage = worker.system.operations.report

        def recording(operation_id, *, step=None, tokens=0):
            if step:
                seen.append(dict(step))
            return real_stage(operation_id, step=step, tokens=tokens)

        worker.system.operations.report = recording
        request = factor_service_pb2.FitFactorsRequest(
            model=model, dataset=dataset.name, strategy=factor_service_pb2.STRATEGY_KFAC
        )
        operation = client.factors.FitFactors(request)
        step(worker, "fit_one_shard")
        operation = client.operations.GetOperation(operations_pb2.GetOperationRequest(name=operation.name))
        metadata = common_pb2.OperationMetadata()
        operation.metadata.Unpack(metadata)
        modules = len(client.unpack(operation, factor_service_pb2.FactorSet).modules)
        assert (metadata.step, metadata.step_done, metadata.step_total, metadata.step_unit) == (
            "eigendecomposition",
            modules,
            modules,
            "module",
        )
        order = ["starting", "covariance", "eigendecomposition"]
        steps = [entry["step"] for entry in seen]
        assert steps[0] == "starting" and steps[-1] == "eigendecomposition", seen
        assert [order.index(step) for step in steps] == sorted(order.index(step) for step in steps), seen
