"""The launcher: extra workers for one large job (a fit or an index build), as a Kubernetes
Indexed Job on a named worker pool, sized to the job's shards, watched to completion, then
deleted.

    python -m services.launcher --server HOST:PORT --operation operations/ID --pool gpu \\
        [--release influence] [--namespace NS] [--max-workers 16]

The Job's pods are the pool's own (its Deployment's pod template: image, device, resources,
node selection, secrets, volumes), each running `influence worker ... --until-done OPERATION`,
so every pod takes the pool's tasks until the operation ends and then exits 0; the Job completes
when all of them have. Indexes only name the pods: which shard a pod runs is the queue's business,
so a lost pod costs nothing but its lease. The chart's `launcher.rbac.create` makes the
ServiceAccount this needs in a cluster (Jobs: create/get/list/watch/delete; the pools'
Deployments: get); outside one it uses the kubeconfig.

Exit codes: 0 the Job completed, 1 it failed or timed out; an error exits with the error table's
code (services/errors.py), as the `influence` command does: 2 fix your input, 1 the system
failed, 3 the operation was cancelled.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import sys
import time
from dataclasses import dataclass

from .errors import DomainError, InputError, NotFoundError, PreconditionError, UnavailableError, exit_code_of

log = logging.getLogger("influence.launcher")

COMPONENT = "app.kubernetes.io/component"
OPERATION_LABEL = "influence.io/operation"


@dataclass(frozen=True)
class LaunchResult:
    job: str
    workers: int
    outcome: str  # "Complete", "Failed" (the Job's final condition) or "Timeout"
    succeeded: int
    failed: int


def shards_of(client, operation: str) -> int:
    """Shards of the stage `operation` runs now (`shards_total` of its metadata; at least 1).
    `client` is a services.client.InfluenceClient."""
    from .client import operation_metadata

    reply = client.get_operation(operation)
    if reply.done:
        raise PreconditionError(f"{operation} has already ended: nothing to launch workers for")
    return max(1, int(operation_metadata(reply).shards_total))


def pool_deployment_name(release_fullname: str, pool: str) -> str:
    """The chart's name for a pool's Deployment (templates/workers.yaml)."""
    return f"{release_fullname}-worker-{pool}"[:63].rstrip("-")


def job_manifest(
    deployment: dict, operation: str, workers: int, *, ttl_seconds: int = 3600, deadline_seconds: float = 86_400.0
) -> dict:
    """The Indexed Job (a plain dict, as the API takes it) of `workers` pods cut from the pool's
    Deployment `deployment` (a dict as the API returns it), each working until `operation` ends.
    Bounded whatever happens to the launcher: Kubernetes ends the Job after `deadline_seconds`
    (activeDeadlineSeconds), a pod index that keeps failing gives up after 2 retries of its own
    (backoffLimitPerIndex; Kubernetes >= 1.29, ignored before), and the finished Job is deleted
    `ttl_seconds` later."""
    if workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    operation_id = operation.removeprefix("operations/")
    metadata = deployment["metadata"]
    template = copy.deepcopy(deployment["spec"]["template"])
    pool_component = template["metadata"]["labels"].get(COMPONENT, "")
    if not pool_component.startswith("worker-"):
        raise PreconditionError(f"{metadata['name']} is not a worker pool's Deployment (component {pool_component!r})")
    component = "launch-" + pool_component.removeprefix("worker-")
    name = f"{metadata['name'][:40].rstrip('-')}-{operation_id[:12]}".lower()
    labels = {**template["metadata"]["labels"], COMPONENT: component, OPERATION_LABEL: operation_id[:63]}
    template["metadata"]["labels"] = labels
    spec = template["spec"]
    spec["restartPolicy"] = "OnFailure"  # a crashed worker restarts in place; its task is reclaimed
    container = spec["containers"][0]
    args = list(container.get("args") or [])
    if not args or args[0] != "worker":
        raise PreconditionError(f"{metadata['name']} does not run `influence worker` (args {args})")
    if "--until-done" in args:
        index = args.index("--until-done")
        del args[index : index + 2]
    container["args"] = [*args, "--until-done", operation]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": metadata.get("namespace", "default"),
            "labels": {
                **metadata.get("labels", {}),
                COMPONENT: component,
                OPERATION_LABEL: operation_id[:63],
            },
        },
        "spec": {
            "completionMode": "Indexed",
            "completions": workers,
            "parallelism": workers,
            "backoffLimit": 2 * workers,
            "backoffLimitPerIndex": 2,
            "activeDeadlineSeconds": max(1, int(deadline_seconds)),
            "ttlSecondsAfterFinished": ttl_seconds,  # a safety net: the launcher deletes it itself
            "template": template,
        },
    }


class Launcher:
    """Creates, watches and deletes launched Jobs through a kubernetes `ApiClient`."""

    def __init__(self, api_client, namespace: str):
        from kubernetes import client

        self.namespace = namespace
        self.apps = client.AppsV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)

    def _api(self, what: str, call, *args, **kwargs):
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return call(*args, **kwargs)
        except ApiException as error:
            if error.status == 404:
                raise NotFoundError(f"{what}: not found in namespace {self.namespace}") from None
            if error.status in (401, 403):
                raise PreconditionError(
                    f"{what}: the Kubernetes API refused ({error.status} {error.reason}); "
                    "does the ServiceAccount have the chart's launcher Role (launcher.rbac.create)?"
                ) from None
            raise UnavailableError(f"{what}: Kubernetes API error {error.status} {error.reason}") from None
        except HTTPError as error:
            raise UnavailableError(f"{what}: cannot reach the Kubernetes API: {error}") from None

    def launch(self, deployment_name: str, operation: str, workers: int, deadline_seconds: float = 86_400.0) -> str:
        """Create the Job (ended by Kubernetes after `deadline_seconds`); returns its name."""
        # Raw JSON both ways (_preload_content=False): the pod template goes back as it came,
        # never through the client's typed models.
        response = self._api(
            f"worker pool Deployment {deployment_name}",
            self.apps.read_namespaced_deployment,
            deployment_name,
            self.namespace,
            _preload_content=False,
        )
        manifest = job_manifest(json.loads(response.data), operation, workers, deadline_seconds=deadline_seconds)
        self._api(
            f"creating Job {manifest['metadata']['name']}",
            self.batch.create_namespaced_job,
            self.namespace,
            manifest,
            _preload_content=False,
        )
        log.info("launched Job %s: %d workers for %s", manifest["metadata"]["name"], workers, operation)
        return manifest["metadata"]["name"]

    def wait(self, job: str, timeout: float) -> tuple[str, int, int]:
        """Watch `job` until it completes or fails (or `timeout` seconds pass): (outcome, succeeded, failed)."""
        from kubernetes import watch

        deadline = time.monotonic() + timeout
        seen = {"succeeded": 0, "failed": 0}

        def watch_once() -> str | None:
            """One watch request (the server ends it after timeout_seconds): the final condition or None."""
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    self.batch.list_namespaced_job,
                    self.namespace,
                    field_selector=f"metadata.name={job}",
                    timeout_seconds=max(1, int(min(300, deadline - time.monotonic()))),
                    deserialize=False,  # plain dicts, as the API sent them
                ):
                    status = event["object"].get("status") or {}
                    seen["succeeded"], seen["failed"] = status.get("succeeded", 0), status.get("failed", 0)
                    for condition in status.get("conditions") or []:
                        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
                            return condition["type"]
                    if time.monotonic() >= deadline:
                        return None
            finally:
                stream.stop()
            return None

        while time.monotonic() < deadline:
            outcome = self._api(f"watching Job {job}", watch_once)
            if outcome is not None:
                return outcome, seen["succeeded"], seen["failed"]
        return "Timeout", seen["succeeded"], seen["failed"]

    def delete(self, job: str) -> None:
        """Delete `job` and its pods (background propagation); a Job already gone is fine."""
        from kubernetes import client

        with contextlib.suppress(NotFoundError):
            self._api(
                f"deleting Job {job}",
                self.batch.delete_namespaced_job,
                job,
                self.namespace,
                body=client.V1DeleteOptions(propagation_policy="Background"),
            )

    def run(self, deployment_name: str, operation: str, workers: int, timeout: float = 86_400.0) -> LaunchResult:
        """Launch, watch to the end, clean up (also when interrupted)."""
        job = self.launch(deployment_name, operation, workers, timeout)
        try:
            outcome, succeeded, failed = self.wait(job, timeout)
        finally:
            self.delete(job)
        return LaunchResult(job, workers, outcome, succeeded, failed)


def _api_client(kubeconfig: str = ""):
    import os

    from kubernetes import client, config

    if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config(config_file=kubeconfig or None)
    return client.ApiClient()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.launcher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True, metavar="HOST:PORT", help="the system's gRPC entry point")
    parser.add_argument("--operation", required=True, help="operations/ID of the fit or index build")
    parser.add_argument("--pool", required=True, help="the worker pool whose pods to launch (e.g. gpu)")
    parser.add_argument("--release", default="influence", help="the chart's full name (default: influence)")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--max-workers", type=int, default=16, help="at most this many pods (default 16)")
    parser.add_argument("--timeout", type=float, default=86_400.0, help="seconds to wait (default: a day)")
    parser.add_argument("--kubeconfig", default="", help="default: in-cluster, else ~/.kube/config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .client import InfluenceClient

    try:
        with InfluenceClient(args.server) as client:
            workers = min(shards_of(client, args.operation), max(1, args.max_workers))
        launcher = Launcher(_api_client(args.kubeconfig), args.namespace)
        result = launcher.run(pool_deployment_name(args.release, args.pool), args.operation, workers, args.timeout)
    except DomainError as error:
        print(f"launcher: error: {error}", file=sys.stderr)
        return exit_code_of(error)  # the error table's, as the `influence` command's
    print(
        f"{result.job}: {result.outcome} ({result.succeeded} of {result.workers} workers done, {result.failed} failed)"
    )
    return 0 if result.outcome == "Complete" else 1


if __name__ == "__main__":
    sys.exit(main())
