"""Shared pieces of the benchmark: the workload, memory sampling, timers and comparisons.

The workload is written once into a work directory and read by every side's subprocess:
    model/          GPT-2 (Conv1D) checkpoint + word-level tokenizer, loadable offline
    data.pt         {"train_ids": [n_train, train_len] int64, "query_ids": [n_q, prompt+completion] int64,
                     "prompt_len": int, "query_sources": [n_q] (training index a query was cut from, or -1)}
    workload.json   the workload's parameters
Token ids are drawn from a Zipf-like law over the vocabulary's words; text is the words joined by
spaces, so the word-level tokenizer turns it back into exactly these ids (checked at build time).
"""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

N_SPECIAL = 4  # <pad>, <unk>, <bos>, <eos> at ids 0..3; word "w{k}" has id k + 4
TRACKED_SUFFIXES = ("mlp.c_fc", "mlp.c_proj")


@dataclass
class Workload:
    n_train: int = 1000
    train_len: int = 128
    n_queries: int = 16
    prompt_len: int = 64
    completion_len: int = 16
    vocab_size: int = 5000
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 128
    zipf_exponent: float = 1.0
    seed: int = 0

    def tracked_modules(self) -> list[str]:
        return [f"transformer.h.{layer}.{suffix}" for layer in range(self.n_layer) for suffix in TRACKED_SUFFIXES]


def word(token_id: int) -> str:
    return f"w{token_id - N_SPECIAL}"


def ids_to_text(ids) -> str:
    return " ".join(word(int(i)) for i in ids)


def zipf_ids(generator: torch.Generator, shape: tuple[int, ...], vocab_size: int, exponent: float) -> torch.Tensor:
    """Word ids (>= N_SPECIAL) with p(rank k) ∝ 1 / (k + 2.7)^exponent; ranks map to a fixed random permutation."""
    n_words = vocab_size - N_SPECIAL
    ranks = torch.arange(n_words, dtype=torch.float64)
    probabilities = (ranks + 2.7).pow(-exponent)
    permutation = torch.randperm(n_words, generator=generator)
    draws = torch.multinomial(probabilities, int(torch.tensor(shape).prod()), replacement=True, generator=generator)
    return (permutation[draws] + N_SPECIAL).reshape(shape).to(torch.int64)


