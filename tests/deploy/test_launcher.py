"""The launcher (services/launcher.py) against a fake Kubernetes API server: a small HTTP server in
this test, on a free port, that answers with recorded responses (the pool's Deployment as the
chart renders it, a Job's watch events, deletions) while the real `kubernetes` client talks to it.
The Jobs it creates are validated against the Kubernetes schemas; the sizing comes from a real
operation over gRPC; the launched worker's `--until-done` exit is checked on a real Redis."""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate
import pytest
import yaml
from google.longrunning import operations_pb2
from kubernetes import client as k8s

from services.cli.servers import stop_when_ended
from services.client import InfluenceClient
from services.embedded import EmbeddedSystem
from services.errors import NotFoundError, PreconditionError
from services.gen.influence.v1 import common_pb2, factor_service_pb2
from services.launcher import Launcher, job_manifest, main, pool_deployment_name, shards_of
from tests.support.helm import KUBERNETES, pod, render
from tests.support.stepping import registered

NAMESPACE = "influence"


class FakeKubernetes:
    """Recorded responses for the few endpoints the launcher uses; every request is logged."""

    def __init__(self, deployments: dict[str, dict], job_statuses: list[dict]):
        self.deployments = deployments
        self.job_statuses = job_statuses  # the watch events' statuses, in order
        self.jobs: dict[str, dict] = {}
        self.created: list[dict] = []
        self.deleted: list[tuple[str, dict]] = []
        self.requests: list[tuple[str, str]] = []
        self.forbidden = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def status(self, code: int, reason: str, message: str) -> None:
                self.reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                                  "message": message, "code": code})  # fmt: skip

            def route(self, method: str) -> None:
                url = urlsplit(self.path)
                fake.requests.append((method, url.path))
                if fake.forbidden:
                    return self.status(403, "Forbidden", "jobs.batch is forbidden")
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                if match := re.fullmatch(rf"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/([\w.-]+)", url.path):
                    found = fake.deployments.get(match[1])
                    return self.reply(200, found) if found else self.status(404, "NotFound", f"{match[1]} not found")
                if url.path == f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs" and method == "POST":
                    fake.created.append(body)
                    fake.jobs[body["metadata"]["name"]] = body
                    return self.reply(201, {**body, "status": {}})
                if url.path == f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs" and method == "GET":
                    query = parse_qs(url.query)
                    name = query["fieldSelector"][0].removeprefix("metadata.name=")
                    assert query.get("watch") == ["true"], query
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    for n, status in enumerate(fake.job_statuses):
                        event = {
                            "type": "ADDED" if n == 0 else "MODIFIED",
                            "object": {**fake.jobs[name], "status": status},
                        }
                        self.wfile.write(json.dumps(event).encode() + b"\n")
                        self.wfile.flush()
                    return None
                match = re.fullmatch(rf"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/([\w.-]+)", url.path)
                if match and method == "DELETE":
                    fake.deleted.append((match[1], body))
                    fake.jobs.pop(match[1], None)
                    return self.reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                return self.status(404, "NotFound", f"no route for {method} {url.path}")

            def do_GET(self):
                self.route("GET")

            def do_POST(self):
                self.route("POST")

            def do_DELETE(self):
                self.route("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def api_client(self) -> k8s.ApiClient:
        configuration = k8s.Configuration()
        configuration.host = self.host
        return k8s.ApiClient(configuration)

    def __enter__(self) -> FakeKubernetes:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def chart_deployment(values: str, pool: str) -> dict:
    """The pool's Deployment as the API server returns it once the chart's is applied (release rel,
    in NAMESPACE): resource quantities come back as strings."""
    docs = render(values)
    deployment = copy.deepcopy(
        next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == f"rel-influence-{pool}")
    )
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        for part in container.get("resources", {}).values():
            part.update({name: str(value) for name, value in part.items()})
    return {**deployment, "metadata": {**deployment["metadata"], "namespace": NAMESPACE}}


COMPLETE = [
    {"active": 3},
    {"active": 1, "succeeded": 2},
    {"succeeded": 3, "conditions": [{"type": "Complete", "status": "True"}]},
]


