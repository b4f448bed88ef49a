"""The Helm chart: lint --strict, render value sets, validate every manifest against the
Kubernetes schemas in strict mode (unknown fields fail), and check what matters: GPU
scheduling, gRPC probes, config checksums, stable selectors, PDBs, external Redis, and clear
failures on bad values. Needs tools/bin/helm (installed by scripts/install/helm.sh)."""

from __future__ import annotations

import json
import subprocess
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from services.assembly import STAGE_TABLE

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "influence"
HELM = ROOT / "tools" / "bin" / "helm"
KUBERNETES = "1.30"
VALUE_SETS = sorted(path.name for path in (CHART / "ci").glob("*.yaml"))
ROLES = ("factor", "gradient", "query")
SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    if not HELM.exists():
        pytest.fail(f"helm is missing at {HELM}: run `bash scripts/test.sh` (scripts/install/helm.sh installs it)")
    result = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


def template_args(value_files: tuple[str, ...], sets: tuple[str, ...]) -> list[str]:
    args = ["template", "rel", str(CHART)]
    for name in value_files:
        args += ["-f", str(CHART / "ci" / name)]
    for item in sets:
        args += ["--set", item]
    return args


@cache
def _render(value_files: tuple[str, ...], sets: tuple[str, ...]) -> tuple[dict, ...]:
    return tuple(doc for doc in yaml.safe_load_all(helm(*template_args(value_files, sets)).stdout) if doc)


def render(*value_files: str, sets: tuple[str, ...] = ()) -> list[dict]:
    return list(_render(value_files, sets))


def render_fails(*sets: str, value_files: tuple[str, ...] = ("default.yaml",)) -> str:
    result = helm(*template_args(value_files, sets), check=False)
    assert result.returncode != 0, f"expected helm to reject {sets}"
    return result.stderr


def get(docs: list[dict], kind: str, name: str) -> dict:
    found = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert found, f"no {kind} {name} in {[(d['kind'], d['metadata']['name']) for d in docs]}"
    return found[0]


def pod(docs: list[dict], name: str) -> dict:
    return get(docs, "Deployment", f"rel-influence-{name}")["spec"]["template"]


