"""Coalesced index scans through the real service (gRPC, Redis, the S3 store): two concurrent
requests of one tenant against the same index, their index_score tasks run as one batch on one
worker, give each exactly the result it gets alone; a member whose operation was cancelled is
dropped and one whose task fails fails on its own, neither touching the other. And the BM25 of
`--lexical` is built once per index on a worker, not per job. (Tenants never
share a batch: the batch key carries the tenant, tests/services/jobs/test_jobs.py's take_matching
test shows another key is never taken.)"""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from services.client import InfluenceClient
from services.engine.lexical import Bm25Index
from services.engine.records import Query
from services.errors import CancelledError, NotFoundError
from services.gen.influence.internal.v1 import tasks_pb2
from services.system import layout
from services.system.runner import Worker
from tests.support.stepping import step
from tests.support.system import Cluster

pytestmark = pytest.mark.needs_servers

FIRST = [Query("a", "w1 w2 w3", "w4 w5"), Query("b", "w7 w8", "w9")]
SECOND = [Query("c", "w10", "w11 w12 w13"), Query("d", "w3 w9", "w2")]


@pytest.fixture(scope="module")
def system(redis_server, s3_server, workspace):
    """A cluster whose helper worker runs every kind but index_score (the tests run those by hand),
    with a factor set and a default (svd, int8) index of the workspace's data in one shard."""
    cluster = Cluster(redis_server.url, s3_server.url(f"b{uuid.uuid4().hex[:10]}"), workers=0)
    kinds = [kind for kind in cluster.system.table.kinds if kind != "index_score"]
    helper = Worker(cluster.system, kinds=kinds, consumer="helper")
    thread = threading.Thread(target=helper.run_forever, kwargs={"block_ms": 50}, daemon=True)
    thread.start()
    model = workspace / "model"
    dataset = cluster.client.register_dataset(model, workspace / "train.jsonl")
    factors = cluster.client.fit_factors(model, dataset.name)
    index = cluster.client.build_index(model, factors.name, dataset.name)
    yield cluster, model, factors.name, index.name, helper
    helper.stop.set()
    thread.join(30)
    cluster.close()


def request(system, queries, out, **options):
    """Score `queries` against the index (waiting for the result) and download it into `out`."""
    cluster, model, factors, index, _ = system
    with InfluenceClient(cluster.server.target) as client:
        result = client.compute_scores(model, factors, "", queries, index=index, rescore=6, top_k=4, **options)
        client.download_result(result.name, out)
    return out


def outputs(directory) -> tuple[dict, list]:
    report = json.loads((directory / "results.json").read_text())
    return load_file(str(directory / "scores.safetensors")), [query["top"] for query in report["queries"]]


def assert_same(one, other) -> None:
    (tensors, top), (other_tensors, other_top) = outputs(one), outputs(other)
    assert tensors.keys() == other_tensors.keys()
    for name in tensors:
        assert torch.equal(tensors[name], other_tensors[name]), name
    assert top == other_top


