"""Security as a caller meets it: `influence serve --auth-tokens` processes on the real Redis and
S3 servers, driven over real gRPC by the client and the CLI. Tokens on every call (health and
reflection exempt), tokens rotated by editing the file, tenants that cannot see, use, cancel or
delete each other's work, a per-tenant quota on queued work, TLS and mutual TLS, and no token
in the server's debug log."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.cli import main
from services.client import InfluenceClient
from services.errors import InputError, NotFoundError, ResourceExhaustedError, UnauthenticatedError, UnavailableError
from services.gen.influence.v1 import common_pb2, factor_service_pb2, gradient_service_pb2, query_service_pb2
from services.storage import open_store
from tests.support.servers.certs import make_certificates
from tests.support.servers.ports import free_ports, wait_until
from tests.support.system import unique_jsonl

TOKENS = {"alice": secrets.token_hex(16), "bob": secrets.token_hex(16)}


def write_tokens(path: Path, tokens: dict[str, str]) -> None:
    lines = ["# TOKEN TENANT", *(f"{token} {tenant}" for tenant, token in tokens.items())]
    path.write_text("\n".join(lines) + "\n")


class Serve:
    """`influence serve` in its own process; its log (stdout and stderr) in a file."""

    def __init__(self, redis_server, s3_server, directory: Path, *args: str, credentials=None):
        self.port = free_ports(1)[0]
        self.target = f"127.0.0.1:{self.port}"
        self.bucket = f"sec{uuid.uuid4().hex[:8]}"
        self.store_url = s3_server.url(self.bucket)
        self.log = directory / "serve.log"
        env = {
            **os.environ,
            **s3_server.env(),
            "INFLUENCE_REDIS_URL": redis_server.url,
            "INFLUENCE_STORE_URL": self.store_url,
            "INFLUENCE_QUEUE_PREFIX": f"sec{uuid.uuid4().hex[:6]}",
            "HF_HUB_OFFLINE": "1",
        }
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "services.cli",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--state-dir",
                    str(directory / "state"),
                    *args,
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        channel = grpc.secure_channel(self.target, credentials) if credentials else grpc.insecure_channel(self.target)
        health = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(self.log.read_text())
            try:
                return (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                )
            except grpc.RpcError:
                return False

        try:
            wait_until(serving, 300, "influence serve", self.log)  # torch imports crawl on a loaded machine
        except BaseException:
            self.stop()  # a server that never became ready must not outlive the test
            raise
        finally:
            channel.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture(scope="module")
def secured(redis_server, s3_server, tmp_path_factory, workspace):
    """A server with tokens for alice and bob, one in-process worker, logging at debug level,
    loading models only from under the test workspace."""
    directory = tmp_path_factory.mktemp("secured")
    tokens_file = directory / "tokens.txt"
    write_tokens(tokens_file, TOKENS)
    server = Serve(
        redis_server,
        s3_server,
        directory,
        "--auth-tokens",
        str(tokens_file),
        "--log-level",
        "debug",
        "--model-roots",
        str(workspace),
    )
    server.tokens_file = tokens_file
    yield server
    server.stop()


def client_of(server: Serve, tenant: str | None, **options) -> InfluenceClient:
    return InfluenceClient(server.target, token=TOKENS[tenant] if tenant else "", retries=0, **options)


def test_every_call_but_health_and_reflection_needs_a_valid_token(secured):
    channel = grpc.insecure_channel(secured.target)
    try:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(
            reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        )
        services = {service.name for service in answers[0].list_services_response.service}
        assert "influence.v1.GradientService" in services
        # no token at all, and a wrong one: UNAUTHENTICATED with a message that says what to do
        operations = operations_pb2_grpc.OperationsStub(channel)
        for metadata in (None, [("authorization", "Bearer " + secrets.token_hex(16))], [("authorization", "Basic x")]):
            with pytest.raises(grpc.RpcError) as caught:
                operations.ListOperations(operations_pb2.ListOperationsRequest(), metadata=metadata, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "token" in caught.value.details()
    finally:
        channel.close()
    # the client: a domain error, on unary and streaming calls alike
    with client_of(secured, None) as anonymous:
        with pytest.raises(UnauthenticatedError, match="INFLUENCE_TOKEN"):
            anonymous.list_datasets()
        with pytest.raises(UnauthenticatedError):
            list(
                anonymous._stream(
                    anonymous.queries.StreamScoreRows, query_service_pb2.StreamScoreRowsRequest(name="results/abc")
                )
            )
    with client_of(secured, "alice") as alice:  # a valid token: alice's datasets, as the store holds them
        published = {key.split("/")[3] for key in open_store(secured.store_url).list("tenants/alice/datasets/")}
        assert sorted(dataset.name for dataset in alice.list_datasets()) == sorted(f"datasets/{i}" for i in published)


def test_tenants_cannot_list_read_use_cancel_or_delete_each_others_work(secured, workspace, tmp_path):
    model = str(workspace / "model")
    train = unique_jsonl(workspace)  # data of this test's own: its jobs run, whatever ran before
    (tmp_path / "train.jsonl").write_bytes(train)
    with client_of(secured, "alice") as alice, client_of(secured, "bob") as bob:
        alice_before = {d.name for d in alice.list_datasets()}
        operations_before = {op.name for op in alice.list_operations()}
        # a tenant may not make the server read its own files
        with pytest.raises(InputError, match="does not read its own files"):
            alice.register_dataset(model, tmp_path / "train.jsonl", by_path=True, shard_size=8)
        dataset = alice.register_dataset(model, train, shard_size=8)
        factors = alice.fit_factors(model, dataset.name, strategy="kfac")
        operations = [op for op in alice.list_operations() if op.name not in operations_before]
        assert sorted(_kind(op) for op in operations) == ["fit_factors", "register_dataset"]
        fit_operation = next(op.name for op in operations if _kind(op) == "fit_factors")

        # bob sees nothing of alice's
        assert bob.list_datasets() == []
        assert bob.list_factor_sets() == []
        assert list(bob._call(bob.operations.ListOperations, operations_pb2.ListOperationsRequest()).operations) == []
        # (dataset names are derived from content and settings within a tenant's namespace: bob's
        # own copy of the same data would have the same name as alice's, his own; he uses other settings)
        own = bob.register_dataset(model, train, shard_size=7)
        assert [d.name for d in bob.list_datasets()] == [own.name] and own.name != dataset.name

        # and every way of naming alice's resources answers exactly as for names that never existed
        def refusals(dataset_name: str, factors_name: str, operation_name: str) -> list[str]:
            messages = []
            calls = [
                lambda: bob.get_dataset(dataset_name),
                lambda: bob.delete_dataset(dataset_name),
                lambda: bob.get_factor_set(factors_name),
                lambda: bob.delete_factor_set(factors_name),
                lambda: bob.download_factors(factors_name, workspace / f"stolen-{uuid.uuid4().hex}"),
                lambda: bob.fit_factors(model, dataset_name),
                lambda: bob.compute_scores(model, factors_name, own.name, [_query()]),
                lambda: bob._call(bob.operations.GetOperation, operations_pb2.GetOperationRequest(name=operation_name)),
                lambda: bob.cancel(operation_name),
                lambda: bob._call(
                    bob.operations.DeleteOperation, operations_pb2.DeleteOperationRequest(name=operation_name)
                ),
            ]
            for call in calls:
                with pytest.raises(NotFoundError) as caught:
                    call()
                messages.append(str(caught.value))
            return messages

        stolen = refusals(dataset.name, factors.name, fit_operation)
        made_up = refusals("datasets/" + "x" * 20, "factorSets/" + "y" * 20, "operations/" + "z" * 20)
        normalise = {
            dataset.name: "D",
            factors.name: "F",
            fit_operation: "O",
            "datasets/" + "x" * 20: "D",
            "factorSets/" + "y" * 20: "F",
            "operations/" + "z" * 20: "O",
        }

        def blind(message: str) -> str:
            for name, placeholder in normalise.items():
                message = message.replace(name, placeholder)
            return message

        assert [blind(m) for m in stolen] == [blind(m) for m in made_up]

        # alice's work is intact and hers
        assert alice.get_dataset(dataset.name).num_examples == dataset.num_examples
        assert alice.get_factor_set(factors.name).strategy == factor_service_pb2.STRATEGY_KFAC
        assert {d.name for d in alice.list_datasets()} - alice_before == {dataset.name}
    # in the store, each tenant's artifacts live under its own prefix
    keys = open_store(secured.store_url).list("")
    dataset_id, factors_id = dataset.name.split("/")[1], factors.name.split("/")[1]
    assert any(key.startswith(f"tenants/alice/datasets/{dataset_id}/") for key in keys)
    assert any(key.startswith(f"tenants/alice/factors/{factors_id}/") for key in keys)
    assert any(key.startswith(f"tenants/bob/datasets/{own.name.split('/')[1]}/") for key in keys)
    assert not [key for key in keys if not key.startswith("tenants/")]


def _kind(operation) -> str:
    metadata = common_pb2.OperationMetadata()
    operation.metadata.Unpack(metadata)
    return metadata.kind


def _query():
    from services.engine.records import Query

    return Query(id="q", prompt="w1 w2", completion="w3")


def accepted(server: Serve, token: str) -> bool:
    with InfluenceClient(server.target, token=token, retries=0) as client:
        try:
            client.list_datasets()
        except UnauthenticatedError:
            return False
    return True


def test_tokens_rotate_without_a_restart(secured):
    """The served end of rotation (its timing and a broken file's are test_auth.py's, on a manual
    clock): the server's TokenFile re-checks every second of real time, which these waits poll."""
    rotated = {**TOKENS, "bob": secrets.token_hex(16)}
    write_tokens(secured.tokens_file, rotated)
    try:
        wait_until(lambda: not accepted(secured, TOKENS["bob"]), 10, "the rotated tokens file to be read")
        assert accepted(secured, rotated["bob"])
        assert accepted(secured, TOKENS["alice"])  # untouched tokens keep working
    finally:
        write_tokens(secured.tokens_file, TOKENS)
        wait_until(lambda: accepted(secured, TOKENS["bob"]), 10, "the tokens file to be read back")


