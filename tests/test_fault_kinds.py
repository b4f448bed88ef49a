"""A worker dies in the middle of every kind of task, and no published byte changes.

On the real redis-server and S3 server, one job of each kind runs twice: undisturbed, and with
a worker dying once inside every task kind (register, covariance, eigen, correction, finalize,
prepare, score, merge, self, self_merge, index_shard, index_publish, index_prepare, index_score,
index_merge) at a random point: its k-th touch of the store or of its progress, k drawn per
kind. A death is a BaseException the runtime does not catch, so, as after SIGKILL, nothing
after it runs: no acknowledgement, no release, no recorded error; the task stays pending
under the dead consumer until its lease expires and a surviving worker reclaims it. The dead
worker's memory (caches) is dropped with it. (tests/test_system.py SIGKILLs a real worker
process; tests/test_fault_restarts.py kills the API server and Redis.)

Every artifact's files (sha256 by name) must equal the undisturbed run's.
"""

from __future__ import annotations

import json
import random
import time
import uuid

import pytest

from services.gen.influence.v1 import common_pb2, factor_service_pb2, gradient_service_pb2, query_service_pb2
from services.storage.s3 import S3Store
from services.system.runner import OperationProgress, Worker
from tests.test_system import QUERIES, Cluster, workspace  # noqa: F401

LEASE = 0.5
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
]


class WorkerDied(BaseException):
    """Raised at the chosen point: like SIGKILL, nothing in the runtime handles it."""


class Reaper:
    """Counts the dying worker's touches of the store and of its progress; raises WorkerDied at
    the armed one."""

    def __init__(self):
        self.countdown = 0  # 0: not armed

    def touch(self) -> None:
        if self.countdown:
            self.countdown -= 1
            if self.countdown == 0:
                raise WorkerDied

    def install(self, monkeypatch) -> None:
        reaper = self
        for name in ("get_bytes", "put_bytes", "put_buffers", "put_file", "get_file"):
            original = getattr(S3Store, name)

            def touched(store, *args, _original=original, **kwargs):
                reaper.touch()
                return _original(store, *args, **kwargs)

            monkeypatch.setattr(S3Store, name, touched)
        advance = OperationProgress.advance

        def advanced(progress, *args, **kwargs):
            reaper.touch()
            return advance(progress, *args, **kwargs)

        monkeypatch.setattr(OperationProgress, "advance", advanced)


class Driver:
    """Runs every task of a cluster by hand: each kind still to be disturbed on a worker that dies
    at its k-th touch, everything else (and every retry) on the survivor."""

    def __init__(self, cluster: Cluster, reaper: Reaper | None, rng: random.Random):
        self.cluster, self.reaper, self.rng = cluster, reaper, rng
        self.survivor = Worker(cluster.system, consumer="survivor")
        self.pending_kinds = set(KINDS) if reaper else set()
        self.deaths: dict[str, int] = {}

    def until_done(self, operation, seconds: float = 600):
        operation_id = operation.name.split("/")[1]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.cluster.system.operations.get(operation_id)["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                return self.cluster.client.wait(operation, timeout=10)
            task = self.cluster.system.queue.take(self.survivor.kinds, "survivor", block_ms=50)
            if task is None:
                continue
            if task.kind in self.pending_kinds and task.deliveries == 1:
                self.die_during(task)
            else:
                self.survivor.handle(task)
        raise AssertionError(f"{operation.name} did not finish in {seconds} s")

    def die_during(self, task) -> None:
        """Hand the task to a fresh worker that dies at a random touch (its first to third)."""
        doomed = Worker(self.cluster.system, consumer=f"doomed-{uuid.uuid4().hex[:6]}")
        # the task was taken as "survivor": give it to the doomed consumer, as if it had taken it
        self.cluster.system.queue.client.xclaim(
            self.cluster.system.queue.stream(task.kind), "workers", doomed.consumer, 0, [task.message_id], justid=True
        )
        point = self.rng.randint(1, 3)
        self.reaper.countdown = point
        try:
            doomed.handle(task)
        except WorkerDied:
            self.deaths[task.kind] = point
            self.pending_kinds.discard(task.kind)
        finally:
            self.reaper.countdown = 0
            doomed.lease.close()


def artifact_files(store, prefix: str) -> dict[str, str]:
    """{file: sha256} of the one artifact under `prefix` (its manifest's list)."""
    manifests = [key for key in store.list(prefix) if key.endswith("/manifest.json")]
    assert len(manifests) == 1, manifests
    return {name: entry["sha256"] for name, entry in json.loads(store.get_bytes(manifests[0]))["files"].items()}


def run_every_job(cluster: Cluster, driver: Driver, workspace) -> dict[str, dict[str, str]]:  # noqa: F811
    client = cluster.client
    model = common_pb2.ModelSpec(path=str(workspace / "model"))
    registering = client.gradients.RegisterDataset(
        gradient_service_pb2.RegisterDatasetRequest(
            model=model, jsonl=(workspace / "train.jsonl").read_bytes(), shard_size=12
        )
    )
    dataset = client.unpack(driver.until_done(registering), gradient_service_pb2.Dataset)
    fitting = client.factors.FitFactors(
        factor_service_pb2.FitFactorsRequest(model=model, dataset=dataset.name, batch_size=4)
    )
    factors = client.unpack(driver.until_done(fitting), factor_service_pb2.FactorSet)
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
    store = cluster.store
    return {
        "dataset": artifact_files(store, "datasets/"),
        "factors": artifact_files(store, "factors/"),
        "indexes": artifact_files(store, "indexes/"),
        **{f"results/{n}": files for n, files in enumerate(_results(store))},
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


@pytest.mark.parametrize("seed", [0])
def test_a_worker_dying_in_any_kind_of_task_changes_no_published_byte(
    redis_server,
    s3_server,
    workspace,  # noqa: F811
    monkeypatch,
    seed,
):
    def cluster() -> Cluster:
        return Cluster(redis_server.url, s3_server.url(f"b{uuid.uuid4().hex[:10]}"), workers=0, lease_seconds=LEASE)

    undisturbed_cluster = cluster()
    try:
        driver = Driver(undisturbed_cluster, None, random.Random(seed))
        undisturbed = run_every_job(undisturbed_cluster, driver, workspace)
    finally:
        undisturbed_cluster.close()
    reaper = Reaper()
    reaper.install(monkeypatch)
    disturbed_cluster = cluster()
    try:
        driver = Driver(disturbed_cluster, reaper, random.Random(seed))
        disturbed = run_every_job(disturbed_cluster, driver, workspace)
    finally:
        disturbed_cluster.close()
    assert sorted(driver.deaths) == sorted(KINDS), f"not every kind saw a death: {driver.deaths}"
    assert disturbed.keys() == undisturbed.keys()
    for artifact, files in undisturbed.items():
        assert disturbed[artifact] == files, f"{artifact} differs after deaths at {driver.deaths} (seed {seed})"
