"""Registering a dataset costs memory by the line, not by the file (docs/reliability.md#limits).

`influence serve` with one in-process worker (the API server's upload spool and validation and
the register task in one process) registers 4, then 12 training lines of 4 MB each, uploaded in
chunks; its peak RSS is measured while it does. The first file costs what one long line costs (the
tokeniser's ~100 bytes per byte of text, ~0.4 GB for 4 MB, is most of it); the second, three times
larger, costs nothing more. Before streaming, the whole file was held several times over (the
request, its records, a shard's texts tokenised at once), and every further line cost as much again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

from services.client import InfluenceClient
from services.toy.models import build_tiny_model, save_model_dir
from services.toy.tokenizer import build_word_tokenizer
from tests.support.memory import PeakRss
from tests.support.servers.influence import wait_serving
from tests.support.servers.ports import free_ports

pytestmark = pytest.mark.needs_servers  # every test here runs real servers

WORDS = [f"w{i}" for i in range(40)]
MiB = 2**20
LINE_BYTES = 4_000_000  # under the default line limit (INFLUENCE_MAX_LINE_BYTES, 4 MiB)


def test_registering_long_lines_holds_about_one_line_in_memory(redis_server, s3_server, tmp_path):
    tokenizer = build_word_tokenizer(WORDS)
    save_model_dir(build_tiny_model("gpt2", len(tokenizer), d_model=16, seed=0), tokenizer, tmp_path / "model")
    words = " ".join(WORDS[n % 40] for n in range(LINE_BYTES // 3))[: LINE_BYTES - 40]
    files = {}
    for lines in (4, 12):
        files[lines] = tmp_path / f"long{lines}.jsonl"
        files[lines].write_text("".join(json.dumps({"id": f"long{n}", "text": words}) + "\n" for n in range(lines)))
    port = free_ports(1)[0]
    env = {
        **os.environ,
        **s3_server.env(),
        "INFLUENCE_REDIS_URL": redis_server.url,
        "INFLUENCE_STORE_URL": s3_server.url(f"long{uuid.uuid4().hex[:8]}"),
        "INFLUENCE_QUEUE_PREFIX": f"long{uuid.uuid4().hex[:6]}",
        "INFLUENCE_LOG_LEVEL": "warning",
        "HF_HUB_OFFLINE": "1",
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--state-dir", str(tmp_path / "state")],
            env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, process, log)
        start, peak = 0, {}
        with InfluenceClient(target) as client:
            client.register_dataset(str(tmp_path / "model"), b'{"text": "w1 w2 w3"}\n', max_length=64)  # warm up
            for lines, path in files.items():
                with PeakRss(process.pid) as rss:
                    start = start or rss.peak
                    dataset = client.register_dataset(str(tmp_path / "model"), path, max_length=64, shard_size=1024)
                peak[lines] = (rss.peak - start) / MiB
                print(
                    f"serve RSS {start / MiB:.0f} MiB at first, peak +{peak[lines]:.0f} MiB registering {lines} lines"
                )
                assert dataset.num_examples == lines and dataset.num_shards == 1
        assert peak[4] < 1024, f"4 lines of 4 MB took the server {peak[4]:.0f} MiB above where it started"
        assert peak[12] < peak[4] + 128, (
            f"12 lines peaked {peak[12] - peak[4]:.0f} MiB above 4: memory follows the file"
        )
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