def test_the_cli_sends_the_token_from_the_environment(secured, workspace, tmp_path, monkeypatch, capsys):
    arguments = [
        "fit",
        "--server",
        secured.target,
        "--model",
        str(workspace / "model"),
        "--data",
        str(workspace / "train.jsonl"),
        "--out",
        str(tmp_path / "f"),
        "--quiet",
        "--strategy",
        "diagonal",
        "--max-examples",
        "8",
    ]
    monkeypatch.delenv("INFLUENCE_TOKEN", raising=False)
    assert main(arguments) == 2
    assert "INFLUENCE_TOKEN" in capsys.readouterr().err
    assert main([*arguments, "--token", secrets.token_hex(16)]) == 2
    assert "invalid token" in capsys.readouterr().err
    monkeypatch.setenv("INFLUENCE_TOKEN", TOKENS["alice"])
    assert main(arguments) == 0
    assert json.loads((tmp_path / "f" / "manifest.json").read_text())["metadata"]["strategy"] == "diagonal"


@pytest.mark.needs_servers
def test_serve_refuses_a_bad_tokens_file(tmp_path):
    bad = tmp_path / "tokens.txt"
    bad.write_text("short alice\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "serve",
            "--auth-tokens",
            str(bad),
            "--port",
            "0",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=300,  # it imports torch: slow on a loaded machine
    )
    assert result.returncode == 2
    assert "line 1" in result.stderr and "shorter than" in result.stderr
    assert "short" not in result.stderr.replace("shorter", "")  # the token itself is never quoted