@pytest.mark.needs_helm
def test_launch_creates_an_indexed_job_of_the_pools_pods_watches_it_and_deletes_it():
    deployment = chart_deployment("full.yaml", "worker-gpu")
    name = deployment["metadata"]["name"]
    with FakeKubernetes({name: deployment}, COMPLETE) as fake:
        result = Launcher(fake.api_client(), NAMESPACE).run(name, "operations/0123456789abcdef", workers=3)
    assert (result.outcome, result.succeeded, result.failed, result.workers) == ("Complete", 3, 0, 3)
    [job] = fake.created
    kubernetes_validate.validate(job, KUBERNETES, strict=True)
    assert job["metadata"]["name"] == result.job == "rel-influence-worker-gpu-0123456789ab"
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    template, pool = spec["template"], deployment["spec"]["template"]
    assert template["spec"]["restartPolicy"] == "OnFailure"
    container, pool_container = template["spec"]["containers"][0], pool["spec"]["containers"][0]
    assert container["args"] == [*pool_container["args"], "--until-done", "operations/0123456789abcdef"]
    for key in ("image", "resources", "env", "envFrom", "securityContext", "volumeMounts"):
        assert container[key] == pool_container[key], key  # the pool's pods: device, GPUs, secrets, scratch
    for key in ("nodeSelector", "tolerations", "affinity", "volumes", "securityContext", "serviceAccountName"):
        assert template["spec"][key] == pool["spec"][key], key
    labels = template["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "launch-gpu"  # not the pool's: its PDB and Deployment ignore it
    assert labels["influence.io/operation"] == "0123456789abcdef"
    # bounded by Kubernetes itself, whatever happens to the launcher: a deadline (the launcher's
    # --timeout, a day by default) and a few retries per pod index
    assert (spec["activeDeadlineSeconds"], spec["backoffLimitPerIndex"]) == (86_400, 2)
    assert fake.deleted == [(result.job, {"propagationPolicy": "Background"})]
    assert [method for method, _ in fake.requests] == ["GET", "POST", "GET", "DELETE"]


@pytest.mark.needs_helm
def test_a_failed_job_is_reported_and_still_deleted():
    deployment = chart_deployment("default.yaml", "worker-cpu")
    failed = [{"active": 2}, {"failed": 4, "conditions": [{"type": "Failed", "status": "True"}]}]
    with FakeKubernetes({deployment["metadata"]["name"]: deployment}, failed) as fake:
        result = Launcher(fake.api_client(), NAMESPACE).run(deployment["metadata"]["name"], "operations/ab", workers=2)
    assert (result.outcome, result.failed) == ("Failed", 4)
    assert [name for name, _ in fake.deleted] == [result.job]
    kubernetes_validate.validate(fake.created[0], KUBERNETES, strict=True)


@pytest.mark.needs_helm
def test_a_job_that_never_ends_times_out_and_is_deleted():
    deployment = chart_deployment("default.yaml", "worker-gpu")
    with FakeKubernetes({deployment["metadata"]["name"]: deployment}, [{"active": 1}]) as fake:
        started = time.monotonic()
        result = Launcher(fake.api_client(), NAMESPACE).run(
            deployment["metadata"]["name"], "operations/x", 1, timeout=1.5
        )
    assert result.outcome == "Timeout" and time.monotonic() - started < 15
    assert [name for name, _ in fake.deleted] == [result.job]


@pytest.mark.needs_helm
def test_missing_pool_and_missing_rights_are_clear_errors():
    with FakeKubernetes({}, COMPLETE) as fake:
        launcher = Launcher(fake.api_client(), NAMESPACE)
        with pytest.raises(NotFoundError, match="rel-influence-worker-tpu"):
            launcher.launch("rel-influence-worker-tpu", "operations/x", 1)
        fake.forbidden = True
        with pytest.raises(PreconditionError, match=r"launcher\.rbac\.create"):
            launcher.launch("rel-influence-worker-gpu", "operations/x", 1)
    assert not fake.created
    with pytest.raises(PreconditionError, match="not a worker pool"):
        job_manifest(chart_deployment("default.yaml", "api"), "operations/x", 1)


@pytest.mark.needs_servers
@pytest.mark.needs_helm
def test_the_launcher_sizes_the_job_to_a_real_operations_shards(workspace, tmp_path):
    """End to end through `python -m services.launcher`: shards from a real fit over gRPC, the Job
    through a kubeconfig pointing at the fake API."""
    model = common_pb2.ModelSpec(path=str(workspace / "model"))
    deployment = chart_deployment("default.yaml", "worker-gpu")
    with EmbeddedSystem(workers=0) as system, InfluenceClient(system.target) as client:
        from services.system.runner import Worker

        dataset = registered(client, Worker(system.system, consumer="A"), model,
                             (workspace / "train.jsonl").read_bytes(), shard_size=6)  # fmt: skip
        operation = client.factors.FitFactors(factor_service_pb2.FitFactorsRequest(model=model, dataset=dataset.name))
        assert shards_of(client, operation.name) == 4  # 23 sequences in shards of 6
        with FakeKubernetes({deployment["metadata"]["name"]: deployment}, COMPLETE) as fake:
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": fake.host}}],
                "users": [{"name": "fake", "user": {"token": "t"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NAMESPACE}}],
            }))  # fmt: skip
            code = main(["--server", system.target, "--operation", operation.name, "--pool", "gpu",
                         "--release", "rel-influence", "--namespace", NAMESPACE, "--max-workers", "3",
                         "--kubeconfig", str(kubeconfig)])  # fmt: skip
        assert code == 0
        assert fake.created[0]["spec"]["completions"] == 3  # min(4 shards, --max-workers 3)
        client.operations.CancelOperation(operations_pb2.CancelOperationRequest(name=operation.name))
        assert pool_deployment_name("rel-influence", "gpu") == deployment["metadata"]["name"]


