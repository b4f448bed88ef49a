"""Rendering the Helm chart for the tests: `render` (cached) and `render_fails` run tools/bin/helm
(installed by scripts/install/helm.sh) on the chart with ci/ value files and --set items;
`validate` checks a manifest against the strict Kubernetes schemas, or ours in schemas/ for the
custom resources (KEDA, ServiceMonitor); `get`, `pod` and `env` pick parts of what was rendered."""

from __future__ import annotations

import json
import subprocess
from functools import cache

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support import ROOT

CHART = ROOT / "deploy" / "helm" / "influence"
HELM = ROOT / "tools" / "bin" / "helm"
KUBERNETES = "1.30"
VALUE_SETS = sorted(path.name for path in (CHART / "ci").glob("*.yaml"))
CUSTOM = json.loads((ROOT / "tests" / "support" / "schemas" / "custom_resources.json").read_text())


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    if not HELM.exists():
        pytest.fail(f"helm is missing at {HELM}: run `bash scripts/test.sh` (scripts/install/helm.sh installs it)")
    result = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


# The APIs of a cluster with KEDA and prometheus-operator (the chart renders their resources only
# where the cluster serves them, or where they are forced in values).
CLUSTER_APIS = ("keda.sh/v1alpha1", "monitoring.coreos.com/v1")


def template_args(
    value_files: tuple[str, ...], sets: tuple[str, ...], apis: tuple[str, ...] = CLUSTER_APIS
) -> list[str]:
    args = ["template", "rel", str(CHART)]
    for api in apis:
        args += ["--api-versions", api]
    for name in value_files:
        args += ["-f", str(CHART / "ci" / name)]
    for item in sets:
        args += ["--set", item]
    return args


@cache
def _render(value_files: tuple[str, ...], sets: tuple[str, ...], apis: tuple[str, ...]) -> tuple[dict, ...]:
    return tuple(doc for doc in yaml.safe_load_all(helm(*template_args(value_files, sets, apis)).stdout) if doc)


def render(*value_files: str, sets: tuple[str, ...] = (), apis: tuple[str, ...] = CLUSTER_APIS) -> list[dict]:
    """The chart rendered with `value_files` (from ci/) and `--set` items, for a cluster serving `apis`."""
    return list(_render(value_files, sets, apis))


def render_fails(*sets: str, value_files: tuple[str, ...] = ("default.yaml",)) -> str:
    result = helm(*template_args(value_files, sets), check=False)
    assert result.returncode != 0, f"expected helm to reject {sets}"
    return result.stderr


def get(docs: list[dict], kind: str, name: str) -> dict:
    found = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert found, f"no {kind} {name} in {[(d['kind'], d['metadata']['name']) for d in docs]}"
    return found[0]


def validate(doc: dict) -> None:
    """Strict Kubernetes schema of `doc`'s kind, or ours for the custom resources the chart makes."""
    if doc["kind"] in CUSTOM:
        jsonschema.validate(doc, {"definitions": CUSTOM["definitions"], **CUSTOM[doc["kind"]]})
    else:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def pod(docs: list[dict], name: str) -> dict:
    return get(docs, "Deployment", f"rel-influence-{name}")["spec"]["template"]


def env(pod_template: dict) -> dict:
    return {item["name"]: item for item in pod_template["spec"]["containers"][0]["env"]}