def build_workload(work: Path, workload: Workload) -> None:
    """Write model/, data.pt and workload.json into `work` (skipped when the same workload is there)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from services.toy.tokenizer import build_word_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    marker = work / "workload.json"
    if marker.is_file() and json.loads(marker.read_text()) == asdict(workload) and (work / "data.pt").is_file():
        return
    if workload.prompt_len + workload.completion_len > workload.n_positions:
        raise SystemExit("prompt + completion longer than the model's n_positions")
    if workload.train_len > workload.n_positions:
        raise SystemExit("training sequences longer than the model's n_positions")

    words = [f"w{k}" for k in range(workload.vocab_size - N_SPECIAL)]
    tokenizer = build_word_tokenizer(words)
    assert len(tokenizer) == workload.vocab_size, (len(tokenizer), workload.vocab_size)

    config = GPT2Config(
        vocab_size=workload.vocab_size,
        n_positions=workload.n_positions,
        n_embd=workload.n_embd,
        n_layer=workload.n_layer,
        n_head=workload.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(workload.seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    model_dir = work / "model"
    model.save_pretrained(str(model_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(model_dir))

    generator = torch.Generator().manual_seed(workload.seed + 1)
    train_ids = zipf_ids(generator, (workload.n_train, workload.train_len), workload.vocab_size, workload.zipf_exponent)
    query_len = workload.prompt_len + workload.completion_len
    query_ids = zipf_ids(generator, (workload.n_queries, query_len), workload.vocab_size, workload.zipf_exponent)
    # Half of the queries are cut from training sequences (a known, strongly influential source);
    # the other half are fresh draws.
    sources = torch.full((workload.n_queries,), -1, dtype=torch.int64)
    for q in range(0, workload.n_queries, 2):
        source = (q * 61 + 7) % workload.n_train
        if workload.train_len >= query_len:
            query_ids[q] = train_ids[source, :query_len]
            sources[q] = source
    for row in list(train_ids[:3]) + list(query_ids[:3]):  # text round-trips to the same ids
        assert tokenizer(ids_to_text(row))["input_ids"] == row.tolist()
    torch.save(
        {"train_ids": train_ids, "query_ids": query_ids, "prompt_len": workload.prompt_len, "query_sources": sources},
        work / "data.pt",
    )
    marker.write_text(json.dumps(asdict(workload), indent=1))


def load_workload(work: Path) -> tuple[Workload, dict]:
    workload = Workload(**json.loads((work / "workload.json").read_text()))
    return workload, torch.load(work / "data.pt")


# ------------------------------------------------------------------------------------------------
# Memory and time


def rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far: VmHWM, its address space's high-water mark.
    Not ru_maxrss: Linux carries that across exec, so a process started from a large parent
    reports the parent's size."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Samples RSS every `interval` s in a thread, so each stage gets its own peak."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self._peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_mib())

    def reset(self) -> float:
        """Start a new stage; returns the RSS at its start."""
        self._peak = rss_mib()
        return self._peak

    def peak(self) -> float:
        self._peak = max(self._peak, rss_mib())
        return self._peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Stage:
    """`with Stage(record, "fit", sampler):` stores seconds, start RSS and peak RSS under record[name]."""

    def __init__(self, record: dict, name: str, sampler: RssSampler):
        self.record, self.name, self.sampler = record, name, sampler

    def __enter__(self):
        self.start_rss = self.sampler.reset()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.record[self.name] = {
            "seconds": time.perf_counter() - self.start,
            "rss_start_mib": self.start_rss,
            "rss_peak_mib": self.sampler.peak(),
        }


def thread_info() -> dict:
    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__}


# ------------------------------------------------------------------------------------------------
# Comparisons


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()).clamp_min(1e-300))


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    def ranks(v):
        v = v.double().flatten()
        r = torch.empty_like(v)
        r[v.argsort()] = torch.arange(v.numel(), dtype=torch.float64)
        return r

    return pearson(ranks(x), ranks(y))


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """‖estimate − reference‖_F / ‖reference‖_F."""
    estimate, reference = estimate.double(), reference.double()
    return float((estimate - reference).norm() / reference.norm().clamp_min(1e-300))


def score_agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Pearson overall and per query, Spearman, and how often each query's top-1 / top-10 agree."""
    per_query = [pearson(a[q], b[q]) for q in range(a.shape[0])]
    top1 = float((a.argmax(1) == b.argmax(1)).double().mean())
    k = min(10, a.shape[1])
    overlap = [
        len(set(a[q].topk(k).indices.tolist()) & set(b[q].topk(k).indices.tolist())) / k for q in range(a.shape[0])
    ]
    return {
        "pearson": pearson(a, b),
        "pearson_per_query_min": min(per_query),
        "pearson_per_query_mean": sum(per_query) / len(per_query),
        "spearman": spearman(a, b),
        "top1_agreement": top1,
        "top10_overlap": sum(overlap) / len(overlap),
        "relative_error": relative_error(a, b),
    }


def ekfac_apply(factors: dict, v: torch.Tensor, damping_factor: float = 0.1) -> torch.Tensor:
    """(Q_S ⊗ Q_A) (Λ + λ)⁻¹ (Q_S ⊗ Q_A)ᵀ applied to matrices v [k, d_out, d_in], λ = factor × mean Λ."""
    q_s, q_a, lam = (factors[key].double() for key in ("gradient_eigenvectors", "activation_eigenvectors", "lambda"))
    damping = damping_factor * lam.mean()
    rotated = q_s.T @ v.double() @ q_a
    return q_s @ (rotated / (lam + damping)) @ q_a.T