def pickled_model(directory: Path, source: Path, marker: Path) -> Path:
    """A model directory with `source`'s tokenizer and config whose only weights are a pickle
    that, if ever unpickled, creates `marker`."""
    import pickle
    import shutil

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    directory.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, directory / path.name)
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    return directory


@pytest.fixture
def in_workspace(workspace):
    """Paths under the session's workspace (the secured server's model root) with names of their
    own, removed after the test."""
    made: list[Path] = []

    def path(name: str) -> Path:
        made.append(workspace / f"{name}-{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield path
    for made_path in made:
        if made_path.is_symlink():
            made_path.unlink()
        else:
            shutil.rmtree(made_path, ignore_errors=True)


def test_models_load_only_from_the_roots_without_probing_and_never_from_pickles(
    secured, workspace, in_workspace, tmp_path
):
    model = str(workspace / "model")
    outside = tmp_path / "outside-model"
    outside.mkdir()
    escape = in_workspace("escape")
    escape.symlink_to(outside, target_is_directory=True)
    train = (workspace / "train.jsonl").read_bytes()
    with client_of(secured, "alice") as alice:
        messages = []
        for path in (
            "/etc",
            "/no/such/directory",
            str(outside),
            f"{workspace}/../{outside.name}",
            str(escape),
            "relative/model",
        ):
            request = gradient_service_pb2.RegisterDatasetRequest(
                model=common_pb2.ModelSpec(path=path), jsonl=train, request_id=uuid.uuid4().hex
            )
            with pytest.raises(InputError) as caught:  # the path exactly as given (the client resolves)
                alice._call(alice.gradients.RegisterDataset, request)
            messages.append(str(caught.value).replace(repr(path), "PATH"))
        assert len(set(messages)) == 1 and "--model-roots" in messages[0], messages
        # inside the roots: a pickle-only model directory is refused by the worker, never unpickled
        marker = tmp_path / "unpickled"
        pickled = pickled_model(in_workspace("pickled-model"), workspace / "model", marker)
        dataset = alice.register_dataset(model, train, shard_size=8)
        with pytest.raises(InputError, match=r"pytorch_model\.bin: pickle files"):
            alice.fit_factors(str(pickled), dataset.name)
        assert not marker.exists()


def test_a_model_s_own_code_never_runs_unless_allowed(tmp_path, workspace):
    import shutil

    from services.engine.model_io import ModelAccess, load_model_and_tokenizer, set_model_access

    custom = tmp_path / "custom"
    shutil.copytree(workspace / "model", custom)
    marker = tmp_path / "ran"
    config = json.loads((custom / "config.json").read_text())
    config["model_type"] = "own-model"  # a type transformers does not know: only the directory's code can build it
    config["auto_map"] = {"AutoConfig": "own.OwnConfig", "AutoModelForCausalLM": "own.OwnModel"}
    (custom / "config.json").write_text(json.dumps(config))
    # subclasses, so that transformers' registration of the loaded classes (their _auto_class)
    # does not leak into GPT-2's own classes for the rest of the test session
    (custom / "own.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "class OwnConfig(GPT2Config):\n    model_type = 'own-model'\n"
        "class OwnModel(GPT2LMHeadModel):\n    config_class = OwnConfig\n"
    )
    set_model_access(ModelAccess(roots=(tmp_path.resolve(),)))
    try:
        with pytest.raises(InputError):
            load_model_and_tokenizer(custom)
        assert not marker.exists()
        with pytest.raises(InputError, match="--model-roots"):
            load_model_and_tokenizer(workspace / "model")
        # the same directory with the operator's permission does run its code (so the above could fail)
        set_model_access(ModelAccess(roots=(tmp_path.resolve(),), allow_remote_code=True))
        with contextlib.suppress(InputError):
            load_model_and_tokenizer(custom)
        assert marker.exists()
        marker.unlink()
    finally:
        set_model_access(ModelAccess())
    pickled = pickled_model(tmp_path / "pickled", workspace / "model", marker)
    with pytest.raises(InputError, match="holds no safetensors weights"):
        load_model_and_tokenizer(pickled)
    assert not marker.exists()


def test_no_token_reaches_the_log_even_at_debug_level(secured):
    """The server at debug level, after refusing a token and accepting others (and whatever the
    module's other tests did with tokens before)."""
    wrong = secrets.token_hex(16)
    assert not accepted(secured, wrong)
    assert accepted(secured, TOKENS["alice"]) and accepted(secured, TOKENS["bob"])
    log = secured.log.read_text()
    assert "refused" in log  # debug logging was on and saw the refusal
    for token in (*TOKENS.values(), wrong):
        assert token not in log
        assert token[:12] not in log


# -- TLS, mutual TLS and the quota --------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def mutual_tls(redis_server, s3_server, tmp_path_factory, certificates):
    """Mutual TLS, tokens, no workers (submitted work stays queued) and a quota of 2 per tenant."""
    directory = tmp_path_factory.mktemp("mtls")
    tokens_file = directory / "tokens.txt"
    write_tokens(tokens_file, TOKENS)
    client_credentials = grpc.ssl_channel_credentials(
        certificates.ca.read_bytes(), certificates.client_key.read_bytes(), certificates.client_cert.read_bytes()
    )
    server = Serve(
        redis_server,
        s3_server,
        directory,
        "--auth-tokens",
        str(tokens_file),
        "--workers",
        "0",
        "--max-queued-operations",
        "2",
        "--tls-cert",
        str(certificates.server_cert),
        "--tls-key",
        str(certificates.server_key),
        "--tls-client-ca",
        str(certificates.ca),
        credentials=client_credentials,
    )
    yield server
    server.stop()


def test_mutual_tls_admits_only_clients_with_a_certificate_of_the_ca(mutual_tls, certificates):
    tls = {
        "tls_ca": str(certificates.ca),
        "tls_cert": str(certificates.client_cert),
        "tls_key": str(certificates.client_key),
    }
    with client_of(mutual_tls, "alice", **tls) as alice:
        assert alice.list_datasets() == []
    refused = [
        {},  # plaintext to a TLS port
        {"tls_ca": str(certificates.ca)},  # TLS without a client certificate
        {**tls, "tls_ca": str(certificates.other_ca)},  # a server certificate the client cannot trust
    ]
    for options in refused:
        with client_of(mutual_tls, "alice", **options) as client, pytest.raises(UnavailableError):
            client.list_datasets()
    with pytest.raises(InputError, match="both"):
        InfluenceClient(mutual_tls.target, tls_ca=str(certificates.ca), tls_cert=str(certificates.client_cert))


def test_queued_work_is_limited_per_tenant(mutual_tls, certificates, workspace):
    tls = {
        "tls_ca": str(certificates.ca),
        "tls_cert": str(certificates.client_cert),
        "tls_key": str(certificates.client_key),
    }

    def submit(client: InfluenceClient):
        request = gradient_service_pb2.RegisterDatasetRequest(
            model=common_pb2.ModelSpec(path=str(workspace / "model")),
            jsonl=(workspace / "train.jsonl").read_bytes(),
            request_id=uuid.uuid4().hex,
        )
        return client._call(client.gradients.RegisterDataset, request)

    with client_of(mutual_tls, "alice", **tls) as alice, client_of(mutual_tls, "bob", **tls) as bob:
        first, _ = submit(alice), submit(alice)
        with pytest.raises(ResourceExhaustedError, match=r"--max-queued-operations\) is 2"):
            submit(alice)
        assert not submit(bob).done  # the quota is per tenant
        alice.cancel(first.name)
        assert not submit(alice).done  # a cancelled operation frees its place


def test_request_ids_and_listings_are_per_tenant(redis_server):
    """A request id another tenant already used must not hand over that tenant's operation."""
    from services.jobs.connection import connect
    from services.jobs.operations import OperationStore

    operations = OperationStore(connect(redis_server.url), prefix=f"sec{uuid.uuid4().hex[:6]}")
    theirs, created = operations.create("fit_factors", {}, "same-request-id", tenant="alice")
    assert created
    mine, created = operations.create("fit_factors", {}, "same-request-id", tenant="bob")
    assert created and mine["id"] != theirs["id"] and mine["tenant"] == "bob"
    again, created = operations.create("fit_factors", {}, "same-request-id", tenant="bob")
    assert not created and again["id"] == mine["id"]  # a retry within one tenant still finds its own
    legacy, _ = operations.create("fit_factors", {}, "same-request-id")
    assert legacy["tenant"] == "default" and legacy["id"] not in (mine["id"], theirs["id"])
    for tenant, expected in (("alice", theirs), ("bob", mine), ("default", legacy)):
        assert [record["id"] for record in operations.list(tenant=tenant)[0]] == [expected["id"]]
    operations.delete(mine["id"])
    assert operations.list(tenant="bob")[0] == []