def waiting_index_scores(cluster: Cluster, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while cluster.system.queue.stats("index_score").waiting < count:
        assert time.monotonic() < deadline, f"{count} index_score tasks did not come"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def alone(system, tmp_path_factory):
    """Each request's result with its index_score task run alone."""
    cluster = system[0]
    worker = Worker(cluster.system, kinds=["index_score"], consumer="alone")
    results = []
    with ThreadPoolExecutor(1) as pool:
        for number, queries in enumerate((FIRST, SECOND)):
            future = pool.submit(request, system, queries, tmp_path_factory.mktemp(f"alone{number}"))
            step(worker, "index_score", timeout=60)
            results.append(future.result(timeout=120))
    return results


def submitted(pool, system, batches, directory) -> list:
    """The requests of `batches`, submitted one after another, each once its index_score task waits:
    their tasks wait in this order."""
    futures = []
    for number, queries in enumerate(batches):
        futures.append(pool.submit(request, system, queries, directory / f"r{number}"))
        waiting_index_scores(system[0], number + 1)
    return futures


def coalescing(cluster: Cluster) -> Worker:
    """A worker that gathers two index_score tasks however long they take to come."""
    return Worker(cluster.system, kinds=["index_score"], consumer="coalescing", coalesce_seconds=60, coalesce_limit=2)


def test_two_concurrent_requests_coalesced_get_what_each_gets_alone(system, alone, tmp_path):
    cluster = system[0]
    worker = coalescing(cluster)
    with ThreadPoolExecutor(2) as pool:
        futures = submitted(pool, system, (FIRST, SECOND), tmp_path)
        first = cluster.system.queue.take(["index_score"], worker.consumer, block_ms=1000)
        assert first.key.startswith(f"{layout.DEFAULT_TENANT}/") and system[3].split("/")[-1] in first.key
        tasks = worker.coalesced(first)
        assert len(tasks) == 2 and tasks[0] is first
        assert worker.handle_batch(tasks) == ["succeeded", "succeeded"]
        together = [future.result(timeout=120) for future in futures]
    operations = {tasks_pb2.TaskPayload.FromString(task.payload).operation for task in tasks}
    assert len(operations) == 2
    for one, other in zip(alone, together, strict=True):
        assert_same(one, other)


def test_a_failed_or_cancelled_member_ends_alone_and_the_other_gets_its_result(system, alone, tmp_path):
    cluster = system[0]
    worker = coalescing(cluster)
    store = cluster.system.store
    with ThreadPoolExecutor(3) as pool:
        futures = submitted(pool, system, (FIRST, SECOND), tmp_path)
        tasks = worker.coalesced(cluster.system.queue.take(["index_score"], worker.consumer, block_ms=1000))
        first = tasks_pb2.TaskPayload.FromString(tasks[0].payload).operation
        # the first request's prepared queries are gone: its task fails (NOT_FOUND, its operation with it),
        # the other's succeeds
        store.delete(layout.job_output(first, "prepared"))
        assert worker.handle_batch(tasks) == ["failed", "succeeded"]
        assert_same(alone[1], futures[1].result(timeout=120))
        with pytest.raises(NotFoundError, match="prepared"):
            futures[0].result(timeout=120)
        # a member cancelled before the batch runs is skipped; the other still gets its own result
        cancelled, kept = submitted(pool, system, (FIRST, SECOND), tmp_path / "again")
        tasks = worker.coalesced(cluster.system.queue.take(["index_score"], worker.consumer, block_ms=1000))
        operations = [tasks_pb2.TaskPayload.FromString(task.payload).operation for task in tasks]
        with InfluenceClient(cluster.server.target) as client:
            client.cancel(f"operations/{operations[0]}")
        outcomes = worker.handle_batch(tasks)
        assert outcomes == ["skipped", "succeeded"]
        assert_same(alone[1], kept.result(timeout=120))
        with pytest.raises(CancelledError):
            cancelled.result(timeout=120)


def test_the_bm25_of_an_index_is_built_once_per_worker_not_per_job(system, tmp_path, monkeypatch):
    """--lexical: the first job against the index builds its BM25 on the worker that merges, the
    next ones find it in that worker's cache (neither reading the index's text nor rebuilding)."""
    cluster, helper = system[0], system[4]
    built = []
    build = Bm25Index.build.__func__

    def counted(cls, training):
        built.append(len(training))
        return build(cls, training)

    monkeypatch.setattr(Bm25Index, "build", classmethod(counted))
    scanner = Worker(cluster.system, kinds=["index_score"], consumer="lexical")
    with ThreadPoolExecutor(1) as pool:
        for number, queries in enumerate((FIRST, SECOND, FIRST)):
            future = pool.submit(request, system, queries, tmp_path / f"r{number}", lexical=3)
            step(scanner, "index_score", timeout=60)
            report = json.loads((future.result(timeout=120) / "results.json").read_text())
            assert report["index"]["lexical"] == 3 and "lexical" in report["index"]["sources"]
    index_id = system[3].split("/")[-1]
    assert built == [23] and ("bm25", index_id, 23) in helper.context.artifacts
