"""The object store goes away in the middle of a job (a private SeaweedFS, stopped and started).

A short outage: tasks that fail on it are released and retried after a backoff, and the job
ends with the same factor bytes as an undisturbed run. An outage longer than the job's retries
(each store call's bounded retries x the task's deliveries): the job fails, ABORTED, naming the
store and the cause, within a bounded time; it is not retried forever.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from services.errors import AbortedError
from services.gen.influence.v1 import common_pb2, factor_service_pb2
from services.storage.retry import RetryPolicy
from tests.support.servers.s3 import S3Server
from tests.support.system import Cluster

FAST = RetryPolicy(attempts=3, initial_delay=0.1, max_delay=0.3)


@pytest.fixture
def private_s3():
    server = S3Server().start()
    yield server
    server.cleanup()


def outage_cluster(redis_server, s3: S3Server, max_deliveries: int) -> Cluster:
    cluster = Cluster(
        redis_server.url, s3.url(f"b{uuid.uuid4().hex[:10]}"), lease_seconds=2.0, max_deliveries=max_deliveries
    )
    cluster.store.retry = FAST  # keep each call's retries short: the task's own retries are what is tested
    return cluster


def fit_request(cluster: Cluster, workspace):
    model = str(workspace / "model")
    dataset = cluster.client.register_dataset(model, workspace / "train.jsonl", shard_size=6)
    return factor_service_pb2.FitFactorsRequest(
        model=common_pb2.ModelSpec(path=model), dataset=dataset.name, batch_size=2
    )


def factor_bytes(cluster: Cluster, name: str, directory) -> dict:
    """Every factor file's bytes, and the manifest's file list (its provenance holds the run's
    own step timings and creation time)."""
    cluster.client.download_factors(name, directory)
    found = {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.name != "manifest.json"}
    found["manifest.json/files"] = json.loads((directory / "manifest.json").read_text())["files"]
    return found


@pytest.mark.slow
def test_a_short_store_outage_is_ridden_out_and_a_long_one_fails_clearly(
    redis_server,
    private_s3,
    workspace,
    tmp_path,
):
    cluster = outage_cluster(redis_server, private_s3, max_deliveries=10)
    try:
        request = fit_request(cluster, workspace)
        undisturbed = cluster.client.unpack(
            cluster.client.wait(cluster.client.factors.FitFactors(request), timeout=120), factor_service_pb2.FactorSet
        )
        expected = factor_bytes(cluster, undisturbed.name, tmp_path / "undisturbed")
        operation = cluster.client.factors.FitFactors(request)
        time.sleep(0.5)  # the job's tasks are running
        private_s3.stop()
        threading.Timer(3.0, private_s3.start).start()  # back 3 s later
        disturbed = cluster.client.unpack(cluster.client.wait(operation, timeout=180), factor_service_pb2.FactorSet)
        assert factor_bytes(cluster, disturbed.name, tmp_path / "disturbed") == expected
    finally:
        cluster.close()

    cluster = outage_cluster(redis_server, private_s3, max_deliveries=2)
    try:
        request = fit_request(cluster, workspace)
        operation = cluster.client.factors.FitFactors(request)
        private_s3.stop()  # and it stays away
        started = time.monotonic()
        with pytest.raises(AbortedError) as failed:
            cluster.client.wait(operation, timeout=120)
        assert time.monotonic() - started < 60, "bounded retries, then a clear failure"
        message = str(failed.value)
        assert "failed 2 times" in message and "object store" in message and "unavailable" in message, message
    finally:
        cluster.close()
