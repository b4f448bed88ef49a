"""A worker process is SIGKILLed in the middle of every kind of task, and no published byte changes.

On the real redis-server and S3 server, one job of each kind runs twice: undisturbed, and with
a worker process killed once inside every task kind (register, covariance, eigen, correction,
finalize, prepare, score, merge, self, self_merge, index_shard, index_publish, index_prepare,
index_score, index_merge; fit_one_shard and score_one_shard on a one-shard dataset; blocks behind
a StreamBlocks call) at a random point: its k-th touch of the store or of its progress, k drawn
per kind. The doomed worker is a separate process (tests/support/doomed_worker.py) that sends
itself SIGKILL there: nothing after it runs (no acknowledgement, no release, no recorded error,
no finally block), its heartbeat stops, the task stays pending under the dead consumer until
its lease expires and the surviving worker reclaims it, and the dead worker's caches go with
it. (tests/services/system/test_system.py SIGKILLs a whole worker process from outside during a fit;
tests/faults/test_fault_restarts.py kills the API server and Redis.)

Every artifact's files (sha256 by name), and every streamed block, must equal the undisturbed run's.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import torch

from services.assembly import STAGE_TABLE
from services.gen.influence.v1 import common_pb2, factor_service_pb2, gradient_service_pb2, query_service_pb2
from services.system.runner import Worker
from tests.support import ROOT
from tests.support.system import QUERIES, Cluster

LEASE = 0.5
MAX_DELIVERIES = 3
KINDS = [
    "register",
    "covariance",
    "eigen",
    "correction",
    "finalize",
    "prepare",
    "score",
    "merge",
    "self",
    "self_merge",
    "index_shard",
    "index_publish",
    "index_prepare",
    "index_score",
    "index_merge",
    "fit_one_shard",
    "score_one_shard",
    "blocks",
]


class Driver:
    """Runs every task of a cluster by hand: the first delivery of each kind still to be disturbed
    on a worker process killed at its k-th touch, everything else (and every retry) on the
    in-process survivor."""

    def __init__(self, cluster: Cluster, redis_url: str, store_url: str, kill: bool, rng: random.Random):
        self.cluster, self.redis_url, self.store_url, self.rng = cluster, redis_url, store_url, rng
        self.survivor = Worker(cluster.system, consumer="survivor")
        self.pending_kinds = set(KINDS) if kill else set()
        self.deaths: dict[str, int] = {}

    def until_done(self, operation, seconds: float = 600):
        operation_id = operation.name.split("/")[1]
        ended = ("SUCCEEDED", "FAILED", "CANCELLED")
        self.until(lambda: self.cluster.system.operations.get(operation_id)["state"] in ended, operation.name, seconds)
        return self.cluster.client.wait(operation, timeout=10)

    def until(self, done, what: str, seconds: float = 600) -> None:
        """Run tasks until `done()`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if done():
                return
            task = self.cluster.system.queue.take(self.survivor.kinds, "survivor", block_ms=50)
            if task is None:
                continue
            if task.kind in self.pending_kinds and task.deliveries == 1:
                self.die_during(task)
            else:
                self.survivor.handle(task)
        raise AssertionError(f"{what} did not finish in {seconds} s")

    def die_during(self, task) -> None:
        """Hand the task to a new worker process that SIGKILLs itself at a random touch (its
        first to third)."""
        consumer = f"doomed-{uuid.uuid4().hex[:6]}"
        # the task was taken as "survivor": move it to the doomed consumer, as if it had taken it
        queue = self.cluster.system.queue
        queue.client.xclaim(queue.stream(task.kind), "workers", consumer, 0, [task.message_id], justid=True)
        point = self.rng.randint(1, 3)
        spec = {
            "redis_url": self.redis_url,
            "store_url": self.store_url,
            "prefix": self.cluster.prefix,
            "lease_seconds": LEASE,
            "max_deliveries": MAX_DELIVERIES,
            "consumer": consumer,
            "kind": task.kind,
            "message_id": task.message_id,
            "deliveries": task.deliveries,
            "die_at": point,
            "torch_threads": torch.get_num_threads(),
        }
        process = subprocess.run(
            [sys.executable, "-m", "tests.support.doomed_worker", json.dumps(spec)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if process.returncode == -signal.SIGKILL:
            self.deaths[task.kind] = point
            self.pending_kinds.discard(task.kind)
        else:  # the task ended before its k-th touch: it ran whole, the kind waits for its next task
            assert process.returncode == 0, (
                f"doomed worker for {task.kind}: exit {process.returncode}\n{process.stderr}"
            )


def artifacts(store, prefix: str) -> list[dict[str, str]]:
    """{file: sha256} of each artifact under `prefix` (its manifest's list), ordered by content
    (factor set ids are random)."""
    found = [
        {name: entry["sha256"] for name, entry in json.loads(store.get_bytes(key))["files"].items()}
        for key in store.list(prefix)
        if key.endswith("/manifest.json")
    ]
    return sorted(found, key=lambda files: json.dumps(files, sort_keys=True))


def register_and_fit(client, driver: Driver, model, workspace, shard_size: int):
    """(dataset, factor set) of the workspace's training data in shards of `shard_size`."""
    registering = client.gradients.RegisterDataset(
        gradient_service_pb2.RegisterDatasetRequest(
            model=model, jsonl=(workspace / "train.jsonl").read_bytes(), shard_size=shard_size
        )
    )
    dataset = client.unpack(driver.until_done(registering), gradient_service_pb2.Dataset)
    fitting = client.factors.FitFactors(
        factor_service_pb2.FitFactorsRequest(model=model, dataset=dataset.name, batch_size=4)
    )
    return dataset, client.unpack(driver.until_done(fitting), factor_service_pb2.FactorSet)


def run_every_job(cluster: Cluster, driver: Driver, workspace) -> dict[str, dict[str, str]]:
    client = cluster.client
    model = common_pb2.ModelSpec(path=str(workspace / "model"))
    dataset, factors = register_and_fit(client, driver, model, workspace, shard_size=12)
    queries = [query_service_pb2.Query(id=q.id, prompt=q.prompt, completion=q.completion) for q in QUERIES]
    scoring = client.queries.ComputeScores(
        query_service_pb2.ComputeScoresRequest(
            model=model, factor_set=factors.name, dataset=dataset.name, queries=queries, top_k=3, per_token=True
        )
    )
    driver.until_done(scoring)
    selfing = client.queries.ComputeSelfInfluence(
        query_service_pb2.ComputeSelfInfluenceRequest(model=model, factor_set=factors.name, dataset=dataset.name)
    )
    driver.until_done(selfing)
    indexing = client.gradients.BuildIndex(
        gradient_service_pb2.BuildIndexRequest(
            model=model,
            factor_set=factors.name,
            dataset=dataset.name,
            projection=gradient_service_pb2.PROJECTION_NONE,
            storage_dtype=common_pb2.DTYPE_FLOAT32,
        )
    )
    index = client.unpack(driver.until_done(indexing), gradient_service_pb2.Index)
    index_scoring = client.queries.ComputeScores(
        query_service_pb2.ComputeScoresRequest(model=model, factor_set=factors.name, index=index.name, queries=queries)
    )
    driver.until_done(index_scoring)
    streamed: list = []
    streaming = threading.Thread(
        target=lambda: streamed.extend(
            client.gradients.StreamBlocks(
                gradient_service_pb2.StreamBlocksRequest(dataset=dataset.name, shard=1, model=model, block_size=4)
            )
        )
    )
    streaming.start()
    driver.until(lambda: not streaming.is_alive(), "StreamBlocks")
    # one shard: the fit and the scoring run as one task each (fit_one_shard, score_one_shard)
    whole, whole_factors = register_and_fit(client, driver, model, workspace, shard_size=100)
    scoring = client.queries.ComputeScores(
        query_service_pb2.ComputeScoresRequest(
            model=model, factor_set=whole_factors.name, dataset=whole.name, queries=queries, top_k=3
        )
    )
    driver.until_done(scoring)
    store = cluster.store
    assert len(streamed) == 3, f"StreamBlocks sent {len(streamed)} blocks of shard 1's 12 sequences"
    return {
        "datasets": artifacts(store, "datasets/"),
        "factors": artifacts(store, "factors/"),
        "indexes": artifacts(store, "indexes/"),
        "results": _results(store),
        "blocks": [hashlib.sha256(block.SerializeToString()).hexdigest() for block in streamed],
    }


def _results(store) -> list[dict[str, str]]:
    """Each result's files, ordered by their content (result ids are random)."""
    manifests = sorted(key for key in store.list("results/") if key.endswith("/manifest.json"))
    found = []
    for key in manifests:
        files = {name: entry["sha256"] for name, entry in json.loads(store.get_bytes(key))["files"].items()}
        # results.json names its run's factor set and index (random ids): compared without them
        report = json.loads(store.get_bytes(key.removesuffix("manifest.json") + "results.json"))
        report.pop("settings", None)
        if isinstance(report.get("index"), dict):
            report["index"].pop("name", None)  # the index's random id
        files["results.json"] = json.dumps(report, sort_keys=True)
        found.append(files)
    return sorted(found, key=lambda files: json.dumps(files, sort_keys=True))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.slow
def test_a_worker_killed_in_any_kind_of_task_changes_no_published_byte(
    redis_server,
    s3_server,
    workspace,
    seed,
):
    def cluster(store_url: str) -> Cluster:
        return Cluster(redis_server.url, store_url, workers=0, lease_seconds=LEASE, max_deliveries=MAX_DELIVERIES)

    undisturbed_cluster = cluster(s3_server.url(f"b{uuid.uuid4().hex[:10]}"))
    try:
        driver = Driver(undisturbed_cluster, redis_server.url, "", kill=False, rng=random.Random(seed))
        undisturbed = run_every_job(undisturbed_cluster, driver, workspace)
    finally:
        undisturbed_cluster.close()
    store_url = s3_server.url(f"b{uuid.uuid4().hex[:10]}")
    disturbed_cluster = cluster(store_url)
    try:
        driver = Driver(disturbed_cluster, redis_server.url, store_url, kill=True, rng=random.Random(seed))
        disturbed = run_every_job(disturbed_cluster, driver, workspace)
    finally:
        disturbed_cluster.close()
    assert sorted(KINDS) == sorted(STAGE_TABLE.kinds), "a task kind this test does not disturb"
    assert sorted(driver.deaths) == sorted(KINDS), f"not every kind saw a death: {driver.deaths}"
    assert disturbed.keys() == undisturbed.keys()
    for artifact, files in undisturbed.items():
        assert disturbed[artifact] == files, f"{artifact} differs after deaths at {driver.deaths} (seed {seed})"