def env(pod_template: dict) -> dict:
    return {item["name"]: item for item in pod_template["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize("values", ["", *VALUE_SETS])
def test_lint_strict(values):
    args = ["lint", "--strict", str(CHART)]
    if values:  # "" = the chart's own defaults; lint tolerates `fail`, so validateValues is tested via template
        args += ["-f", str(CHART / "ci" / values)]
    assert "0 chart(s) failed" in helm(*args).stdout


@pytest.mark.parametrize(
    "values",
    [(name,) for name in VALUE_SETS] + [("default.yaml", "full.yaml"), ("default.yaml", "minimal.yaml")],
    ids=lambda v: "+".join(v),
)
def test_every_rendered_manifest_is_valid_kubernetes(values):
    docs = render(*values)
    assert {"ConfigMap", "Deployment", "Service", "ServiceAccount", "Pod"} <= {doc["kind"] for doc in docs}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_default_renders_the_whole_system():
    docs = render("default.yaml")
    names = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    for role in ROLES:
        assert {("Deployment", f"rel-influence-{role}"), ("Service", f"rel-influence-{role}")} <= names
    assert {
        ("Deployment", "rel-influence-worker-gpu"),
        ("Deployment", "rel-influence-worker-cpu"),
        ("StatefulSet", "rel-influence-redis"),
        ("Service", "rel-influence-redis"),
        ("Secret", "rel-influence-object-store"),
        ("ConfigMap", "rel-influence"),
        ("ServiceAccount", "rel-influence"),
        ("Pod", "rel-influence-health-test"),
    } <= names
    assert not [doc for doc in docs if doc["kind"] == "PodDisruptionBudget"]  # off by default
    # Together the default pools take every task kind.
    kinds = set()
    for pool in ("gpu", "cpu"):
        args = pod(docs, f"worker-{pool}")["spec"]["containers"][0]["args"]
        kinds |= set(args[args.index("--kinds") + 1].split(","))
    assert kinds == set(STAGE_TABLE.kinds)


def test_gpu_pools_get_gpus_tolerations_and_affinity():
    docs = render("full.yaml")
    gpu = pod(docs, "worker-gpu")["spec"]
    container = gpu["containers"][0]
    assert (
        container["resources"]["limits"]["nvidia.com/gpu"] == 2 == container["resources"]["requests"]["nvidia.com/gpu"]
    )
    assert container["resources"]["requests"]["cpu"] == "8"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    terms = gpu["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}]}]
    assert gpu["nodeSelector"] == {"cloud.example.com/accelerator": "a100"}
    assert gpu["terminationGracePeriodSeconds"] == 900
    assert container["args"] == [
        "worker",
        "--kinds",
        "covariance,correction,score,self,index_shard,index_prepare,index_merge",
        "--name",
        "$(POD_NAME)",
    ]
    assert container["livenessProbe"]["exec"]["command"][0] == "python"
    # A pool added in values gets requests = limits for its GPUs too.
    h100 = pod(docs, "worker-h100")["spec"]["containers"][0]["resources"]
    assert h100 == {"limits": {"nvidia.com/gpu": 8}, "requests": {"nvidia.com/gpu": 8}}
    cpu = pod(docs, "worker-cpu")["spec"]
    assert "nvidia.com/gpu" not in str(cpu)
    assert cpu["terminationGracePeriodSeconds"] == 300
    # Default values: the GPU pool is a GPU pool out of the box.
    default = pod(render("default.yaml"), "worker-gpu")["spec"]
    assert default["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert default["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nvidia.com/gpu.present" in str(default["affinity"])


def test_disabled_pool_and_zero_replicas_are_honoured():
    docs = render("minimal.yaml")
    assert not [doc for doc in docs if doc["metadata"]["name"] == "rel-influence-worker-gpu"]
    assert get(docs, "Deployment", "rel-influence-factor")["spec"]["replicas"] == 0
    test_pod = get(docs, "Pod", "rel-influence-health-test")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    targets = test_pod["spec"]["containers"][0]["args"][1:]
    assert targets == ["rel-influence-gradient:50051", "rel-influence-query:50051"]
    volume = pod(docs, "worker-cpu")["spec"]["volumes"][0]
    assert volume == {"name": "models", "hostPath": {"path": "/data/models", "type": "Directory"}}


def test_services_use_grpc_probes_and_config_from_env():
    docs = render("default.yaml")
    for role in ROLES:
        template = pod(docs, role)
        container = template["spec"]["containers"][0]
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": 50051}
            assert container[probe]["periodSeconds"] == 10
        assert container["args"] == ["serve", "--role", role, "--host", "0.0.0.0", "--port", "50051", "--workers", "0"]
        assert container["ports"] == [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"}]
        assert container["securityContext"]["runAsNonRoot"] is True
        assert container["envFrom"] == [{"configMapRef": {"name": "rel-influence"}}]
        variables = env(template)
        assert variables["INFLUENCE_REDIS_URL"]["value"] == "redis://rel-influence-redis:6379/0"
        assert (
            variables["INFLUENCE_STORE_URL"]["value"] == "s3://influence?endpoint=minio:9000&secure=0&region=us-east-1"
        )
        for key, secret_key in (("INFLUENCE_S3_ACCESS_KEY", "accessKey"), ("INFLUENCE_S3_SECRET_KEY", "secretKey")):
            assert variables[key]["valueFrom"]["secretKeyRef"] == {
                "name": "rel-influence-object-store",
                "key": secret_key,
            }
        service = get(docs, "Service", f"rel-influence-{role}")["spec"]
        assert service["type"] == "ClusterIP"
        assert service["ports"][0]["name"] == "grpc" and service["ports"][0]["targetPort"] == "grpc"
    assert get(docs, "ConfigMap", "rel-influence")["data"]["INFLUENCE_LOG_LEVEL"] == "info"
    secret = get(docs, "Secret", "rel-influence-object-store")["stringData"]
    assert secret == {"accessKey": "minio", "secretKey": "minio-secret"}


def test_selectors_are_stable_across_value_changes():
    variants = [
        render("default.yaml"),
        render("full.yaml"),
        render("default.yaml", sets=("image.tag=9.9.9", "logLevel=debug", "services.query.replicaCount=5")),
    ]
    for name in (*ROLES, "worker-gpu", "worker-cpu"):
        selectors = [get(docs, "Deployment", f"rel-influence-{name}")["spec"]["selector"] for docs in variants]
        assert selectors[0] == selectors[1] == selectors[2]
        labels = selectors[0]["matchLabels"]
        assert set(labels) == SELECTOR_KEYS
        assert labels["app.kubernetes.io/component"] == name
        pod_labels = pod(variants[0], name)["metadata"]["labels"]
        assert labels.items() <= pod_labels.items()
    for role in ROLES:
        assert (
            get(variants[0], "Service", f"rel-influence-{role}")["spec"]["selector"]["app.kubernetes.io/component"]
            == role
        )


def test_config_changes_roll_the_pods():
    def checksums(docs: list[dict]) -> set[str]:
        names = (*ROLES, "worker-gpu", "worker-cpu")
        return {pod(docs, name)["metadata"]["annotations"]["checksum/config"] for name in names}

    base = checksums(render("default.yaml"))
    assert len(base) == 1  # one config for every pod
    for change in ("logLevel=debug", "queue.leaseSeconds=120", "objectStore.secretKey=rotated"):
        assert checksums(render("default.yaml", sets=(change,))).isdisjoint(base), change
    # Unrelated changes leave it alone.
    assert checksums(render("default.yaml", sets=("services.query.replicaCount=3",))) == base


def test_pdbs_rendered_when_enabled():
    docs = render("full.yaml")
    pdbs = {doc["metadata"]["name"]: doc["spec"] for doc in docs if doc["kind"] == "PodDisruptionBudget"}
    assert set(pdbs) == {"rel-influence-query", "rel-influence-factor", "rel-influence-worker-gpu"}
    assert pdbs["rel-influence-query"]["minAvailable"] == 2
    query = get(docs, "Deployment", "rel-influence-query")["spec"]
    assert pdbs["rel-influence-query"]["selector"] == query["selector"]
    assert query["replicas"] == 3
    percent = render(
        "default.yaml", sets=("services.gradient.pdb.enabled=true", "services.gradient.pdb.minAvailable=50%")
    )
    assert get(percent, "PodDisruptionBudget", "rel-influence-gradient")["spec"]["minAvailable"] == "50%"


def test_external_redis_existing_secret_and_models_volume():
    docs = render("full.yaml")
    assert not [doc for doc in docs if doc["kind"] == "StatefulSet" or "redis" in doc["metadata"]["name"]]
    assert not [doc for doc in docs if doc["kind"] == "Secret"]  # existingSecret is used, none is made
    for name in (*ROLES, "worker-gpu", "worker-cpu", "worker-h100"):
        template = pod(docs, name)
        variables = env(template)
        assert variables["INFLUENCE_REDIS_URL"]["value"] == "redis://redis.example.com:6379/2"
        assert variables["INFLUENCE_STORE_URL"]["value"] == (
            "s3://prod-influence?endpoint=s3.example.com:443&secure=1&region=eu-west-1"
        )
        assert variables["INFLUENCE_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
        spec = template["spec"]
        assert spec["volumes"] == [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}]
        assert spec["containers"][0]["volumeMounts"] == [
            {"name": "models", "mountPath": "/mnt/models", "readOnly": True}
        ]
        assert spec["serviceAccountName"] == "influence-sa"
        assert spec["imagePullSecrets"] == [{"name": "registry"}]
        assert spec["containers"][0]["image"] == "registry.example.com/influence:1.2.3"


def test_in_chart_redis_is_a_persistent_single_replica():
    redis = get(render("default.yaml"), "StatefulSet", "rel-influence-redis")["spec"]
    assert redis["replicas"] == 1
    container = redis["template"]["spec"]["containers"][0]
    assert container["image"].startswith("redis:7")
    assert container["args"][:3] == ["redis-server", "--appendonly", "yes"]
    assert container["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    claim = redis["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "8Gi"


def test_bad_values_fail_with_every_problem_listed():
    stderr = render_fails(
        "redis.enabled=false",
        "objectStore.endpoint=",
        "objectStore.accessKey=",
        "workers.pools.gpu.resources.limits.nvidia\\.com/gpu=null",
        "workers.pools.cpu.resources.limits.nvidia\\.com/gpu=1",
    )
    assert "invalid values for the influence chart" in stderr
    for problem in (
        "redis.url: required when redis.enabled is false",
        "objectStore.endpoint: empty",
        "objectStore: set existingSecret, or both accessKey and secretKey",
        "workers.pools.gpu: a GPU pool (gpu: true) needs resources.limits.nvidia.com/gpu >= 1",
        "workers.pools.cpu: nvidia.com/gpu resources on a pool with gpu: false",
    ):
        assert problem in stderr, stderr
    stderr = render_fails("objectStore.endpoint=https://s3.example.com", "redis.enabled=false", "redis.url=redis.local")
    assert "must be host:port without a scheme" in stderr and "must start with redis://" in stderr
    stderr = render_fails("workers.pools.gpu.resources.requests.nvidia\\.com/gpu=2")
    assert "workers.pools.gpu: resources.requests.nvidia.com/gpu must equal limits" in stderr


def test_every_task_kind_must_be_taken_by_an_enabled_pool():
    """A kind no pool takes would leave its tasks queued forever: the chart refuses to render.
    The chart's list of kinds (schema enum and the check) is the stage table's kinds (services/assembly.STAGE_TABLE)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert sorted(schema["definitions"]["pool"]["properties"]["kinds"]["items"]["enum"]) == sorted(STAGE_TABLE.kinds)
    stderr = render_fails("workers.pools.gpu.kinds={covariance,correction,prepare,score,self}")
    assert "no enabled pool takes blocks, fit_one_shard, score_one_shard" in stderr, stderr
    stderr = render_fails("workers.pools.cpu.enabled=false")
    assert "no enabled pool takes register, eigen, finalize, merge, self_merge" in stderr, stderr


@pytest.mark.parametrize(
    ("setting", "where"),
    [
        ("services.query.replicaCount=many", "/services/query/replicaCount"),
        ("redis.enabled=maybe", "/redis/enabled"),
        ("logLevel=loud", "/logLevel"),
        ("workers.pools.gpu.kinds={covariance,train}", "/workers/pools/gpu/kinds"),
        ("workers.pools.gpu.replicas=2", "/workers/pools/gpu"),  # the key is replicaCount
        ("models.volume.hostPath.path=/m,models.volume.persistentVolumeClaim.claimName=m", "/models/volume"),
        ("colour=blue", "colour"),
    ],
)
def test_schema_rejects_wrong_types_and_unknown_keys(setting, where):
    stderr = render_fails(setting)
    assert "don't meet the specifications of the schema" in stderr and where in stderr, stderr
