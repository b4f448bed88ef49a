"""Pools that cannot deadlock: a job naming cuda runs through the chart's pool split (a CPU pool of
the kinds that never load the job's model, a GPU pool of the rest) and finishes, with the results
of the same job on one CPU worker; with no GPU worker at all it fails with an error naming the
cause instead of waiting forever.

The "GPU" pool is simulated: a worker that claims cuda (its GPU check finds nothing wrong) and
loads every model on the CPU. Real Redis (embedded), real gRPC, a tiny GPT-2."""

from __future__ import annotations

import json
import random
import re
import threading
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from services.assembly import STAGE_TABLE
from services.client import InfluenceClient
from services.client.resources import model_spec
from services.embedded import EmbeddedSystem
from services.engine.model_io import load_model_and_tokenizer
from services.engine.records import Query
from services.errors import AbortedError
from services.system.caches import ModelCache
from services.system.context import WorkerContext
from services.system.runner import Worker
from services.toy.models import build_tiny_model, save_model_dir
from services.toy.tokenizer import build_word_tokenizer
from tests.support import ROOT

CHART = ROOT / "deploy" / "helm" / "influence"
POOLS = yaml.safe_load((CHART / "values.yaml").read_text())["workers"]["pools"]
GPU_KINDS, CPU_KINDS = POOLS["gpu"]["kinds"], POOLS["cpu"]["kinds"]
MODEL_FREE = {name for name, stage in STAGE_TABLE.stages.items() if not stage.loads_model}
WORDS = [f"w{i}" for i in range(50)]
QUERIES = [Query("a", "w1 w2 w3", "w4 w5"), Query("b", "w7 w8", "w9"), Query("c", "w10", "w11 w12 w13")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pools")
    tokenizer = build_word_tokenizer(WORDS)
    save_model_dir(build_tiny_model("gpt2", len(tokenizer), d_model=16, seed=0), tokenizer, root / "model")
    generator = random.Random(0)
    lines = [
        json.dumps({"id": f"t{i}", "text": " ".join(generator.choices(WORDS, k=generator.randint(3, 11)))})
        for i in range(23)
    ]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_the_charts_cpu_pool_takes_only_kinds_that_never_load_the_model():
    assert set(CPU_KINDS) <= MODEL_FREE, set(CPU_KINDS) - MODEL_FREE
    assert set(GPU_KINDS) | set(CPU_KINDS) == set(STAGE_TABLE.kinds)
    assert {"eigen", "finalize", "self_merge", "index_publish", "index_score"} <= MODEL_FREE
    # the chart refuses a CPU pool of model-loading kinds beside a GPU pool by its own list of model-free kinds
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    listed = re.search(r"\$modelFree := list ((?:\"\w+\" ?)+)", helpers)
    assert listed and set(re.findall(r"\"(\w+)\"", listed.group(1))) == MODEL_FREE


def simulated_gpu_context(store) -> WorkerContext:
    """A worker of the GPU pool on this CPU machine: it claims cuda (tasks naming cuda are its),
    finds its GPU check passing, and loads the models on the CPU."""

    def on_cpu(path, device, dtype, tokenizer=None, base=""):
        assert device == "cuda", device  # what the job asked for reached the loader
        return load_model_and_tokenizer(path, "cpu", dtype, tokenizer=tokenizer, base=base)

    return WorkerContext(store, models=ModelCache(loader=on_cpu, device="cuda"), device="cuda", gpu_check=lambda: None)


class Pools:
    """Worker threads of given kinds and contexts on an embedded system."""

    def __init__(self, system: EmbeddedSystem, pools: dict[str, tuple[list[str] | None, WorkerContext]]):
        self.workers = {
            name: Worker(system.system, kinds=kinds, consumer=name, context=context)
            for name, (kinds, context) in pools.items()
        }
        self.threads = [
            threading.Thread(target=worker.run_forever, kwargs={"block_ms": 50}, daemon=True)
            for worker in self.workers.values()
        ]
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop.set()
        for thread in self.threads:
            thread.join(30)


def run_jobs(client: InfluenceClient, model, data: Path, out: Path) -> dict[str, dict]:
    """Every job kind naming `model`'s device: register, a 3-shard EK-FAC fit and an identity fit,
    scores with token scores, self-influence, an index and scores against it. Their tensors."""
    dataset = client.register_dataset(model, data, shard_size=8)
    assert dataset.num_shards == 3
    factors = client.fit_factors(model, dataset.name, strategy="ekfac", batch_size=4)
    identity = client.fit_factors(model, dataset.name, strategy="identity")
    results = {
        "scores": client.compute_scores(
            model, factors.name, dataset.name, QUERIES, top_k=3, per_token=True, per_module=True
        ),
        "identity": client.compute_scores(model, identity.name, dataset.name, QUERIES, top_k=3),
        "self": client.compute_self_influence(model, factors.name, dataset.name, top_k=3),
    }
    index = client.build_index(model, factors.name, dataset.name, projection="none", storage_dtype="float32")
    results["index"] = client.compute_scores(model, factors.name, "", QUERIES, index=index.name, top_k=3, rescore=5)
    downloaded = {}
    for name, result in results.items():
        directory = client.download_result(result.name, out / name)
        report = json.loads((directory / "results.json").read_text())
        downloaded[name] = {"tensors": load_file(directory / "scores.safetensors"), "top": report.get("queries")}
    return downloaded


@pytest.mark.needs_servers
def test_a_cuda_job_finishes_through_a_cpu_pool_and_a_gpu_pool(workspace, tmp_path):
    with EmbeddedSystem(workers=0) as system, InfluenceClient(system.target) as client:
        store = system.system.store
        pools = Pools(
            system,
            {
                "cpu-pool": (CPU_KINDS, WorkerContext(store, device="cpu")),
                "gpu-pool": (GPU_KINDS, simulated_gpu_context(store)),
            },
        )
        try:
            cuda = model_spec(workspace / "model", device="cuda")
            split = run_jobs(client, cuda, workspace / "train.jsonl", tmp_path / "split")
        finally:
            pools.stop()
        cpu, gpu = pools.workers["cpu-pool"], pools.workers["gpu-pool"]
        assert not cpu.context.models._entries, "the CPU pool never loads the job's model"
        assert {device for (_, device, _, _) in gpu.context.models._entries} == {"cuda"}

        # the same jobs on one CPU worker taking every kind: the same numbers
        single = Pools(system, {"one": (None, WorkerContext(store, device="cpu"))})
        try:
            cpu_model = model_spec(workspace / "model", device="cpu")
            alone = run_jobs(client, cpu_model, workspace / "train.jsonl", tmp_path / "alone")
        finally:
            single.stop()
    for name, result in split.items():
        assert result["tensors"].keys() == alone[name]["tensors"].keys(), name
        for key, value in result["tensors"].items():
            assert value.equal(alone[name]["tensors"][key]), (name, key)
        assert result["top"] == alone[name]["top"], name  # top-k with token scores


@pytest.mark.needs_servers
def test_a_cuda_job_without_any_gpu_worker_fails_naming_the_cause(workspace, tmp_path):
    """No pool has a GPU: the task naming cuda is refused by every CPU worker (WrongWorkerError,
    never the caller's fault) and, after its deliveries, the operation fails saying why."""
    with EmbeddedSystem(workers=0, lease_seconds=2) as system, InfluenceClient(system.target) as client:
        pools = Pools(system, {"cpu-only": (None, WorkerContext(system.system.store, device="cpu"))})
        try:
            dataset = client.register_dataset(model_spec(workspace / "model"), workspace / "train.jsonl", shard_size=8)
            with pytest.raises(AbortedError) as failure:
                client.fit_factors(model_spec(workspace / "model", device="cuda"), dataset.name, batch_size=4)
        finally:
            pools.stop()
    message = str(failure.value)
    # callers read the refusal's own words (no class name: those stay in the log and the dead letter)
    assert "asks for cuda" in message and "GPU worker" in message and "WrongWorkerError" not in message, message
