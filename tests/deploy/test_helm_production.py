"""The chart as a platform team takes it to production: autoscaling where KEDA is absent, probes
that restart only a dead process, worker drains, `helm test` over TLS and mutual TLS (its script run
here against real gRPC servers) and under the chart's NetworkPolicy, renders that are stable for
GitOps, a parent chart's `global`, image digests. Needs tools/bin/helm."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from services.rpc.server import server_credentials
from tests.support.helm import CHART, env, get, helm, pod, render, template_args, validate
from tests.support.servers.certs import make_certificates
from tests.support.servers.ports import free_ports

pytestmark = pytest.mark.needs_helm


def test_without_keda_the_pools_get_an_hpa_and_keda_can_be_forced():
    """engine auto: a cluster that serves no keda.sh API (helm template without --api-versions, or a
    cluster without KEDA's CRDs) gets an HPA per autoscaled pool instead of a ScaledObject that
    could not be installed."""
    docs = render("everything.yaml", apis=())
    assert not [doc for doc in docs if doc["kind"] in ("ScaledObject", "TriggerAuthentication")]
    hpa = get(docs, "HorizontalPodAutoscaler", "rel-influence-worker-gpu")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 8)  # an HPA cannot scale to zero
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    for doc in docs:
        validate(doc)
    metric = {"metric": {"name": "influence_queue_tasks"}, "target": {"type": "AverageValue", "averageValue": 1}}
    external = {"type": "External", "external": metric}
    custom = render(
        "everything.yaml",
        sets=(
            "workers.pools.gpu.autoscaling.engine=hpa",
            "workers.pools.gpu.autoscaling.hpa.metrics[0].type=External",
            "workers.pools.gpu.autoscaling.hpa.metrics[0].external.metric.name=influence_queue_tasks",
            "workers.pools.gpu.autoscaling.hpa.metrics[0].external.target.type=AverageValue",
            "workers.pools.gpu.autoscaling.hpa.metrics[0].external.target.averageValue=1",
            "workers.pools.a100.autoscaling.engine=keda",
            "workers.defaults.autoscaling.cooldownPeriod=900",
        ),
        apis=(),
    )
    assert get(custom, "HorizontalPodAutoscaler", "rel-influence-worker-gpu")["spec"]["metrics"] == [external]
    forced = get(custom, "ScaledObject", "rel-influence-worker-a100")["spec"]
    assert forced["cooldownPeriod"] == 900
    for doc in custom:
        validate(doc)


def test_worker_pods_get_liveness_readiness_startup_and_a_rollout_that_needs_no_spare_gpu():
    docs = render("default.yaml")
    for pool in ("gpu", "cpu"):
        template = pod(docs, f"worker-{pool}")
        container = template["spec"]["containers"][0]
        assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
        assert container["startupProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        deployment = get(docs, "Deployment", f"rel-influence-worker-{pool}")["spec"]
        assert deployment["strategy"] == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
        }
        assert env(template)["INFLUENCE_DRAIN_SECONDS"]["value"] == "285"
    # a pool's own probe wins; without a metrics port, only the probes a pool gives itself
    full = pod(render("full.yaml"), "worker-gpu")["spec"]["containers"][0]
    assert "exec" in full["livenessProbe"] and "httpGet" not in full["livenessProbe"]
    bare = pod(render("default.yaml", sets=("workers.pools.cpu.metricsPort=0",)), "worker-cpu")["spec"]["containers"][0]
    assert not {"livenessProbe", "readinessProbe", "startupProbe"} & set(bare)


def test_with_tls_the_api_probes_ask_the_metrics_port_and_helm_test_uses_tls():
    docs = render("secure.yaml")
    container = pod(docs, "api")["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    test = get(docs, "Pod", "rel-influence-health-test")["spec"]
    assert test["volumes"] == [{"name": "tls", "secret": {"secretName": "influence-tls", "defaultMode": 0o444}}]
    assert test["containers"][0]["volumeMounts"][0]["mountPath"] == "/etc/influence/tls"
    client = render("secure.yaml", sets=("tls.testClientSecret=test-client", "tls.serverName=influence.example.com"))
    test = get(client, "Pod", "rel-influence-health-test")["spec"]
    assert test["volumes"][0]["secret"]["secretName"] == "test-client"
    assert test["containers"][0]["env"] == [{"name": "TLS_SERVER_NAME", "value": "influence.example.com"}]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


def health_server(credentials) -> tuple[grpc.Server, str]:
    """A gRPC server with only the standard health service (SERVING), plaintext or with TLS."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = free_ports(1)[0]
    address = f"localhost:{port}"
    if credentials is None:
        server.add_insecure_port(address)
    else:
        server.add_secure_port(address, credentials)
    server.start()
    return server, address


def run_helm_test(docs, target: str, tls_dir=None) -> subprocess.CompletedProcess:
    """The `helm test` pod's own command, run here against `target` (as the pod runs it against
    each Service), with its TLS Secret's files in `tls_dir`."""
    container = get(docs, "Pod", "rel-influence-health-test")["spec"]["containers"][0]
    command = [sys.executable, *container["command"][1:], container["args"][0], target]
    environment = {**os.environ, "TLS_DIR": str(tls_dir or "/nonexistent")}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)


