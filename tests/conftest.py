"""Fixtures every test module can use without importing them, and the markers that follow from
them.

Servers (tests/support/servers/): the real redis-server and SeaweedFS S3 (`redis_server`,
`s3_server`, one each per session) and `influence serve` as its own process (`served`, one per
session). The service system (tests/support/system.py): `workspace`, tiny models and training
data (one per session; tests write nothing into it but names of their own, which they remove),
and `cluster`, a JobSystem with a gRPC server and a worker thread on those servers (one per
module; its tests name what they create uniquely, or share it read-only).

Markers (registered in pyproject.toml): a test that uses a server fixture is marked
`needs_servers` here; modules and tests that start servers of their own (an embedded system,
`influence serve`, a private redis-server) carry the marker themselves, as `needs_helm`,
`needs_browser` and `slow` are carried where they apply. Everything under tests/faults/ needs
servers. The quick run, `pytest -m "not needs_servers and not needs_helm and not needs_browser
and not slow"`, is the engine and the pure-Python contracts.
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest

from tests.support.system import Cluster, build_workspace

pytest_plugins = ["tests.support.servers.redis", "tests.support.servers.s3", "tests.support.servers.influence"]

# A suite started in the background of a shell without job control inherits SIGINT ignored, and
# so would every process it starts: the tests that interrupt a command (tests/services/cli/
# test_signals.py) would fail or wait forever. Ctrl-C means KeyboardInterrupt here, as in a terminal.
signal.signal(signal.SIGINT, signal.default_int_handler)

SERVER_FIXTURES = {"redis_server", "s3_server", "served"}  # and every fixture built on them
FOLDERS_NEEDING_SERVERS = ("faults",)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("system"))


@pytest.fixture(scope="module")
def cluster(redis_server, s3_server):
    """One per module: its tests must not depend on what other tests left in it."""
    created = Cluster(redis_server.url, s3_server.url(f"b{uuid.uuid4().hex[:10]}"))
    yield created
    created.close()


def pytest_collection_modifyitems(config, items):
    folders = {Path(__file__).parent / name for name in FOLDERS_NEEDING_SERVERS}
    for item in items:
        uses_a_server = bool(SERVER_FIXTURES & set(getattr(item, "fixturenames", ())))
        if uses_a_server or folders & set(item.path.parents):
            item.add_marker(pytest.mark.needs_servers)
