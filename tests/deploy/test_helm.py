"""The Helm chart: lint --strict, render every ci/ value set, validate every manifest against the
Kubernetes schemas in strict mode (unknown fields fail) and the custom resources (KEDA,
ServiceMonitor) against tests/support/schemas/custom_resources.json, and check what matters: the one
entry point, GPU scheduling and the pool's device, gRPC probes, config checksums, stable
selectors, PDBs, secrets, autoscaling, network policy, pool defaults, and clear failures on bad
values. Needs tools/bin/helm (installed by scripts/install/helm.sh)."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from services.assembly import ROLES, STAGE_TABLE
from services.jobs.queue import GROUP, TaskQueue
from services.rpc.server import LIVENESS
from services.wire import REQUEST_LIMITS
from tests.support import ROOT
from tests.support.helm import (
    CHART,
    VALUE_SETS,
    env,
    get,
    helm,
    pod,
    render,
    render_fails,
    template_args,
    validate,
)

pytestmark = pytest.mark.needs_helm  # every test renders or lints the chart

SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}


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
        validate(doc)


def test_the_ci_value_sets_render_everything_the_chart_can_make():
    kinds = {doc["kind"] for name in VALUE_SETS for doc in render(name)}
    assert kinds == {
        "ConfigMap", "Secret", "ServiceAccount", "Service", "Deployment", "StatefulSet", "Pod",
        "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy", "Role", "RoleBinding",
        "ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule",
    }  # fmt: skip


def test_default_renders_the_whole_system_behind_one_entry_point():
    docs = render("default.yaml")
    names = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    assert {
        ("Deployment", "rel-influence-api"),
        ("Service", "rel-influence-api"),
        ("Service", "rel-influence-api-headless"),
        ("Deployment", "rel-influence-worker-gpu"),
        ("Deployment", "rel-influence-worker-cpu"),
        ("StatefulSet", "rel-influence-redis"),
        ("Service", "rel-influence-redis"),
        ("Secret", "rel-influence-object-store"),
        ("Secret", "rel-influence-redis-auth"),
        ("ConfigMap", "rel-influence"),
        ("ServiceAccount", "rel-influence"),
        ("Pod", "rel-influence-health-test"),
    } <= names
    for role in ROLES:  # the per-role services are opt-in
        assert ("Deployment", f"rel-influence-{role}") not in names
    optional = {"PodDisruptionBudget", "HorizontalPodAutoscaler", "ScaledObject", "NetworkPolicy", "Role"}
    assert not [doc for doc in docs if doc["kind"] in optional]  # off by default
    # The api serves every role the server knows, on one port; the headless Service lists replicas.
    api = pod(docs, "api")["spec"]["containers"][0]
    assert api["args"][:3] == ["serve", "--role", ",".join(ROLES)]
    assert get(docs, "Service", "rel-influence-api-headless")["spec"]["clusterIP"] == "None"
    assert "clusterIP" not in get(docs, "Service", "rel-influence-api")["spec"]
    # Together the default pools take every task kind.
    kinds = set()
    for pool in ("gpu", "cpu"):
        args = pod(docs, f"worker-{pool}")["spec"]["containers"][0]["args"]
        kinds |= set(args[args.index("--kinds") + 1].split(","))
    assert kinds == set(STAGE_TABLE.kinds)


def test_gpu_pools_get_gpus_tolerations_affinity_the_cuda_image_and_device():
    docs = render("full.yaml")
    gpu = pod(docs, "worker-gpu")["spec"]
    container = gpu["containers"][0]
    assert (
        container["resources"]["limits"]["nvidia.com/gpu"] == 2 == container["resources"]["requests"]["nvidia.com/gpu"]
    )
    assert container["resources"]["requests"]["cpu"] == "8"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    # GPU Feature Discovery's label is preferred, not required: plain GKE and EKS GPU nodes lack it, and the
    # nvidia.com/gpu request already keeps the pods on GPU nodes
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in gpu["affinity"]["nodeAffinity"]
    preferred = gpu["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred[0]["preference"] == {
        "matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}]
    }
    assert gpu["nodeSelector"] == {"cloud.example.com/accelerator": "a100"}
    assert gpu["terminationGracePeriodSeconds"] == 900
    assert container["args"] == [
        "worker",
        "--kinds",
        "covariance,correction,score,self,index_shard,index_prepare,index_merge",
        "--device",
        "cuda",
        "--name",
        "$(POD_NAME)",
        "--metrics-port",
        "9090",
        "--metrics-host",
        "0.0.0.0",  # Prometheus scrapes the pod: explicit, as a worker's default is loopback
    ]
    assert container["image"] == "registry.example.com/influence:1.2.3-cuda"
    assert container["livenessProbe"]["exec"]["command"][0] == "python"
    # A pool added in values gets requests = limits for its GPUs, and the defaults' CPU and memory.
    h100 = pod(docs, "worker-h100")["spec"]["containers"][0]
    assert h100["resources"] == {
        "limits": {"memory": "16Gi", "nvidia.com/gpu": 8},
        "requests": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": 8},
    }
    assert "--device" in h100["args"] and h100["args"][h100["args"].index("--device") + 1] == "cuda"
    cpu = pod(docs, "worker-cpu")["spec"]
    assert "nvidia.com/gpu" not in str(cpu)
    assert cpu["terminationGracePeriodSeconds"] == 300
    assert cpu["containers"][0]["image"] == "registry.example.com/influence:1.2.3"
    assert cpu["containers"][0]["args"][cpu["containers"][0]["args"].index("--device") + 1] == "cpu"
    # Default values: the GPU pool is a GPU pool out of the box.
    default = pod(render("default.yaml"), "worker-gpu")["spec"]
    assert default["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert default["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nvidia.com/gpu.present" in str(default["affinity"])


def test_a_kind_of_a_gpu_pool_cannot_land_on_a_cpu_pool():
    stderr = render_fails(
        "workers.pools.cpu.kinds={register,eigen,finalize,self_merge,index_publish,index_score,score}"
    )
    assert "workers.pools.cpu: a CPU pool takes kinds a GPU pool takes: score (GPU pool gpu)" in stderr, stderr
    # A CPU-only system (no GPU pool) may give every kind to CPU workers.
    assert pod(render("minimal.yaml"), "worker-cpu")


def test_pools_inherit_the_defaults_and_override_them_key_by_key():
    docs = render(
        "default.yaml",
        sets=(
            "workers.pools.extra.kinds={register}",
            "workers.pools.extra.replicaCount=0",
            "workers.pools.extra.resources.limits.memory=2Gi",
            "workers.defaults.nodeSelector.pool=shared",
        ),
    )
    extra = pod(docs, "worker-extra")["spec"]
    container = extra["containers"][0]
    assert get(docs, "Deployment", "rel-influence-worker-extra")["spec"]["replicas"] == 0  # 0 overrides 1
    assert container["resources"] == {"limits": {"memory": "2Gi"}, "requests": {"cpu": "2", "memory": "8Gi"}}
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert extra["nodeSelector"] == {"pool": "shared"}
    assert extra["terminationGracePeriodSeconds"] == 300
    assert pod(docs, "worker-gpu")["spec"]["nodeSelector"] == {"pool": "shared"}
    disabled = render(
        "default.yaml",
        sets=(
            "workers.defaults.enabled=false",
            "workers.pools.gpu.enabled=true",
            "workers.pools.gpu.kinds={" + ",".join(STAGE_TABLE.kinds) + "}",
        ),
    )
    assert [
        d["metadata"]["name"] for d in disabled if d["kind"] == "Deployment" and "worker" in d["metadata"]["name"]
    ] == ["rel-influence-worker-gpu"]


def test_disabled_pool_split_services_and_zero_replicas_are_honoured():
    docs = render("minimal.yaml")
    assert not [doc for doc in docs if doc["metadata"]["name"] == "rel-influence-worker-gpu"]
    test_pod = get(docs, "Pod", "rel-influence-health-test")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert test_pod["spec"]["containers"][0]["args"][1:] == ["rel-influence-api:50051"]
    volumes = {volume["name"]: volume for volume in pod(docs, "worker-cpu")["spec"]["volumes"]}
    assert volumes["models"] == {"name": "models", "hostPath": {"path": "/data/models", "type": "Directory"}}
    split = render("split.yaml")
    assert not [doc for doc in split if doc["metadata"]["name"] == "rel-influence-api"]
    assert get(split, "Deployment", "rel-influence-gradient")["spec"]["replicas"] == 0
    targets = get(split, "Pod", "rel-influence-health-test")["spec"]["containers"][0]["args"][1:]
    assert targets == ["rel-influence-factor:50051", "rel-influence-query:50051"]
    for role in ROLES:
        assert pod(split, role)["spec"]["containers"][0]["args"][:3] == ["serve", "--role", role]
        assert get(split, "Service", f"rel-influence-{role}-headless")["spec"]["clusterIP"] == "None"
    assert "--metrics-port" not in pod(split, "gradient")["spec"]["containers"][0]["args"]
    annotations = get(split, "Service", "rel-influence-query")["metadata"]["annotations"]
    assert annotations == {"cloud.example.com/load-balancer-type": "internal"}
    stderr = render_fails("services.api.enabled=false")
    for role in ROLES:
        assert f"nothing serves the {role} API" in stderr


def test_services_use_grpc_probes_and_config_from_env():
    for docs, components in ((render("default.yaml"), ("api",)), (render("split.yaml"), ("factor", "query"))):
        for component in components:
            template = pod(docs, component)
            container = template["spec"]["containers"][0]
            # readiness asks for the dependencies (the server's overall health); liveness and
            # startup for the process only (the `liveness` service): a Redis outage restarts nothing
            assert container["readinessProbe"]["grpc"] == {"port": 50051}
            for probe in ("livenessProbe", "startupProbe"):
                assert container[probe]["grpc"] == {"port": 50051, "service": LIVENESS}
            assert container["readinessProbe"]["periodSeconds"] == container["livenessProbe"]["periodSeconds"] == 10
            startup = container["startupProbe"]
            assert (startup["periodSeconds"], startup["failureThreshold"]) == (5, 60)
            roles = ",".join(ROLES) if component == "api" else component
            assert container["args"] == [
                "serve", "--role", roles, "--host", "0.0.0.0", "--port", "50051", "--workers", "0",
                "--metrics-port", "9090",
            ]  # fmt: skip
            assert container["ports"] == [
                {"name": "grpc", "containerPort": 50051, "protocol": "TCP"},
                {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
            ]
            assert container["securityContext"]["runAsNonRoot"] is True
            assert container["envFrom"] == [{"configMapRef": {"name": "rel-influence"}}]
            variables = env(template)
            assert variables["INFLUENCE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
                "name": "rel-influence-redis-auth",
                "key": "password",
            }
            assert variables["INFLUENCE_REDIS_URL"]["value"] == (
                "redis://:$(INFLUENCE_REDIS_PASSWORD)@rel-influence-redis:6379/0"
            )
            names = [item["name"] for item in template["spec"]["containers"][0]["env"]]
            assert names.index("INFLUENCE_REDIS_PASSWORD") < names.index("INFLUENCE_REDIS_URL")  # for $(...)
            assert variables["INFLUENCE_STORE_URL"]["value"] == (
                "s3://influence?endpoint=minio:9000&secure=0&region=us-east-1"
            )
            for key, secret_key in (("INFLUENCE_S3_ACCESS_KEY", "accessKey"), ("INFLUENCE_S3_SECRET_KEY", "secretKey")):
                assert variables[key]["valueFrom"]["secretKeyRef"] == {
                    "name": "rel-influence-object-store",
                    "key": secret_key,
                }
            service = get(docs, "Service", f"rel-influence-{component}")["spec"]
            assert service["type"] == "ClusterIP"
            assert service["ports"][0]["name"] == "grpc" and service["ports"][0]["targetPort"] == "grpc"
    docs = render("default.yaml")
    config = get(docs, "ConfigMap", "rel-influence")["data"]
    assert config["INFLUENCE_LOG_LEVEL"] == "info" and config["INFLUENCE_LOG_FORMAT"] == "json"
    assert config["INFLUENCE_QUEUE_PREFIX"] == "rel-influence"  # two releases never share keys
    secret = get(docs, "Secret", "rel-influence-object-store")["stringData"]
    assert secret == {"accessKey": "minio", "secretKey": "minio-secret"}


def test_every_influence_pod_has_a_read_only_root_and_a_scratch_volume():
    for name in VALUE_SETS:
        for doc in render(name):
            if doc["kind"] not in ("Deployment", "Pod"):
                continue
            spec = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else doc["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
            container = spec["containers"][0]
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            if doc["kind"] == "Deployment":
                volumes = {volume["name"]: volume for volume in spec["volumes"]}
                assert "emptyDir" in volumes["scratch"]
                assert {"name": "scratch", "mountPath": "/scratch"} in container["volumeMounts"]
    redis = get(render("default.yaml"), "StatefulSet", "rel-influence-redis")["spec"]["template"]["spec"]
    assert redis["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_selectors_are_stable_across_value_changes():
    variants = [
        render("default.yaml"),
        render("everything.yaml"),
        render("default.yaml", sets=("image.tag=9.9.9", "logLevel=debug", "services.api.replicaCount=5")),
    ]
    for name in ("api", "worker-gpu", "worker-cpu"):
        selectors = [get(docs, "Deployment", f"rel-influence-{name}")["spec"]["selector"] for docs in variants]
        assert selectors[0] == selectors[1] == selectors[2]
        labels = selectors[0]["matchLabels"]
        assert set(labels) == SELECTOR_KEYS
        assert labels["app.kubernetes.io/component"] == name
        for docs in variants:
            assert labels.items() <= pod(docs, name)["metadata"]["labels"].items()
    assert get(variants[0], "Service", "rel-influence-api")["spec"]["selector"]["app.kubernetes.io/component"] == "api"


def test_config_changes_roll_the_pods():
    def checksums(docs: list[dict]) -> set[str]:
        names = ("api", "worker-gpu", "worker-cpu")
        return {pod(docs, name)["metadata"]["annotations"]["checksum/config"] for name in names}

    base = checksums(render("default.yaml"))
    assert len(base) == 1  # one config for every pod
    for change in (
        "logLevel=debug",
        "queue.leaseSeconds=120",
        "queue.prefix=other",
        "objectStore.secretKey=rotated",
        "redis.auth.password=rotated",
    ):
        assert checksums(render("default.yaml", sets=(change,))).isdisjoint(base), change
    # Unrelated changes leave it alone.
    assert checksums(render("default.yaml", sets=("services.api.replicaCount=3",))) == base


def test_pdbs_rendered_when_enabled_and_only_when_they_leave_room_to_drain():
    docs = render("full.yaml")
    pdbs = {doc["metadata"]["name"]: doc["spec"] for doc in docs if doc["kind"] == "PodDisruptionBudget"}
    assert set(pdbs) == {"rel-influence-api", "rel-influence-worker-gpu"}
    assert pdbs["rel-influence-api"]["minAvailable"] == 2
    api = get(docs, "Deployment", "rel-influence-api")["spec"]
    assert pdbs["rel-influence-api"]["selector"] == api["selector"]
    assert api["replicas"] == 3
    percent = render("default.yaml", sets=("services.api.pdb.enabled=true", "services.api.pdb.minAvailable=50%"))
    assert get(percent, "PodDisruptionBudget", "rel-influence-api")["spec"]["minAvailable"] == "50%"
    stderr = render_fails("services.api.pdb.enabled=true", "workers.pools.cpu.pdb.enabled=true")
    assert "services.api.pdb.minAvailable: 1 must be below the replicas it protects (1)" in stderr
    assert "workers.pools.cpu.pdb.minAvailable: 1 must be below the replicas it protects (1)" in stderr
    # with an autoscaler, its minimum is what the PDB protects
    stderr = render_fails(
        "services.api.pdb.enabled=true",
        "services.api.replicaCount=5",
        "services.api.autoscaling.enabled=true",
        "services.api.autoscaling.minReplicas=1",
    )
    assert "services.api.pdb.minAvailable: 1 must be below the replicas it protects (1)" in stderr


def test_external_redis_url_is_a_secret_and_existing_secrets_are_used():
    docs = render("full.yaml")
    assert not [doc for doc in docs if doc["kind"] == "StatefulSet"]
    secrets = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Secret"}
    assert set(secrets) == {"rel-influence-redis-auth"}  # S3's existingSecret is used, none is made
    assert secrets["rel-influence-redis-auth"]["stringData"] == {"url": "redis://redis.example.com:6379/2"}
    assert "redis.example.com" not in json.dumps([doc for doc in docs if doc["kind"] != "Secret"])
    for name in ("api", "worker-gpu", "worker-cpu", "worker-h100"):
        template = pod(docs, name)
        variables = env(template)
        assert variables["INFLUENCE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "rel-influence-redis-auth",
            "key": "url",
        }
        assert variables["INFLUENCE_STORE_URL"]["value"] == (
            "s3://prod-influence?endpoint=s3.example.com:443&secure=1&region=eu-west-1"
        )
        assert variables["INFLUENCE_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
        spec = template["spec"]
        assert {"name": "models", "persistentVolumeClaim": {"claimName": "models"}} in spec["volumes"]
        assert {"name": "models", "mountPath": "/mnt/models", "readOnly": True} in spec["containers"][0]["volumeMounts"]
        assert spec["serviceAccountName"] == "influence-sa"
        assert spec["imagePullSecrets"] == [{"name": "registry"}]
        assert spec["containers"][0]["image"].startswith("registry.example.com/influence:1.2.3")
    external = render("keda-external-redis.yaml")
    assert not [doc for doc in external if doc["kind"] == "Secret"]
    assert env(pod(external, "api"))["INFLUENCE_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "redis-url"


def test_in_chart_redis_is_a_persistent_single_replica_with_a_password():
    docs = render("default.yaml")
    redis = get(docs, "StatefulSet", "rel-influence-redis")["spec"]
    assert redis["replicas"] == 1
    container = redis["template"]["spec"]["containers"][0]
    assert container["image"].startswith("redis:7")
    assert container["args"][:3] == ["redis-server", "--appendonly", "yes"]
    assert container["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    variables = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in container["env"]}
    assert (
        variables["REDIS_PASSWORD"]
        == variables["REDISCLI_AUTH"]
        == {
            "name": "rel-influence-redis-auth",
            "key": "password",
        }
    )
    assert container["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]  # authenticates via REDISCLI_AUTH
    assert container["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    claim = redis["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    password = get(docs, "Secret", "rel-influence-redis-auth")["stringData"]["password"]
    assert len(password) == 32 and password.isalnum()  # generated (an upgrade reads it back with lookup)
    given = render("default.yaml", sets=("redis.auth.password=pass-1",))
    assert get(given, "Secret", "rel-influence-redis-auth")["stringData"] == {"password": "pass-1"}
    existing = render("default.yaml", sets=("redis.existingSecret=mine",))
    assert not [doc for doc in existing if doc["kind"] == "Secret" and "redis" in doc["metadata"]["name"]]
    assert env(pod(existing, "api"))["INFLUENCE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mine"
    open_redis = render("default.yaml", sets=("redis.auth.enabled=false",))
    assert env(pod(open_redis, "api"))["INFLUENCE_REDIS_URL"]["value"] == "redis://rel-influence-redis:6379/0"
    assert (
        "--requirepass"
        not in get(open_redis, "StatefulSet", "rel-influence-redis")["spec"]["template"]["spec"]["containers"][0][
            "args"
        ]
    )


def test_s3_without_keys_uses_the_credential_chain():
    docs = render("everything.yaml")
    assert not [doc for doc in docs if doc["kind"] == "Secret" and "object-store" in doc["metadata"]["name"]]
    variables = env(pod(docs, "api"))
    assert variables["INFLUENCE_S3_CREDENTIALS"]["value"] == "chain"
    assert "INFLUENCE_S3_ACCESS_KEY" not in variables
    account = get(docs, "ServiceAccount", "rel-influence")["metadata"]["annotations"]
    assert account == {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/influence"}


def test_extension_points_reach_every_influence_pod():
    docs = render("everything.yaml")
    for name in ("api", "worker-gpu", "worker-cpu", "worker-a100"):
        template = pod(docs, name)
        spec = template["spec"]
        assert template["metadata"]["labels"]["team.example.com/owner"] == "ml-platform"
        assert template["metadata"]["annotations"]["example.com/audit"] == "true"
        assert env(template)["HTTPS_PROXY"]["value"] == "http://proxy.example.com:3128"
        assert {"name": "ca-bundle", "configMap": {"name": "corporate-ca"}} in spec["volumes"]
        assert {"name": "ca-bundle", "mountPath": "/etc/ssl/corporate", "readOnly": True} in spec["containers"][0][
            "volumeMounts"
        ]
        assert {"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "20Gi"}} in spec["volumes"]
        constraint = spec["topologySpreadConstraints"][0]
        assert constraint["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == name
    api = pod(docs, "api")
    assert api["metadata"]["labels"]["tier"] == "serving"
    assert api["spec"]["priorityClassName"] == "influence-serving"  # the component's wins
    assert pod(docs, "worker-cpu")["spec"]["priorityClassName"] == "influence-default"
    assert pod(docs, "worker-gpu")["spec"]["runtimeClassName"] == "nvidia"
    assert "runtimeClassName" not in pod(docs, "worker-cpu")["spec"]
    assert get(docs, "Service", "rel-influence-api")["metadata"]["annotations"] == {"service.example.com/grpc": "true"}


def test_keda_scales_each_pool_on_its_kinds_streams_and_hpa_the_api():
    docs = render("everything.yaml")
    objects = {doc["metadata"]["name"]: doc["spec"] for doc in docs if doc["kind"] == "ScaledObject"}
    assert set(objects) == {"rel-influence-worker-gpu", "rel-influence-worker-a100"}  # cpu opted out
    queue = TaskQueue(client=None, prefix="team-a")
    for name, spec in objects.items():
        deployment = get(docs, "Deployment", name)
        assert spec["scaleTargetRef"] == {"name": name}
        assert "replicas" not in deployment["spec"]  # KEDA's business
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        kinds = args[args.index("--kinds") + 1].split(",")
        # per kind the pool takes (its --kinds, from the same list in values): waiting and running tasks
        streams = [queue.stream(k) for k in kinds for _ in range(2)]
        assert [trigger["metadata"]["stream"] for trigger in spec["triggers"]] == streams
        for waiting, running in zip(spec["triggers"][::2], spec["triggers"][1::2], strict=True):
            assert (waiting["metadata"]["lagCount"], running["metadata"]["pendingEntriesCount"]) == ("2", "1")
            assert "pendingEntriesCount" not in waiting["metadata"] and "lagCount" not in running["metadata"]
        for trigger in spec["triggers"]:
            assert trigger["type"] == "redis-streams"
            assert trigger["metadata"]["consumerGroup"] == GROUP
            assert trigger["metadata"]["address"] == "rel-influence-redis.default.svc:6379"
            assert trigger["authenticationRef"] == {"name": "rel-influence-keda-redis"}
        # scale-in waits 5 leases (queue.leaseSeconds 60); while the metric fails, replicas are kept
        assert spec["cooldownPeriod"] == 300
        assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == {
            "stabilizationWindowSeconds": 300
        }
        assert spec["fallback"] == {"failureThreshold": 3, "replicas": 1, "behavior": "currentReplicasIfHigher"}
        # a stopped worker lets its task run until 15 s before the grace period ends, then hands it back
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert env(deployment["spec"]["template"])["INFLUENCE_DRAIN_SECONDS"]["value"] == str(grace - 15)
    assert objects["rel-influence-worker-gpu"]["minReplicaCount"] == 0  # scale to zero
    assert objects["rel-influence-worker-gpu"]["maxReplicaCount"] == 8
    assert objects["rel-influence-worker-a100"]["minReplicaCount"] == 1
    auth = get(docs, "TriggerAuthentication", "rel-influence-keda-redis")["spec"]
    assert auth == {
        "secretTargetRef": [{"parameter": "password", "name": "rel-influence-redis-auth", "key": "password"}]
    }
    hpa = get(docs, "HorizontalPodAutoscaler", "rel-influence-api")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rel-influence-api"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    assert "replicas" not in get(docs, "Deployment", "rel-influence-api")["spec"]
    external = render("keda-external-redis.yaml")
    trigger = get(external, "ScaledObject", "rel-influence-worker-gpu")["spec"]["triggers"][0]["metadata"]
    assert (trigger["address"], trigger["databaseIndex"], trigger["enableTLS"]) == (
        "redis.example.com:6380",
        "2",
        "true",
    )
    assert get(external, "TriggerAuthentication", "rel-influence-keda-redis")["spec"]["secretTargetRef"][0]["name"] == (
        "redis-password"
    )
    stderr = render_fails(
        "redis.enabled=false", "redis.url=redis://r:6379/0", "workers.defaults.autoscaling.enabled=true"
    )
    assert "workers.keda.address: pool cpu autoscales with KEDA on an external Redis" in stderr


def test_service_monitor_network_policy_and_launcher_rbac():
    docs = render("everything.yaml")
    monitor = get(docs, "ServiceMonitor", "rel-influence")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = [
        doc["metadata"]["name"]
        for doc in docs
        if doc["kind"] == "Service"
        and selector.items() <= doc["metadata"]["labels"].items()
        and any(port["name"] == "metrics" for port in doc["spec"]["ports"])
    ]
    assert sorted(scraped) == [
        "rel-influence-api",
        "rel-influence-worker-a100-metrics",
        "rel-influence-worker-cpu-metrics",
        "rel-influence-worker-gpu-metrics",
    ]
    policies = {doc["metadata"]["name"]: doc["spec"] for doc in docs if doc["kind"] == "NetworkPolicy"}
    main = policies["rel-influence"]
    release = {"app.kubernetes.io/name": "influence", "app.kubernetes.io/instance": "rel"}
    own_pods = {"podSelector": {"matchLabels": release}}
    assert main["ingress"][0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "research"}}},
        own_pods,  # the helm test pod
    ]
    assert {"to": [own_pods], "ports": [{"port": 50051, "protocol": "TCP"}]} in main["egress"]
    assert main["ingress"][0]["ports"] == [{"port": 50051, "protocol": "TCP"}]
    assert {"port": 6379, "protocol": "TCP"} in main["egress"][1]["ports"]
    assert main["egress"][-1] == {
        "to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
        "ports": [{"port": 443, "protocol": "TCP"}],
    }
    redis = policies["rel-influence-redis"]
    assert redis["egress"] == [] and len(redis["ingress"]) == 2
    assert get(docs, "Role", "rel-influence-launcher")["rules"][0]["resources"] == ["jobs"]  # test_launcher.py
    binding = get(docs, "RoleBinding", "rel-influence-launcher")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rel-influence-launcher", "namespace": "default"}]
    assert get(docs, "ServiceAccount", "rel-influence-launcher")


def test_request_limits_reach_the_env_of_every_serving_pod_and_no_worker():
    """`limits` become INFLUENCE_MAX_* of the pods that run `influence serve` (not the ConfigMap: a
    change rolls those pods only); the chart's defaults are the server's own, so an install without
    `limits` refuses exactly what a plain `influence serve` refuses."""
    names = {name: limit.env for name, limit in REQUEST_LIMITS.items()}
    docs = render("default.yaml")
    variables = env(pod(docs, "api"))
    assert {name: variables[variable]["value"] for name, variable in names.items()} == {
        name: str(limit.default) for name, limit in REQUEST_LIMITS.items()
    }
    for worker in ("worker-gpu", "worker-cpu"):
        assert not set(names.values()) & set(env(pod(docs, worker)))
    assert not set(names.values()) & set(get(docs, "ConfigMap", "rel-influence")["data"])
    secure = env(pod(render("secure.yaml"), "api"))
    assert secure["INFLUENCE_MAX_TOP_K"]["value"] == "1000"
    assert secure["INFLUENCE_MAX_UPLOAD_BYTES"]["value"] == "67108864"  # an integer, never 6.7108864e+07
    assert secure["INFLUENCE_MAX_QUERIES"]["value"] == str(REQUEST_LIMITS["max_queries"].default)
    split = render("split.yaml", sets=("limits.maxDatasetSequences=123456789",))
    for role in ROLES:
        assert env(pod(split, role))["INFLUENCE_MAX_DATASET_SEQUENCES"]["value"] == "123456789"
    assert "maxTopK" in render_fails("limits.maxTopK=-1")
    assert "maxTopk" in render_fails("limits.maxTopk=5")


def test_the_api_plans_fits_for_the_fitting_pool_s_memory(monkeypatch):
    """`workerBudget` reaches the env of every pod that runs `influence serve` (the fit's plan is
    made at submission, engine/budget.py), and what the env says is the budget the planner reads."""
    from services.engine.budget import WorkerBudget

    variables = env(pod(render("default.yaml"), "api"))
    for name in ("INFLUENCE_WORKER_HOST_GIB", "INFLUENCE_WORKER_DEVICE_GIB"):
        monkeypatch.setenv(name, variables[name]["value"])
    assert WorkerBudget.of_process("cpu") == WorkerBudget.of_gib(64, 78)
    split = render("split.yaml", sets=("workerBudget.hostGiB=120", "workerBudget.deviceGiB=0"))
    for role in ROLES:
        variables = env(pod(split, role))
        assert variables["INFLUENCE_WORKER_HOST_GIB"]["value"] == "120"
        assert "INFLUENCE_WORKER_DEVICE_GIB" not in variables  # 0: plan from the host budget alone
    assert "INFLUENCE_WORKER_HOST_GIB" not in env(pod(render("default.yaml"), "worker-gpu"))
    assert "hostGiB" in render_fails("workerBudget.hostGiB=0")


def test_global_is_accepted_and_kube_version_is_enforced():
    assert render("everything.yaml")  # has a `global` block, as when this chart is a subchart
    result = helm(*template_args(("default.yaml",), ()), "--kube-version", "1.26.0", check=False)
    assert result.returncode != 0 and "kubeVersion" in result.stderr + result.stdout
    assert helm(*template_args(("default.yaml",), ()), "--kube-version", "1.27.0").returncode == 0


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
        "redis: an external Redis (enabled: false) needs url or existingSecret",
        "objectStore.endpoint: empty",
        "objectStore: accessKey and secretKey go together",
        "workers.pools.gpu: a GPU pool (gpu: true) needs resources.limits.nvidia.com/gpu >= 1",
        "workers.pools.cpu: nvidia.com/gpu resources on a pool with gpu: false",
    ):
        assert problem in stderr, stderr
    stderr = render_fails("objectStore.endpoint=https://s3.example.com", "redis.enabled=false", "redis.url=redis.local")
    assert "must be host:port without a scheme" in stderr and "must start with redis://" in stderr
    assert "redis.local" not in stderr  # a URL may hold a password: never echoed
    stderr = render_fails("workers.pools.gpu.resources.requests.nvidia\\.com/gpu=2")
    assert "workers.pools.gpu: resources.requests.nvidia.com/gpu must equal limits" in stderr
    stderr = render_fails("redis.url=redis://elsewhere:6379/0", "redis.auth.password=has space")
    assert "only for an external Redis" in stderr and "letters, digits, - and _ only" in stderr


def test_every_task_kind_must_be_taken_by_an_enabled_pool():
    """A kind no pool takes would leave its tasks queued forever: the chart refuses to render.
    The chart's list of kinds (schema enum and the check) is the stage table's kinds (services/assembly.STAGE_TABLE)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert sorted(schema["definitions"]["pool"]["properties"]["kinds"]["items"]["enum"]) == sorted(STAGE_TABLE.kinds)
    stderr = render_fails("workers.pools.gpu.kinds={covariance,correction,prepare,score,merge,self}")
    assert "no enabled pool takes blocks, fit_one_shard, score_one_shard" in stderr, stderr
    stderr = render_fails("workers.pools.cpu.enabled=false")
    assert "no enabled pool takes register, eigen, finalize, self_merge" in stderr, stderr


@pytest.mark.parametrize(
    ("setting", "where"),
    [
        ("services.api.replicaCount=many", "/services/api/replicaCount"),
        ("workers.defaults.autoscaling.lagCount=0", "/workers/defaults/autoscaling/lagCount"),
        ("networkPolicy.enabled=yes", "/networkPolicy/enabled"),
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


def test_the_values_reference_is_current():
    """deploy/helm/README.md is generated from values.yaml by scripts/helm-values-reference.py."""
    import sys

    script = ROOT / "scripts" / "helm-values-reference.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    readme = (ROOT / "deploy" / "helm" / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in ("global", "extraEnv", "networkPolicy", "launcher", "metrics", "scratch"):
        assert key in values and f"| `{key}" in readme
    for key in ("workers.defaults.autoscaling.lagCount", "redis.auth.password", "services.api.autoscaling.enabled"):
        assert f"| `{key}` |" in readme
