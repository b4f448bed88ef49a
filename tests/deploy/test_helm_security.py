"""The chart's security options (ci/secure.yaml; lint and schema validation of every value set
are in test_helm.py): the tokens file and TLS files from Secrets, mounted into the API pods only,
the model roots and the quota in the ConfigMap."""

from __future__ import annotations

import pytest

from services.assembly import ROLES
from tests.support.helm import env, get, pod, render, render_fails

pytestmark = pytest.mark.needs_helm  # every test renders the chart

# the pods that serve the API: the one entry point (per-role Deployments are opt-in)
API_PODS = ("api",)


def test_tokens_and_tls_come_from_secrets_mounted_into_the_api_pods_only():
    docs = render("secure.yaml")
    for role in API_PODS:
        spec = pod(docs, role)["spec"]
        container = spec["containers"][0]
        variables = env(pod(docs, role))
        assert variables["INFLUENCE_AUTH_TOKENS"]["value"] == "/etc/influence/auth/tokens.txt"
        assert variables["INFLUENCE_SERVE_TLS_CERT"]["value"] == "/etc/influence/tls/tls.crt"
        assert variables["INFLUENCE_SERVE_TLS_KEY"]["value"] == "/etc/influence/tls/tls.key"
        assert variables["INFLUENCE_SERVE_TLS_CLIENT_CA"]["value"] == "/etc/influence/tls/ca.crt"
        mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
        assert set(mounts) == {"scratch", "models", "auth-tokens", "tls"}
        assert all(mount["readOnly"] for name, mount in mounts.items() if name != "scratch")
        # a directory, not a subPath: Kubernetes' updates of the Secret reach the file the server re-reads
        assert "subPath" not in mounts["auth-tokens"]
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        assert volumes["auth-tokens"]["secret"]["secretName"] == "influence-tokens"
        assert volumes["auth-tokens"]["secret"]["items"] == [{"key": "tokens.txt", "path": "tokens.txt"}]
        assert volumes["tls"]["secret"]["secretName"] == "influence-tls"
        assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "models"}
        # the kubelet's gRPC probes cannot speak TLS: the metrics port's /healthz and /livez answer instead
        # (without a metrics port, the gRPC port is probed by TCP)
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["port"] == "metrics" and "grpc" not in container[probe]
    bare = render("secure.yaml", sets=tuple(f"services.{role}.metricsPort=0" for role in ("api", *ROLES)))
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert pod(bare, "api")["spec"]["containers"][0][probe]["tcpSocket"] == {"port": "grpc"}
    for worker in ("worker-gpu", "worker-cpu"):
        template = pod(docs, worker)
        assert not {"INFLUENCE_AUTH_TOKENS", "INFLUENCE_SERVE_TLS_KEY"} & set(env(template))
        assert {m["name"] for m in template["spec"]["containers"][0].get("volumeMounts", [])} == {"scratch", "models"}
    config = get(docs, "ConfigMap", "rel-influence")["data"]
    assert config["INFLUENCE_MODEL_ROOTS"] == "/models"
    assert config["INFLUENCE_MAX_QUEUED_OPERATIONS"] == "20"


def test_without_security_values_nothing_changes():
    docs = render("default.yaml")
    for role in API_PODS:
        container = pod(docs, role)["spec"]["containers"][0]
        assert not {"INFLUENCE_AUTH_TOKENS", "INFLUENCE_SERVE_TLS_CERT"} & set(env(pod(docs, role)))
        assert {mount["name"] for mount in container["volumeMounts"]} == {"scratch"}
        assert container["readinessProbe"]["grpc"]["port"] == 50051
    config = get(docs, "ConfigMap", "rel-influence")["data"]
    assert "INFLUENCE_MODEL_ROOTS" not in config  # no models volume: nowhere to restrict to
    assert config["INFLUENCE_MAX_QUEUED_OPERATIONS"] == "0"
    # TLS without client certificates: no client CA
    docs = render("secure.yaml", sets=("tls.requireClientCertificates=false",))
    assert "INFLUENCE_SERVE_TLS_CLIENT_CA" not in env(pod(docs, "api"))


def test_schema_rejects_bad_security_values():
    assert "maxQueuedOperations" in render_fails("auth.maxQueuedOperations=-1")
    assert "tokenFile" in render_fails("auth.tokenFile=x")
