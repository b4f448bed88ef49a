"""The service system as the tests run it: a workspace of tiny models and training data, and a
`Cluster` (a JobSystem on the real Redis and S3 servers, a gRPC server, worker threads) with a
Redis prefix and a bucket of its own. The fixtures over them (`workspace`, `cluster`) are in
tests/conftest.py."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import torch

from services.assembly import job_system, make_server
from services.client import InfluenceClient
from services.engine.records import Query, TrainingExample
from services.jobs.connection import connect
from services.rpc.common import Limits
from services.rpc.server import BackgroundServer
from services.storage import open_store
from services.system.runner import Worker
from services.toy.models import build_tiny_model, save_model_dir
from services.toy.tokenizer import build_word_tokenizer

WORDS = [f"w{i}" for i in range(50)]
QUERIES = [Query("a", "w1 w2 w3", "w4 w5"), Query("b", "w7 w8", "w9"), Query("c", "w10", "w11 w12 w13")]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def make_examples(count: int, seed: int, max_len: int = 12) -> list[TrainingExample]:
    generator = torch.Generator().manual_seed(seed)
    return [
        TrainingExample(
            f"t{i}",
            " ".join(
                WORDS[int(j)]
                for j in torch.randint(
                    0, len(WORDS), (int(torch.randint(3, max_len, (1,), generator=generator)),), generator=generator
                )
            ),
        )
        for i in range(count)
    ]


def build_workspace(root: Path) -> Path:
    """`root` with model/ (a tiny GPT-2 over WORDS), other-model/ (the same shape, other weights),
    other-vocab/ (another tokenizer) and train.jsonl (23 examples, ids t0..t22)."""
    tokenizer = build_word_tokenizer(WORDS)
    save_model_dir(build_tiny_model("gpt2", len(tokenizer), d_model=16, seed=0), tokenizer, root / "model")
    save_model_dir(build_tiny_model("gpt2", len(tokenizer), d_model=16, seed=1), tokenizer, root / "other-model")
    other_tokenizer = build_word_tokenizer(list(reversed(WORDS)))
    save_model_dir(
        build_tiny_model("gpt2", len(other_tokenizer), d_model=16, seed=0), other_tokenizer, root / "other-vocab"
    )
    examples = make_examples(23, seed=0)
    write_jsonl(root / "train.jsonl", [{"id": e.id, "text": e.text} for e in examples])
    return root


def unique_jsonl(workspace: Path) -> bytes:
    """train.jsonl's bytes and one more example with an id of its own: data no other test has
    registered (datasets are named by their content, so the same bytes are the same dataset)."""
    extra = json.dumps({"id": f"u{uuid.uuid4().hex[:12]}", "text": "w1 w2 w3"})
    return (workspace / "train.jsonl").read_bytes() + extra.encode() + b"\n"


class Cluster:
    """JobSystem on the real servers + a gRPC server + worker threads; fresh Redis prefix and bucket."""

    def __init__(
        self,
        redis_url: str,
        store_url: str,
        workers: int = 1,
        lease_seconds: float = 30.0,
        max_deliveries: int = 3,
        limits: Limits | None = None,
    ):
        self.prefix = f"t{uuid.uuid4().hex[:8]}"
        client = connect(redis_url)
        self.store = open_store(store_url)
        self.system = job_system(
            self.store, client, prefix=self.prefix, lease_seconds=lease_seconds, max_deliveries=max_deliveries
        )
        limits = limits or Limits(max_upload_bytes=1 * 2**20)
        self.server = BackgroundServer(lambda: make_server(self.system, limits=limits)).start()
        self.workers = [Worker(self.system, consumer=f"w{n}") for n in range(workers)]
        self.threads = [
            threading.Thread(target=w.run_forever, kwargs={"block_ms": 100}, daemon=True) for w in self.workers
        ]
        for thread in self.threads:
            thread.start()
        self.client = InfluenceClient(self.server.target)

    def close(self):
        self.client.close()
        for worker in self.workers:
            worker.stop.set()
        for thread in self.threads:
            thread.join(30)
        self.server.stop()
