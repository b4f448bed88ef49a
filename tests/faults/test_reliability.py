"""Reliability contracts of the job runtime, on the real redis-server and S3 server:

- a failed task is offered again after a short backoff, not after its lease;
- a dead-lettered task's operation quotes that task's own last error;
- a job that fails or is cancelled leaves no jobs/{id}/ objects and no unpublished artifact files;
- operation records expire a configured time after they end;
- a dataset is content-addressed: the same data registers once;
- disk full is a permanent, clean error with no half-written artifact;
- bad JSONL (invalid UTF-8, an over-long line) is INVALID_ARGUMENT naming the line.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import time
import uuid

import grpc
import pytest
from google.longrunning import operations_pb2

from services.errors import AbortedError, CancelledError, StorageFull
from services.gen.influence.v1 import common_pb2, factor_service_pb2, gradient_service_pb2
from services.jobs.connection import connect
from services.jobs.operations import OperationStore
from services.storage import LocalStore
from services.system.runner import Worker
from tests.support.system import Cluster, make_examples, write_jsonl


def take(worker: Worker, timeout: float):
    """The next task `worker` is offered within `timeout` seconds (None if none)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = worker.system.queue.take(worker.kinds, worker.consumer, block_ms=50)
        if task is not None:
            return task
    return None


