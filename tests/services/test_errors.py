"""The one error table (services/errors.py) as callers meet it: every domain error reaches a gRPC
client with its status code and message and comes back as the same class; the CLI maps each to
its exit code; Redis outages are UNAVAILABLE, which the client retries with bounded backoff."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc

from services import errors
from services.client import InfluenceClient
from services.errors import UnavailableError
from services.rpc.server import BackgroundServer, build_server
from services.rpc.status import grpc_errors
from tests.support.servers.redis import RedisServer

# the error a server raises, its status, the CLI's exit code, whether the client retries it, and
# the class the client raises for that status (written out here, not asked of the code under test)
TABLE = [
    (errors.InputError, "INVALID_ARGUMENT", 2, False, errors.InputError),
    (errors.NotFoundError, "NOT_FOUND", 2, False, errors.NotFoundError),
    (errors.PreconditionError, "FAILED_PRECONDITION", 2, False, errors.PreconditionError),
    (errors.AlreadyExistsError, "ALREADY_EXISTS", 2, False, errors.AlreadyExistsError),
    (errors.ResourceExhaustedError, "RESOURCE_EXHAUSTED", 2, False, errors.ResourceExhaustedError),
    (errors.PermissionDeniedError, "PERMISSION_DENIED", 1, False, errors.PermissionDeniedError),
    (errors.UnauthenticatedError, "UNAUTHENTICATED", 2, False, errors.UnauthenticatedError),
    (errors.CancelledError, "CANCELLED", 3, False, errors.CancelledError),
    (errors.UnavailableError, "UNAVAILABLE", 1, True, errors.UnavailableError),
    (errors.AbortedError, "ABORTED", 1, False, errors.AbortedError),
    (errors.DataLossError, "DATA_LOSS", 2, False, errors.DataLossError),
    (errors.InternalError, "INTERNAL", 1, False, errors.InternalError),
    # more specific names map through their base: the client sees the base
    (errors.NonFiniteError, "FAILED_PRECONDITION", 2, False, errors.PreconditionError),
    (errors.IntegrityError, "DATA_LOSS", 2, False, errors.DataLossError),
    (errors.StorageUnavailable, "UNAVAILABLE", 1, True, errors.UnavailableError),
    (errors.QueueUnavailable, "UNAVAILABLE", 1, True, errors.UnavailableError),
]
COLUMNS = ("error", "code", "exit_code", "retryable", "client_error")


class Raising(operations_pb2_grpc.OperationsServicer):
    """GetOperation(name=CLASS) raises that domain error: the real servicer error path."""

    calls = 0

    @grpc_errors
    async def GetOperation(self, request, context):
        Raising.calls += 1
        raise getattr(errors, request.name)(f"raised {request.name}")


@pytest.fixture(scope="module")
def raising_server():
    def make():
        registration = (
            "google.longrunning.Operations",
            lambda server: operations_pb2_grpc.add_OperationsServicer_to_server(Raising(), server),
        )
        return build_server([registration])

    server = BackgroundServer(make).start()
    yield server.target
    server.stop()


@pytest.mark.parametrize(COLUMNS, TABLE, ids=[row[0].__name__ for row in TABLE])
def test_every_domain_error_keeps_its_code_over_grpc(raising_server, error, code, exit_code, retryable, client_error):
    assert (error.code, errors.exit_code_of(error("x")), error.retryable) == (code, exit_code, retryable)
    channel = grpc.insecure_channel(raising_server)
    with pytest.raises(grpc.RpcError) as raw:
        operations_pb2_grpc.OperationsStub(channel).GetOperation(
            operations_pb2.GetOperationRequest(name=error.__name__)
        )
    assert raw.value.code() == grpc.StatusCode[code]
    channel.close()
    with InfluenceClient(raising_server, retries=2) as client:
        Raising.calls = 0
        with pytest.raises(errors.DomainError) as raised:
            client._call(client.operations.GetOperation, operations_pb2.GetOperationRequest(name=error.__name__))
    # the system's own failures reach callers as a fixed sentence (errors.caller_message), never their text
    assert raised.value.code == code and (error.caller_text or f"raised {error.__name__}") in str(raised.value)
    assert type(raised.value) is client_error
    assert Raising.calls == (3 if retryable else 1), "only UNAVAILABLE is retried, a bounded number of times"


FINAL = [row for row in TABLE if not row[3]]


@pytest.mark.parametrize(COLUMNS, FINAL, ids=[row[0].__name__ for row in FINAL])
def test_the_launcher_exits_with_the_tables_code(
    raising_server, error, code, exit_code, retryable, client_error, capsys
):
    """`python -m services.launcher` reads the operation through the client: the error its server
    answers with gives the launcher's exit code, the one the `influence` command gives."""
    from services.launcher import main

    assert main(["--server", raising_server, "--operation", error.__name__, "--pool", "gpu"]) == exit_code
    assert (error.caller_text or f"raised {error.__name__}") in capsys.readouterr().err


def test_an_unexpected_exception_is_internal_with_one_line():
    assert errors.code_of(ValueError("boom")) == "INTERNAL" and errors.exit_code_of(KeyError()) == 1
    assert errors.message_of(RuntimeError("first\nsecond")) == "first"


@pytest.mark.needs_servers
def test_redis_down_is_unavailable_and_a_retry_after_it_returns_succeeds(tmp_path):
    """A real redis-server stops under an embedded system: calls get UNAVAILABLE (not INTERNAL);
    the client's bounded retries carry a create call across a short outage."""
    redis = RedisServer().start()
    try:
        from services.assembly import job_system, make_server
        from services.jobs.connection import connect
        from services.storage import LocalStore

        system = job_system(LocalStore(tmp_path / "store"), connect(redis.url))
        server = BackgroundServer(lambda: make_server(system)).start()
        try:
            redis.stop()
            with InfluenceClient(server.target, retries=1) as client:
                started = time.monotonic()
                with pytest.raises(UnavailableError, match="Redis unavailable"):
                    client._call(
                        client.operations.GetOperation, operations_pb2.GetOperationRequest(name="operations/x")
                    )
                assert time.monotonic() - started < 30
            # an outage shorter than the retries: the call succeeds
            restart = threading.Timer(1.0, redis.start)
            restart.start()
            with InfluenceClient(server.target, retries=8) as client, pytest.raises(errors.NotFoundError):
                client._call(  # Redis answered: the operation does not exist
                    client.operations.GetOperation, operations_pb2.GetOperationRequest(name="operations/x")
                )
            restart.join()
        finally:
            server.stop()
    finally:
        redis.cleanup()


@pytest.mark.slow
def test_the_cli_exit_codes_follow_the_table(tmp_path, capsys):
    """2 for the user's input, 1 when the system is unreachable (after the client's bounded retries)."""
    from services.cli import main
    from tests.support.servers.ports import free_ports

    missing = tmp_path / "nope"
    assert main(["fit", "--model", str(missing), "--data", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a b c"}\n')
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    started = time.monotonic()
    code = main(["fit", "--server", dead, "--model", "m", "--data", str(data), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "UNAVAILABLE" not in err and "error:" in err, err
    assert time.monotonic() - started < 30
