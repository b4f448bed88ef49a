"""A task that fails leaves nothing behind.

A failure is injected in the middle of each pass (covariance, correction, score) on worker A;
the failed task is retried on worker B after its lease, and A goes on to run the job's next
task of the same shard, so anything A kept from the failed attempt (a half-filled capture cache,
a partial sum) would be used. Every published factor and result byte must equal an undisturbed
run's. The workers are stepped one task at a time by the test, so the schedule is exact.
"""

from __future__ import annotations

import json
import time

import pytest
import redis
from google.longrunning import operations_pb2

from services.client import InfluenceClient
from services.embedded import EmbeddedSystem
from services.engine.records import read_training_jsonl
from services.gen.influence.v1 import common_pb2, factor_service_pb2, gradient_service_pb2, query_service_pb2
from services.storage import LocalStore
from services.system.runner import OperationProgress, Worker
from tests.support.stepping import step
from tests.support.system import QUERIES

LEASE = 0.5


class Injector:
    """Makes OperationProgress raise a Redis error after the second of three batches of the armed pass, once."""

    def __init__(self):
        self.armed: str | None = None
        self.fired: list[str] = []

    def install(self, monkeypatch) -> None:
        injector, stage_of, advance_of = self, OperationProgress.stage, OperationProgress.advance

        def stage(progress, name, total, unit="batch"):
            progress.injection_stage, progress.injection_batches = name, 0
            stage_of(progress, name, total, unit)

        def advance(progress, units=1, tokens=0):
            advance_of(progress, units, tokens)
            progress.injection_batches = getattr(progress, "injection_batches", 0) + units
            armed = injector.armed and getattr(progress, "injection_stage", "") == injector.armed
            if armed and progress.injection_batches == 2:
                injector.fired.append(injector.armed)
                injector.armed = None
                raise redis.ConnectionError("injected failure in the middle of the pass")

        monkeypatch.setattr(OperationProgress, "stage", stage, raising=False)
        monkeypatch.setattr(OperationProgress, "advance", advance)


def wait_done(client: InfluenceClient, operation) -> operations_pb2.Operation:
    operation = client.operations.GetOperation(operations_pb2.GetOperationRequest(name=operation.name))
    assert operation.done and not operation.HasField("error"), operation.error
    return operation


def run(workspace, out, injector: Injector | None) -> dict[str, str]:
    """Register, fit (2 shards) and score, stepping workers A and B by hand; injections (if any)
    on A with the retry on B. Returns the sha256 or bytes of every published file."""
    model = common_pb2.ModelSpec(path=str(workspace / "model"))
    data = (workspace / "train.jsonl").read_bytes()
    with EmbeddedSystem(workers=0, lease_seconds=LEASE) as system, InfluenceClient(system.target) as client:
        a, b = (Worker(system.system, consumer=name) for name in ("A", "B"))

        def fail_on_a_then_retry_on_b(kind: str, stage: str) -> None:
            if injector is None:
                step(a, kind)
                return
            injector.armed = stage
            step(a, kind)  # fails in the middle of the pass
            assert injector.fired[-1] == stage
            time.sleep(LEASE * 1.5)
            step(b, kind)  # the retry

        registering = client.gradients.RegisterDataset(
            gradient_service_pb2.RegisterDatasetRequest(model=model, jsonl=data, shard_size=12)
        )
        step(a, "register")
        dataset = client.unpack(wait_done(client, registering), gradient_service_pb2.Dataset)
        assert dataset.num_shards == 2

        fitting = client.factors.FitFactors(
            factor_service_pb2.FitFactorsRequest(model=model, dataset=dataset.name, batch_size=4)
        )
        fail_on_a_then_retry_on_b("covariance", "covariance")  # shard 0
        step(a, "covariance")  # shard 1
        step(b, "eigen")
        step(a, "correction")  # shard 0 on A: A must not reuse what its failed attempt captured
        fail_on_a_then_retry_on_b("correction", "correction")  # shard 1
        step(b, "finalize")
        factors = client.unpack(wait_done(client, fitting), factor_service_pb2.FactorSet)

        scoring = client.queries.ComputeScores(
            query_service_pb2.ComputeScoresRequest(
                model=model,
                factor_set=factors.name,
                dataset=dataset.name,
                queries=[query_service_pb2.Query(id=q.id, prompt=q.prompt, completion=q.completion) for q in QUERIES],
                batch_size=4,
                top_k=3,
                per_module=True,
                per_token=True,
            )
        )
        step(a, "prepare")
        fail_on_a_then_retry_on_b("score", "scores")  # shard 0
        step(a, "score")  # shard 1
        step(a, "merge")
        result = client.unpack(wait_done(client, scoring), query_service_pb2.ScoreResult)
        client.download_factors(factors.name, out / "factors")
        client.download_result(result.name, out / "scores")
    files = json.loads((out / "factors" / "manifest.json").read_text())["files"]
    published = {f"factors/{name}": entry["sha256"] for name, entry in files.items()}
    store = LocalStore(out / "scores")
    published["scores/scores.safetensors"] = store.get_bytes("scores.safetensors")
    report = json.loads(store.get_bytes("results.json"))
    report.pop("settings")  # names its run's factor set, a random id; everything else must be identical
    published["scores/results.json"] = json.dumps(report, sort_keys=True)
    return published


def test_a_failure_mid_pass_changes_no_published_byte(workspace, tmp_path, monkeypatch):
    assert len(read_training_jsonl(workspace / "train.jsonl")) == 23  # shards of 12 + 11: 3 batches of 4 each
    undisturbed = run(workspace, tmp_path / "undisturbed", None)
    injector = Injector()
    injector.install(monkeypatch)
    disturbed = run(workspace, tmp_path / "disturbed", injector)
    assert injector.fired == ["covariance", "correction", "scores"]
    assert disturbed.keys() == undisturbed.keys()
    for name, value in undisturbed.items():
        assert disturbed[name] == value, f"{name} differs after failures injected mid-pass"


@pytest.fixture(autouse=True)
def _quiet_worker_logs(caplog):
    caplog.set_level("CRITICAL", logger="influence.worker")