def test_the_helm_test_script_checks_health_plaintext_over_tls_and_with_mutual_tls(certificates, tmp_path):
    docs = render("secure.yaml")
    secret = tmp_path / "secret"  # the mounted kubernetes.io/tls Secret
    secret.mkdir()
    shutil.copy(certificates.ca, secret / "ca.crt")
    shutil.copy(certificates.client_cert, secret / "tls.crt")
    shutil.copy(certificates.client_key, secret / "tls.key")
    cert, key, ca = str(certificates.server_cert), str(certificates.server_key), str(certificates.ca)
    for credentials, tls_dir in (
        (None, None),
        (server_credentials(cert, key), secret),
        (server_credentials(cert, key, ca), secret),
    ):
        server, target = health_server(credentials)
        try:
            result = run_helm_test(docs, target, tls_dir)
        finally:
            server.stop(0)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{target} SERVING" in result.stdout
    # mutual TLS with a client the server's CA never signed: the test fails, naming the target
    shutil.copy(certificates.other_ca, secret / "ca.crt")
    server, target = health_server(server_credentials(cert, key, ca))
    try:
        result = run_helm_test(docs, target, secret)
    finally:
        server.stop(0)
    assert result.returncode != 0 and f"not serving: {target}" in result.stderr


def test_renders_are_stable_for_gitops_once_the_password_is_given():
    """Argo CD and Flux render offline (`helm template`): a generated Redis password would change
    on every render; with redis.auth.password (or existingSecret) two renders are identical, and
    the password's checksum rolls the pods when it changes."""
    args = template_args(("everything.yaml",), ())
    assert helm(*args).stdout == helm(*args).stdout
    generated = template_args(("default.yaml",), ())
    assert helm(*generated).stdout != helm(*generated).stdout  # why docs/deploy.md says to set one
    before = pod(render("everything.yaml"), "api")["metadata"]["annotations"]["checksum/config"]
    after = pod(render("everything.yaml", sets=("redis.auth.password=another-one",)), "api")
    assert after["metadata"]["annotations"]["checksum/config"] != before
    notes = helm("install", "rel", str(CHART), "--dry-run=client", "-f", str(CHART / "ci" / "default.yaml")).stdout
    assert "set redis.auth.password or redis.existingSecret" in notes
    assert "NVIDIA driver >= 580" in notes  # the CUDA image's requirement, said where installs look


def test_global_registry_pull_secrets_and_storage_class_and_digests_are_honoured():
    docs = render(
        "default.yaml",
        sets=(
            "global.imageRegistry=mirror.example.com",
            "global.imagePullSecrets[0]=mirror-pull",
            "global.storageClass=fast-ssd",
            "image.repository=ghcr.io/influence/influence",
            "image.digest=sha256:" + "a" * 64,
            "image.cudaDigest=sha256:" + "b" * 64,
            "imagePullSecrets[0].name=own-pull",
        ),
    )
    api = pod(docs, "api")["spec"]
    assert api["containers"][0]["image"] == "mirror.example.com/influence/influence:0.1.0@sha256:" + "a" * 64
    gpu = pod(docs, "worker-gpu")["spec"]
    assert gpu["containers"][0]["image"] == "mirror.example.com/influence/influence:0.1.0-cuda@sha256:" + "b" * 64
    for spec in (api, gpu, get(docs, "Pod", "rel-influence-health-test")["spec"]):
        assert spec["imagePullSecrets"] == [{"name": "own-pull"}, {"name": "mirror-pull"}]
    redis = get(docs, "StatefulSet", "rel-influence-redis")["spec"]
    assert redis["template"]["spec"]["containers"][0]["image"].startswith("mirror.example.com/redis:")
    assert redis["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast-ssd"
    for doc in docs:
        validate(doc)


def exported_metric_names(redis_url: str, store: str) -> set[str]:
    """Every series name an API server's /metrics shows (after one call and one task were observed),
    from a real MetricsServer over a real JobSystem."""
    import re
    import urllib.request

    from services.assembly import connect
    from services.system import metrics

    with connect(redis_url, store) as system:
        server = metrics.MetricsServer(0, system=system)
        try:
            metrics.observe_rpc("/influence.v1.FactorService/FitFactors", "OK", 0.1)
            metrics.TASK_SECONDS.labels("covariance", "succeeded").observe(1.0)
            metrics.WORKER_SERVING.labels("probe", "cpu").set(1)
            system.store.put_bytes("probe", b"x")  # store traffic
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as response:
                text = response.read().decode()
        finally:
            metrics.WORKER_SERVING.remove("probe", "cpu")
            server.close()
    return set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", text, re.MULTILINE))


def test_alerts_and_dashboard_render_valid_and_name_only_metrics_the_system_exports(redis_server, tmp_path):
    import json
    import re

    docs = render("everything.yaml")
    rule = get(docs, "PrometheusRule", "rel-influence")
    validate(rule)
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    alerts = {entry["alert"]: entry for entry in rule["spec"]["groups"][0]["rules"]}
    assert {
        "InfluenceQueueStalled", "InfluenceDeadLetters", "InfluenceDependencyDown", "InfluenceWorkerNotServing",
        "InfluenceErrorRate",
    } == set(alerts)  # fmt: skip
    assert "> 600" in alerts["InfluenceQueueStalled"]["expr"]
    dashboard = json.loads(get(docs, "ConfigMap", "rel-influence-dashboard")["data"]["influence.json"])
    assert get(docs, "ConfigMap", "rel-influence-dashboard")["metadata"]["labels"]["grafana_dashboard"] == "1"
    expressions = [entry["expr"] for entry in alerts.values()]
    expressions += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    named = {name for expr in expressions for name in re.findall(r"\b((?:influence|process)_[a-z_]+)\b", expr)}
    exported = exported_metric_names(redis_server.url, str(tmp_path / "store"))
    assert named and named <= exported, f"not exported: {sorted(named - exported)}"
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
