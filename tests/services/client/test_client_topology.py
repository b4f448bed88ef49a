"""The client against a deployment's topology: one server per service (per-service targets),
several replicas behind one name (round-robin), and no torch (nor any server-side package) in a
client's process."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
import threading
import uuid

import grpc
import pytest
from google.longrunning import operations_pb2

from services.assembly import job_system, make_server
from services.client import InfluenceClient
from services.engine.records import Query
from services.errors import InputError
from services.jobs.connection import connect
from services.rpc.server import BackgroundServer
from services.storage import LocalStore
from services.system.runner import Worker


@pytest.fixture
def one_server_per_service(redis_server, tmp_path):
    system = job_system(LocalStore(tmp_path / "store"), connect(redis_server.url), prefix=f"t{uuid.uuid4().hex[:8]}")
    servers = {
        role: BackgroundServer(lambda role=role: make_server(system, roles=(role,))).start()
        for role in ("factor", "gradient", "query")
    }
    worker = Worker(system, consumer="w")
    thread = threading.Thread(target=worker.run_forever, kwargs={"block_ms": 100}, daemon=True)
    thread.start()
    yield {role: server.target for role, server in servers.items()}
    worker.stop.set()
    thread.join(30)
    for server in servers.values():
        server.stop()


def test_per_service_targets_run_a_whole_job_each_call_on_its_own_service(one_server_per_service, workspace):
    targets = one_server_per_service
    model = str(workspace / "model")
    with InfluenceClient(
        factor_target=targets["factor"], gradient_target=targets["gradient"], query_target=targets["query"]
    ) as client:
        dataset = client.register_dataset(model, workspace / "train.jsonl")
        factors = client.fit_factors(model, dataset.name)
        result = client.compute_scores(model, factors.name, dataset.name, [Query("q", "w1 w2", " w3")], top_k=3)
        assert [row.rank for row in client.score_rows(result.name)] == [1, 2, 3]
    # one target for all three services, pointed at the factor server: the other services are not there
    with InfluenceClient(targets["factor"], retries=0) as client, pytest.raises(Exception) as raised:
        client.register_dataset(model, workspace / "train.jsonl")
    assert "UNIMPLEMENTED" in repr(raised.value) or "unimplemented" in str(raised.value).lower()


def test_a_client_needs_a_target_for_every_service():
    with pytest.raises(InputError, match="no target for the gradient, query service"):
        InfluenceClient(factor_target="localhost:1")


def test_a_name_with_several_replicas_spreads_calls_round_robin(redis_server, tmp_path):
    """Two servers over different Redis prefixes: an operation exists on one only, so which
    replica answered each call shows in the answer."""
    client_redis = connect(redis_server.url)
    systems = [
        job_system(LocalStore(tmp_path / f"s{n}"), client_redis, prefix=f"rr{uuid.uuid4().hex[:8]}") for n in range(2)
    ]
    operation, _ = systems[0].operations.create("probe", {})
    servers = [BackgroundServer(lambda s=s: make_server(s, roles=("query",))).start() for s in systems]
    try:
        target = "ipv4:" + ",".join(server.target for server in servers)
        answers = []
        with InfluenceClient(target, retries=0) as client:
            grpc.channel_ready_future(client._channels[target]).result(timeout=10)
            for _ in range(20):
                try:
                    client.operations.GetOperation(
                        operations_pb2.GetOperationRequest(name=f"operations/{operation['id']}")
                    )
                    answers.append("found")
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.NOT_FOUND
                    answers.append("absent")
        assert answers.count("found") >= 5 and answers.count("absent") >= 5, answers
    finally:
        for server in servers:
            server.stop()


def system_only_modules() -> set[str]:
    """Top-level modules of the distributions in the `system` extra (torch, redis, ...), none of
    which the base install (the client's) has. From the installed package's metadata."""

    def name(requirement: str) -> str:
        return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    requirements = importlib.metadata.requires("influence-services")
    base = {name(r) for r in requirements if "extra ==" not in r}
    assert base == {"grpcio", "protobuf", "googleapis-common-protos"}, base
    system = {name(r) for r in requirements if 'extra == "system"' in r}
    modules = {
        module
        for module, distributions in importlib.metadata.packages_distributions().items()
        if any(d.lower().replace("_", "-") in system for d in distributions)
    }
    assert {"torch", "transformers", "redis", "minio", "safetensors"} <= modules
    return modules


def test_the_client_runs_without_torch_or_any_server_side_package(one_server_per_service, workspace):
    """A client process that cannot import any package of the `system` extra (torch,
    transformers, redis, minio, safetensors, ...: an import raises) registers, fits, scores and
    downloads through the services."""
    script = textwrap.dedent(
        """
        import json, sys
        BLOCKED = set(json.loads(sys.argv[5]))

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{name} is not available to a client")
                return None

        sys.meta_path.insert(0, Blocker())
        from services.client import InfluenceClient
        from services.engine.records import Query

        targets, model, data, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
        with InfluenceClient(factor_target=targets["factor"], gradient_target=targets["gradient"],
                             query_target=targets["query"]) as client:
            dataset = client.register_dataset(model, data)
            factors = client.fit_factors(model, dataset.name)
            result = client.compute_scores(model, factors.name, dataset.name, [Query("q", "w1 w2", " w3")], top_k=2)
            client.download_result(result.name, out)
        print(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
        """
    )
    out = workspace / f"client-out-{uuid.uuid4().hex[:6]}"
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            json.dumps(one_server_per_service),
            str(workspace / "model"),
            str(workspace / "train.jsonl"),
            str(out),
            json.dumps(sorted(system_only_modules())),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"
    assert json.loads((out / "results.json").read_text())["queries"][0]["top"]