@pytest.mark.needs_servers
def test_a_launched_worker_stops_when_its_operation_ends(workspace):
    model = common_pb2.ModelSpec(path=str(workspace / "model"))
    with EmbeddedSystem(workers=0) as system, InfluenceClient(system.target) as client:
        from services.system.runner import Worker

        dataset = registered(client, Worker(system.system, consumer="A"), model,
                             (workspace / "train.jsonl").read_bytes(), shard_size=12)  # fmt: skip
        operation = client.factors.FitFactors(factor_service_pb2.FitFactorsRequest(model=model, dataset=dataset.name))
        stop = threading.Event()
        stop_when_ended(system.system, operation.name.removeprefix("operations/"), stop, every=0.05)
        assert not stop.wait(0.5)  # running: keep working
        client.operations.CancelOperation(operations_pb2.CancelOperationRequest(name=operation.name))
        assert stop.wait(5)
        gone = threading.Event()
        stop_when_ended(system.system, "no-such-operation", gone, every=0.05)
        assert gone.wait(5)


@pytest.mark.needs_helm
def test_the_chart_renders_the_launchers_least_privilege():
    docs = render("everything.yaml")
    role = next(d for d in docs if d["kind"] == "Role")
    pools = sorted(
        d["metadata"]["name"] for d in docs if d["kind"] == "Deployment" and "-worker-" in d["metadata"]["name"]
    )
    assert role["rules"] == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"], "resourceNames": pools},
    ]
    assert pod(docs, "worker-gpu")["spec"]["serviceAccountName"] == "rel-influence"  # workers keep theirs


@pytest.mark.needs_helm
def test_the_in_cluster_launcher_manifest_is_a_bounded_job_of_the_charts_launcher_account():
    """deploy/kubernetes/launcher-job.yaml: valid (strict), bounded, run as the ServiceAccount the
    chart's launcher.rbac makes (for release RELEASE), with arguments the launcher accepts."""
    from tests.support import ROOT

    job = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "launcher-job.yaml").read_text())
    kubernetes_validate.validate(job, KUBERNETES, strict=True)
    spec = job["spec"]
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] > 86_400 and spec["ttlSecondsAfterFinished"]
    pod_spec = spec["template"]["spec"]
    docs = render("everything.yaml", sets=("fullnameOverride=RELEASE-influence",))
    [account] = [doc for doc in docs if doc["kind"] == "ServiceAccount" and "launcher" in doc["metadata"]["name"]]
    assert pod_spec["serviceAccountName"] == account["metadata"]["name"]
    container = pod_spec["containers"][0]
    assert container["command"] == ["python", "-m", "services.launcher"]
    timeout = next(arg for arg in container["args"] if arg.startswith("--timeout="))
    assert spec["activeDeadlineSeconds"] > float(timeout.split("=")[1])
    with pytest.raises(SystemExit) as parsed:  # every flag is the launcher's: only --help exits 0 here
        main([*container["args"], "--help"])
    assert parsed.value.code == 0
