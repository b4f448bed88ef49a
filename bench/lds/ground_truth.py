"""Ground truth for the linear datamodeling score (LDS): a toy model retrained on random halves.

    nice -n 19 .venv/bin/python bench/lds/ground_truth.py [--recipe demo|toy-llama|toy-gpt2] [--subsets 50]
                                                          [--workers 2] [--seed 0] [--out DIR]

The model is one of services.toy.recipe.RECIPES (`--recipe`, default the demo; `toy-llama` is
bench/bench_index.py's toy Llama), trained by its recipe in the repo. For subset s = 0..S-1 it
draws a seeded random half of the model's training sequences (`subset_positions`: pure Python,
the same on every machine), retrains the model on just those with the same recipe
(`services.toy.train_demo --keep`: the same seed, tokenizer, model shape and training settings,
pinned numerics, so one run per subset is the answer) and records each query's completion
log-probability (nats, summed over the completion tokens). One file per subset,
`subset-NNN.json`, written when its training ends: a run that stops is resumed by running it
again (finished subsets are skipped). `manifest.json` names the corpus (recipe, seed, settings,
the training and query ids) so `evaluate.py` can check that scores and ground truth belong
together.

The model's directory (corpus, queries with their completions, EXPECTED.json, the full model) is
`prepare_demo`'s, cached under DIR/demo; DIR defaults to bench/out/lds/RECIPE-seedSEED.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from metrics import DEFAULT_TRUTH  # noqa: E402

from services.engine.records import read_queries_jsonl, read_training_jsonl  # noqa: E402
from services.toy.demo_data import prepare_demo  # noqa: E402
from services.toy.recipe import RECIPES, DemoSettings  # noqa: E402
from services.toy.train_demo import train_in_child  # noqa: E402


def subset_positions(subset: int, n_train: int, fraction: float = 0.5) -> list[int]:
    """The training positions (sorted) of random subset `subset`: round(fraction * n_train) of them."""
    chooser = random.Random(f"lds-subset-{subset}")
    return sorted(chooser.sample(range(n_train), round(fraction * n_train)))


def same_corpus(written: dict, wanted: dict) -> bool:
    """Whether a manifest on disk describes the wanted one: settings compared as DemoSettings (a
    manifest written before a field existed has its default), the rest as written."""
    plain = {key: value for key, value in written.items() if key != "settings"}
    try:
        settings = DemoSettings(**written.get("settings", {}))
    except TypeError:
        return False
    return plain == {k: v for k, v in wanted.items() if k != "settings"} and settings == DemoSettings(
        **wanted["settings"]
    )


def build(
    out: Path, subsets: int, workers: int, seed: int, settings: dict, fraction: float, model: str = "demo"
) -> None:
    """Retrain `subsets` halves of the model `settings` describe (DemoSettings fields; `model` its
    name in the manifest) into `out`, skipping those already there."""
    paths = prepare_demo(out / "demo", seed=seed, progress=False, **settings)
    training = read_training_jsonl(paths.train_jsonl)
    queries = read_queries_jsonl(paths.queries_jsonl)
    manifest = {
        "model": model,
        "seed": seed,
        "settings": asdict(DemoSettings(**settings)),
        "fraction": fraction,
        "training_ids": [example.id for example in training],
        "query_ids": [query.id for query in queries],
    }
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not same_corpus(json.loads(manifest_path.read_text()), manifest):
        raise SystemExit(f"{manifest_path} describes another corpus; use another --out")
    if not manifest_path.exists():
        manifest_path.write_text(json.dumps(manifest) + "\n")

    todo = [s for s in range(subsets) if not (out / f"subset-{s:03d}.json").exists()]
    print(f"{subsets - len(todo)} of {subsets} subsets done; training {len(todo)} with {workers} workers", flush=True)

    def one(subset: int) -> None:
        keep = subset_positions(subset, len(training), fraction)
        started = time.perf_counter()
        report = train_in_child(out / "scratch", seed=seed, settings=manifest["settings"], progress=False, keep=keep)
        record = {
            "subset": subset,
            "keep": keep,
            "query_logprobs": report["query_logprobs"],
            "final_loss": report["final_loss"],
            "seconds": round(time.perf_counter() - started, 1),
        }
        temporary = out / f".subset-{subset:03d}.json.tmp"
        temporary.write_text(json.dumps(record) + "\n")
        temporary.replace(out / f"subset-{subset:03d}.json")  # whole or absent
        print(f"subset {subset:3d}: {record['seconds']} s, final loss {record['final_loss']}", flush=True)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(one, todo))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="demo", help="the model (services.toy.recipe)")
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2, help="trainings at once (each uses one thread)")
    parser.add_argument("--seed", type=int, default=0, help="the recipe's seed (corpus and model)")
    parser.add_argument("--settings", default="{}", help="DemoSettings overrides of the recipe as JSON")
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--out", type=Path, help="default: bench/out/lds/RECIPE-seedSEED")
    args = parser.parse_args()
    out = args.out or DEFAULT_TRUTH.parent / f"{args.recipe}-seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    settings = asdict(replace(RECIPES[args.recipe], **json.loads(args.settings)))
    build(out, args.subsets, args.workers, args.seed, settings, args.fraction, model=args.recipe)


if __name__ == "__main__":
    main()