def run_until_idle(worker: Worker, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        task = take(worker, 0.3)
        if task is None:
            return
        worker.handle(task)


def run_until_ended(worker: Worker, operation, seconds: float = 60) -> None:
    """Step `worker` until the operation has ended (retries come after a backoff)."""
    operation_id = operation.name.split("/")[1]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if worker.system.operations.get(operation_id)["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            return
        task = take(worker, 0.2)
        if task is not None:
            worker.handle(task)
    raise AssertionError(f"{operation.name} did not end within {seconds} s")


def failing(table, stage: str, monkeypatch, fail):
    """Make `stage` raise `fail(call)` (when it returns an exception) before running."""
    original = table.stage(stage)

    def run(call):
        error = fail(call)
        if error is not None:
            raise error
        return original.run(call)

    monkeypatch.setitem(table.stages, stage, dataclasses.replace(original, run=run))


@pytest.fixture
def manual(redis_server, s3_server):
    """A cluster without worker threads (tests step one worker by hand) and a long lease."""
    created = Cluster(redis_server.url, s3_server.url(f"b{uuid.uuid4().hex[:10]}"), workers=0, lease_seconds=30.0)
    yield created
    created.close()


def test_a_failed_task_is_offered_again_after_a_backoff_not_after_its_lease(manual, workspace, monkeypatch):
    worker = Worker(manual.system, consumer="solo")
    model = common_pb2.ModelSpec(path=str(workspace / "model"))
    registering = manual.client.gradients.RegisterDataset(
        gradient_service_pb2.RegisterDatasetRequest(model=model, jsonl=(workspace / "train.jsonl").read_bytes())
    )
    run_until_idle(worker)
    dataset = manual.client.unpack(manual.client.wait(registering, timeout=30), gradient_service_pb2.Dataset)
    failures = []
    failing(
        manual.system.table,
        "fit_one_shard",
        monkeypatch,
        lambda call: None if failures else failures.append(1) or ConnectionError("injected: the store went away"),
    )
    request = factor_service_pb2.FitFactorsRequest(model=model, dataset=dataset.name)
    operation = manual.client.factors.FitFactors(request)
    first = take(worker, 10)
    assert first is not None and worker.handle(first) == "retry"
    started = time.monotonic()
    again = take(worker, 10)
    waited = time.monotonic() - started
    assert again is not None and again.message_id == first.message_id and again.deliveries == 2
    assert waited < 3.0, f"offered again after {waited:.1f} s; the lease is 30 s, the first backoff 1 s"
    assert worker.handle(again) == "succeeded"
    assert manual.client.wait(operation, timeout=30).done


def test_a_dead_lettered_task_quotes_its_own_last_error(redis_server, s3_server, workspace, monkeypatch):
    stepped = Cluster(redis_server.url, s3_server.url(f"b{uuid.uuid4().hex[:10]}"), workers=0, lease_seconds=0.5)
    try:
        worker = Worker(stepped.system, consumer="solo")
        model = str(workspace / "model")
        registering = stepped.client.gradients.RegisterDataset(
            gradient_service_pb2.RegisterDatasetRequest(
                model=common_pb2.ModelSpec(path=model), jsonl=(workspace / "train.jsonl").read_bytes(), shard_size=12
            )
        )
        run_until_idle(worker)
        dataset = stepped.client.unpack(stepped.client.wait(registering, timeout=30), gradient_service_pb2.Dataset)
        shard0_failures = []

        def fail(call):
            if call.shard == 1:
                return RuntimeError("shard one is broken")
            if not shard0_failures:  # shard 0 fails once, with another message, last
                shard0_failures.append(1)
                return RuntimeError("shard zero hiccup")
            return None

        failing(stepped.system.table, "covariance", monkeypatch, fail)
        operation = stepped.client.factors.FitFactors(
            factor_service_pb2.FitFactorsRequest(model=common_pb2.ModelSpec(path=model), dataset=dataset.name)
        )
        run_until_ended(worker, operation)
        with pytest.raises(AbortedError) as failed:
            stepped.client.wait(operation, timeout=10)
        message = str(failed.value)  # its caller reads no internals; the dead letter keeps the cause
        assert "covariance task (shard 1) failed 3 times; last error: internal error" in message, message
        cause = stepped.system.queue.dead_letters("covariance")[0]["cause"].decode()
        assert "shard one is broken" in cause and "hiccup" not in cause, cause
        job = operation.name.split("/")[1]
        wait_for_deletes(stepped.store, f"jobs/{job}/")
        assert not stepped.store.list(f"jobs/{job}/"), "a failed job leaves no intermediates"
    finally:
        stepped.close()


def wait_for_deletes(store, prefix: str, seconds: float = 10) -> None:
    """Deletes run on a thread of the worker's: wait until `prefix` is empty (or the time is up)."""
    deadline = time.monotonic() + seconds
    while store.list(prefix) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_cancelled_job_leaves_no_intermediates(cluster, workspace, tmp_path):
    client, model = cluster.client, str(workspace / "model")
    factor_objects = cluster.store.list("factors/")  # other tests' (the cluster is the module's)
    write_jsonl(tmp_path / "big.jsonl", [{"text": e.text} for e in make_examples(300, seed=5, max_len=40)])
    dataset = client.register_dataset(model, tmp_path / "big.jsonl", shard_size=100)
    operation = client.factors.FitFactors(
        factor_service_pb2.FitFactorsRequest(
            model=common_pb2.ModelSpec(path=model),
            dataset=dataset.name,
            batch_size=1,
            strategy=factor_service_pb2.STRATEGY_EKFAC,
        )
    )
    job = operation.name.split("/")[1]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if cluster.system.operations.get(job)["counters"].get("tokens_processed", 0) > 0:
            break  # a covariance task runs
        time.sleep(0.05)
    assert cluster.store.list(f"jobs/{job}/"), "the job has intermediates (its spec at least)"
    client.cancel(operation.name)
    with pytest.raises(CancelledError):
        client.wait(operation, timeout=30)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (
        cluster.system.queue.depth("covariance") or cluster.store.list(f"jobs/{job}/")
    ):
        time.sleep(0.1)
    assert cluster.store.list(f"jobs/{job}/") == [], "a cancelled job's objects are deleted"
    assert cluster.store.list("factors/") == factor_objects, "nothing of the cancelled factor set is left"


def test_operation_records_expire_after_their_ttl(redis_server):
    operations = OperationStore(connect(redis_server.url), prefix=f"ttl{uuid.uuid4().hex[:6]}", ttl_seconds=1)
    running, _ = operations.create("fit_factors", {})
    ended, _ = operations.create("fit_factors", {})
    operations.fail(ended["id"], 13, "boom")
    operations.report(ended["id"], step={"step": "late"})  # a late report does not revive it
    assert operations.get(ended["id"])["state"] == "FAILED"
    time.sleep(1.6)
    assert operations.get(ended["id"]) is None, "an ended operation's record expires after the TTL"
    assert operations.get(running["id"])["state"] == "PENDING", "a running one never expires"
    listed, _ = operations.list(100)
    assert [record["id"] for record in listed] == [running["id"]]
    assert operations.client.zscore(f"{operations.prefix}:ops", ended["id"]) is None
    operations.report(ended["id"], step={"step": "later"}, tokens=5)
    assert operations.get(ended["id"]) is None, "a report on an expired record recreates nothing"


def test_the_same_data_registers_once(cluster, workspace):
    client, model = cluster.client, str(workspace / "model")
    first = client.register_dataset(model, workspace / "train.jsonl", shard_size=10)
    wait_for_deletes(cluster.store, "jobs/")  # the register job's upload and spec
    objects = cluster.store.list("")
    again = client.register_dataset(model, workspace / "train.jsonl", shard_size=10)
    assert again.name == first.name and cluster.store.list("") == objects
    # a raw RegisterDataset (no client-side check) is answered from the published dataset, at once
    operation = client.gradients.RegisterDataset(
        gradient_service_pb2.RegisterDatasetRequest(
            model=common_pb2.ModelSpec(path=str((workspace / "model").resolve())),
            jsonl=(workspace / "train.jsonl").read_bytes(),
            shard_size=10,
        )
    )
    assert operation.done and client.unpack(operation, gradient_service_pb2.Dataset).name == first.name
    other = client.register_dataset(model, workspace / "train.jsonl", shard_size=12)
    assert other.name != first.name, "other settings are another dataset"


def test_bad_jsonl_is_invalid_argument_naming_the_line(cluster, workspace, monkeypatch):
    model = common_pb2.ModelSpec(path=str(workspace / "model"))

    def status(jsonl: bytes):
        with pytest.raises(grpc.RpcError) as raised:
            request = gradient_service_pb2.RegisterDatasetRequest(model=model, jsonl=jsonl)
            cluster.client.gradients.RegisterDataset(request)
        return raised.value.code(), raised.value.details()

    code, message = status(b'{"text": "fine"}\n{"text": "bad \xff\xfe byte"}\n')
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "jsonl:2: not UTF-8" in message, message
    monkeypatch.setenv("INFLUENCE_MAX_LINE_BYTES", "1000")
    code, message = status(b'{"text": "fine"}\n' + json.dumps({"text": "w1 " * 2000}).encode() + b"\n")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "jsonl:2: line of 6012 bytes" in message, message
    assert "INFLUENCE_MAX_LINE_BYTES" in message


def test_disk_full_is_a_permanent_clean_error_with_nothing_half_written(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    store.put_bytes("factors/f1/a.safetensors", b"x" * 10)
    original = LocalStore._write_atomically

    def full_disk(self, key, write):
        def half_then_full(handle):
            handle.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

        return original(self, key, half_then_full)

    monkeypatch.setattr(LocalStore, "_write_atomically", full_disk)
    with pytest.raises(StorageFull, match=r"disk full: storing 'factors/f1/b\.safetensors'") as raised:
        store.put_bytes("factors/f1/b.safetensors", b"y" * 10)
    assert raised.value.code == "RESOURCE_EXHAUSTED" and not raised.value.retryable and raised.value.callers_fault
    monkeypatch.undo()
    leftovers = sorted(path.name for path in (tmp_path / "store" / "factors" / "f1").iterdir())
    assert leftovers == ["a.safetensors"], "no temporary file and no half-written object remain"


def test_the_cli_fails_once_and_cleanly_on_a_full_disk(workspace, tmp_path, monkeypatch, capsys):
    """A fit whose factor set hits ENOSPC in the embedded store: exit 2 with one line, at the first
    attempt (not retried as transient), and no manifest in --out."""
    from services.cli import main

    original = LocalStore._write_atomically
    seen = []

    def full_disk(self, key, write):
        if key.startswith("factors/"):
            seen.append(key)

            def full(handle):
                handle.write(b"half")
                raise OSError(errno.ENOSPC, "No space left on device")

            return original(self, key, full)
        return original(self, key, write)

    monkeypatch.setattr(LocalStore, "_write_atomically", full_disk)
    out = tmp_path / "factors"
    data = str(workspace / "train.jsonl")
    code = main(["fit", "--model", str(workspace / "model"), "--data", data, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "disk full" in err, err
    assert len(seen) == 1, "the full disk fails the job at once: no retry"
    assert not (out / "manifest.json").exists()


def test_top_k_zero_is_an_error_and_a_cancelled_job_has_its_own_exit_code(manual, workspace, tmp_path, capsys):
    from services.cli import main

    queries = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "w1", "completion": "w2"}])
    model, data = str(workspace / "model"), str(workspace / "train.jsonl")
    arguments = ["score", "--model", model, "--factors", str(tmp_path), "--data", data, "--queries", str(queries)]
    code = main([*arguments, "--out", str(tmp_path / "o"), "--top-k", "0"])
    assert code == 2 and "--top-k must be >= 1, got 0" in capsys.readouterr().err
    # a job cancelled by someone else: `influence wait` exits 3 (2 is bad input, 130 an interrupt)
    operation = manual.client.gradients.RegisterDataset(  # no worker runs: it stays pending
        gradient_service_pb2.RegisterDatasetRequest(
            model=common_pb2.ModelSpec(path=str(workspace / "model")), jsonl=b'{"text": "w1 w2 w3"}\n'
        )
    )
    manual.client.operations.CancelOperation(operations_pb2.CancelOperationRequest(name=operation.name))
    assert main(["wait", operation.name, "--server", manual.server.target, "--quiet"]) == 3
    assert "cancelled" in capsys.readouterr().err


def test_a_full_queue_refuses_new_jobs_with_resource_exhausted(manual, workspace):
    manual.system.max_queued_tasks = 1
    model = common_pb2.ModelSpec(path=str(workspace / "model"))

    def register(text: str):
        request = gradient_service_pb2.RegisterDatasetRequest(model=model, jsonl=json.dumps({"text": text}).encode())
        return manual.client.gradients.RegisterDataset(request)

    accepted = register("w1 w2")  # no worker runs: its task waits
    with pytest.raises(grpc.RpcError) as refused:
        register("w3 w4")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the limit is 1 (INFLUENCE_MAX_QUEUED_TASKS)" in refused.value.details()
    assert not accepted.done


def test_a_hanging_task_is_reclaimed_after_its_lease(redis_server, s3_server, workspace, monkeypatch):
    """A task running past max_task_seconds stops being renewed; another worker reclaims it a
    lease later and finishes the job; the hung one, when it wakes, changes nothing."""
    import threading

    stepped = Cluster(redis_server.url, s3_server.url(f"b{uuid.uuid4().hex[:10]}"), workers=0, lease_seconds=0.5)
    try:
        stepped.system.queue.max_task_seconds = 1.0
        hung, wake = threading.Event(), threading.Event()

        def hang(call):
            if not hung.is_set():
                hung.set()
                wake.wait(60)
            return None

        failing(stepped.system.table, "register", monkeypatch, hang)
        model = common_pb2.ModelSpec(path=str(workspace / "model"))
        operation = stepped.client.gradients.RegisterDataset(
            gradient_service_pb2.RegisterDatasetRequest(model=model, jsonl=(workspace / "train.jsonl").read_bytes())
        )
        stuck, rescuer = Worker(stepped.system, consumer="stuck"), Worker(stepped.system, consumer="rescuer")
        first = take(stuck, 10)
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.setdefault("stuck", stuck.handle(first)))
        thread.start()
        assert hung.wait(30)
        started = time.monotonic()
        again = take(rescuer, 15)
        assert again is not None and again.message_id == first.message_id
        assert time.monotonic() - started < 5, "reclaimed about max_task_seconds + a lease after it hung"
        assert rescuer.handle(again) == "succeeded"
        wake.set()
        thread.join(60)
        # its duplicate completion records nothing twice; woken after the job's inputs were
        # cleaned up, it finds the operation ended and stops
        assert outcome["stuck"] in ("succeeded", "skipped")
        dataset = stepped.client.unpack(stepped.client.wait(operation, timeout=10), gradient_service_pb2.Dataset)
        assert dataset.num_examples == 23
        stuck.lease.close()
        rescuer.lease.close()
    finally:
        stepped.close()
