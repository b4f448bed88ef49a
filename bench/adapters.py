"""A LoRA adapter model beside its dense base on the demo's toy corpus: `influence fit` and
`influence score` (embedded system, in this process), wall and CPU time of each.

The toy corpus is the demo's (services/toy: planted facts, 260 training sequences, 24 queries);
the base is a random-init Llama of the demo model's size (2 layers, d_model 96) with the corpus'
word tokenizer; the adapter is a rank-8 LoRA on q_proj, v_proj, up_proj and down_proj (random A
and B, as after fine-tuning). Rows: the base with its default `mlp` modules, the adapter with its
default (`adapter`: every LoRA matrix). No training: timings do not depend on the weights' values.

    nice -n 19 /work/main/.venv/bin/python bench/adapters.py --work-dir .cache/bench-adapters [--rank 8]
        [--sequences N] [--queries Q]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LoraConfig, get_peft_model

from services.cli import main as influence
from services.toy.models import build_tiny_model, save_model_dir
from services.toy.recipe import DemoSettings, build_corpus
from services.toy.tokenizer import build_word_tokenizer


def _write_inputs(work: Path, rank: int, sequences: int, queries: int) -> tuple[Path, Path, Path, Path]:
    settings = DemoSettings()
    corpus = build_corpus(settings, seed=0)
    train, asked = work / "TRAIN.jsonl", work / "QUERIES.jsonl"
    train.write_text("".join(json.dumps({"id": s.id, "text": s.text}) + "\n" for s in corpus.training[:sequences]))
    asked.write_text(
        "".join(
            json.dumps({"id": q.id, "prompt": q.prompt, "completion": q.completion}) + "\n"
            for q in corpus.queries[:queries]
        )
    )
    tokenizer = build_word_tokenizer(corpus.vocabulary())
    base = build_tiny_model(
        "llama", len(tokenizer), n_layer=settings.n_layer, d_model=settings.d_model, n_head=settings.n_head
    )
    base_dir = save_model_dir(base, tokenizer, work / "base")
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    base = type(base).from_pretrained(base_dir, dtype=torch.float32)  # its config names the directory
    adapted = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if ".lora_" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    adapted.save_pretrained(work / "adapter")
    return train, asked, base_dir, work / "adapter"


def _timed(args: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one command: the embedded system's workers are threads of this
    process, so its CPU time is the work done, whatever else the machine runs."""
    wall, cpu = time.perf_counter(), time.process_time()
    if influence([*args, "--quiet"]) != 0:
        raise SystemExit(f"influence {' '.join(args)} failed")
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/bench-adapters"))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=None, help="the corpus' first N training sequences")
    parser.add_argument("--queries", type=int, default=None, help="its first N queries")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    train, queries, base, adapter = _write_inputs(args.work_dir, args.rank, args.sequences, args.queries)
    n_train, n_queries = (len(path.read_text().splitlines()) for path in (train, queries))
    rows = []
    for label, model in (("dense base (mlp)", base), (f"LoRA r={args.rank} (adapter)", adapter)):
        out = args.work_dir / label.split()[0]
        fit = _timed(["fit", "--model", str(model), "--data", str(train), "--out", str(out / "factors")])
        manifest = json.loads((out / "factors" / "manifest.json").read_text())["metadata"]
        modules = manifest["modules"]
        parameters = sum(m["d_out"] * (m["d_in"] + int(m.get("has_bias", False))) for m in modules.values())
        factors, scores = ["--factors", str(out / "factors")], ["--out", str(out / "scores")]
        score = _timed(
            ["score", "--model", str(model), "--data", str(train), "--queries", str(queries), *factors, *scores]
        )
        rows.append((label, len(modules), parameters, fit, score))
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, python {sys.version.split()[0]}"
    )
    print(f"{n_train} training sequences, {n_queries} queries")
    print("| model | tracked modules | tracked parameters | fit wall / CPU (s) | score wall / CPU (s) |")
    print("|---|---|---|---|---|")
    for label, count, parameters, fit, score in rows:
        print(f"| {label} | {count} | {parameters:,} | {fit[0]:.1f} / {fit[1]:.1f} | {score[0]:.1f} / {score[1]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
