"""The Helm chart: lint, render, validate every manifest against the Kubernetes 1.30 schemas
(strict: unknown fields fail), and check what matters for GPUs, probes and wiring."""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "influence"
HELM = ROOT / "tools" / "bin" / "helm"
KUBERNETES = "1.30"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    if not HELM.exists():
        pytest.fail("helm is not installed: run `bash scripts/test.sh` (it installs tools/bin/helm)")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, check=check, timeout=60)


def render(*value_files: str, sets: tuple[str, ...] = ()) -> list[dict]:
    args = ["template", "rel", str(CHART)]
    for name in value_files:
        args += ["-f", str(CHART / "ci" / name)]
    for item in sets:
        args += ["--set", item]
    return [doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc]


def by_name(docs: list[dict], kind: str, name: str) -> dict:
    return next(doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name)


@pytest.mark.parametrize("values", ["default.yaml", "full.yaml"])
def test_lint_strict(values):
    result = helm("lint", "--strict", str(CHART), "-f", str(CHART / "ci" / values))
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", [("default.yaml",), ("full.yaml",), ("default.yaml", "full.yaml")])
def test_every_rendered_manifest_is_valid_kubernetes(values):
    docs = render(*values)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_gpu_pools_get_gpus_tolerations_and_affinity():
    docs = render("full.yaml")
    gpu = by_name(docs, "Deployment", "rel-influence-worker-gpu")["spec"]["template"]["spec"]
    container = gpu["containers"][0]
    assert (
        container["resources"]["limits"]["nvidia.com/gpu"] == 2 == container["resources"]["requests"]["nvidia.com/gpu"]
    )
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    terms = gpu["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0]["key"] == "nvidia.com/gpu.present"
    assert gpu["nodeSelector"] == {"cloud.example.com/pool": "a100"}
    assert container["args"][:5] == ["worker", "--pool", "gpu", "--kinds", "covariance,correction,score,self"]
    cpu = by_name(docs, "Deployment", "rel-influence-worker-cpu")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(cpu)


def test_services_use_grpc_probes_and_stable_selectors():
    default, full = render("default.yaml"), render("full.yaml")
    for role in ("factor", "gradient", "query"):
        deployment = by_name(default, "Deployment", f"rel-influence-{role}")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["readinessProbe"]["grpc"] == {"port": 50051} == container["livenessProbe"]["grpc"]
        assert container["args"][:3] == ["serve", "--role", role]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector == by_name(full, "Deployment", f"rel-influence-{role}")["spec"]["selector"]["matchLabels"]
        assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}
        service = by_name(default, "Service", f"rel-influence-{role}")
        assert service["spec"]["selector"] == selector


def test_config_changes_roll_the_pods():
    def checksum(docs):
        return by_name(docs, "Deployment", "rel-influence-query")["spec"]["template"]["metadata"]["annotations"][
            "checksum/config"
        ]

    assert checksum(render("default.yaml")) != checksum(render("default.yaml", sets=("logLevel=debug",)))


def test_external_redis_and_secret_wiring():
    docs = render("full.yaml")
    assert not [doc for doc in docs if doc["kind"] == "StatefulSet"]
    env = {
        e["name"]: e
        for e in by_name(docs, "Deployment", "rel-influence-factor")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["INFLUENCE_REDIS_URL"]["value"] == "redis://redis.example.com:6379/2"
    assert env["INFLUENCE_STORE_URL"]["value"].startswith("s3://prod-influence?endpoint=s3.example.com:443&secure=1")
    assert env["INFLUENCE_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
    pdbs = {doc["metadata"]["name"] for doc in docs if doc["kind"] == "PodDisruptionBudget"}
    assert pdbs == {"rel-influence-query", "rel-influence-worker-gpu"}
    default = render("default.yaml")
    assert by_name(default, "StatefulSet", "rel-influence-redis")["spec"]["template"]["spec"]["containers"][0]["args"][
        :2
    ] == [
        "--appendonly",
        "yes",
    ]


def test_bad_values_fail_with_every_problem_listed():
    result = helm(
        "template",
        "rel",
        str(CHART),
        "--set",
        "redis.enabled=false",
        "--set",
        "objectStore.endpoint=",
        "--set",
        "workers.pools.gpu.resources.limits.nvidia\\.com/gpu=1",
        check=False,
    )
    assert result.returncode != 0
    for problem in (
        "set redis.url when redis.enabled is false",
        "objectStore.endpoint is empty",
        "set existingSecret, or both accessKey and secretKey",
        "workers.pools.gpu: set gpus",
    ):
        assert problem in result.stderr, result.stderr
    typed = helm(
        "template",
        "rel",
        str(CHART),
        "-f",
        str(CHART / "ci" / "default.yaml"),
        "--set",
        "services.query.replicaCount=many",
        check=False,
    )
    assert typed.returncode != 0 and "replicaCount" in typed.stderr
    unknown = helm(
        "template", "rel", str(CHART), "-f", str(CHART / "ci" / "default.yaml"), "--set", "colour=blue", check=False
    )
    assert unknown.returncode != 0 and "colour" in unknown.stderr
