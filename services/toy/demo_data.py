"""Build (or reuse) the demo's inputs: planted-facts corpus, queries, and a tiny GPT-2 trained on it.

Layout of `work_dir`:
    TRAIN.jsonl     {"id": "train-00042", "text": ...} per line
    QUERIES.jsonl   {"id": "query-007", "prompt": ..., "completion": ...} per line
    EXPECTED.json   query id -> ids of the training sequences stating the queried fact
    model/          model (safetensors) + tokenizer, loadable with from_pretrained
    demo.json       stamp written last: generator version, settings, content hash, training report
A finished directory with a matching stamp is reused as is.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .corpus import GENERATOR_VERSION, Corpus, generate_corpus
from .models import build_tiny_model, save_model_dir
from .tokenizer import build_word_tokenizer
from .train import TrainConfig, score_completions, train_causal_lm

STAMP_NAME = "demo.json"


@dataclass(frozen=True)
class DemoPaths:
    model_dir: Path
    train_jsonl: Path
    queries_jsonl: Path
    expected_json: Path


@dataclass(frozen=True)
class DemoSettings:
    """Corpus size and model/training size; the defaults train in ~50 s on 2 CPU cores."""

    num_entities: int = 40
    num_queries: int = 24
    num_filler_sequences: int = 100
    max_extra_sentences: int = 1
    n_layer: int = 2
    d_model: int = 96
    n_head: int = 4
    epochs: int = 100
    batch_size: int = 16
    learning_rate: float = 3e-3


def demo_paths(work_dir: Path) -> DemoPaths:
    return DemoPaths(
        work_dir / "model", work_dir / "TRAIN.jsonl", work_dir / "QUERIES.jsonl", work_dir / "EXPECTED.json"
    )


def prepare_demo(work_dir: Path, *, seed: int = 0, force: bool = False, progress: bool = True, **settings) -> DemoPaths:
    """Write the demo corpus and train its model into `work_dir`, unless a matching build is there.

    Keyword `settings` override `DemoSettings` fields (e.g. smaller sizes for tests). Training
    progress (tqdm) and a one-line accuracy summary go to stderr when `progress` is set.
    """
    work_dir = Path(work_dir)
    config = DemoSettings(**settings)
    paths = demo_paths(work_dir)
    wanted = {"version": GENERATOR_VERSION, "seed": seed, "settings": asdict(config)}
    if not force and _cached(work_dir, paths, wanted):
        return paths

    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / STAMP_NAME).unlink(missing_ok=True)
    corpus = generate_corpus(
        seed,
        num_entities=config.num_entities,
        num_queries=config.num_queries,
        num_filler_sequences=config.num_filler_sequences,
        extra_sentences=(0, config.max_extra_sentences),
    )
    _write_corpus(corpus, paths)
    report = _train_and_save(corpus, config, seed, paths.model_dir, progress)
    stamp = {**wanted, "content_sha256": _content_hash(paths), "training": report}
    (work_dir / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
    return paths


def _write_corpus(corpus: Corpus, paths: DemoPaths) -> None:
    with paths.train_jsonl.open("w", encoding="utf-8") as handle:
        for sequence in corpus.training:
            handle.write(json.dumps({"id": sequence.id, "text": sequence.text}) + "\n")
    with paths.queries_jsonl.open("w", encoding="utf-8") as handle:
        for query in corpus.queries:
            handle.write(json.dumps({"id": query.id, "prompt": query.prompt, "completion": query.completion}) + "\n")
    paths.expected_json.write_text(json.dumps(corpus.expected(), indent=2) + "\n")


def _train_and_save(corpus: Corpus, config: DemoSettings, seed: int, model_dir: Path, progress: bool) -> dict:
    """Train a GPT-2 on the corpus, save it with its tokenizer; returns time (s) and query accuracy."""
    tokenizer = build_word_tokenizer(corpus.vocabulary())
    longest = max(len(tokenizer(s.text)["input_ids"]) for s in corpus.training)
    model = build_tiny_model(
        "gpt2",
        len(tokenizer),
        n_layer=config.n_layer,
        d_model=config.d_model,
        n_head=config.n_head,
        max_positions=max(64, 2 * longest),
        seed=seed,
    )
    train_config = TrainConfig(
        epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate, seed=seed
    )
    started = time.perf_counter()
    losses = train_causal_lm(model, tokenizer, [s.text for s in corpus.training], train_config, progress=progress)
    seconds = time.perf_counter() - started
    scores = score_completions(model, tokenizer, [(q.prompt, q.completion) for q in corpus.queries])
    save_model_dir(model, tokenizer, model_dir)
    report = {
        "seconds": round(seconds, 1),
        "final_loss": round(losses[-1], 4),
        "query_accuracy": sum(s.correct for s in scores) / len(scores),
        "query_mean_logprob": round(sum(s.logprob for s in scores) / len(scores), 4),
        "per_query": {
            q.id: {"logprob": round(s.logprob, 4), "correct": s.correct}
            for q, s in zip(corpus.queries, scores, strict=True)
        },
    }
    if progress:
        print(
            f"demo model trained in {seconds:.0f} s: {sum(s.correct for s in scores)}/{len(scores)} query "
            f"completions predicted, mean log-prob {report['query_mean_logprob']:.2f} nats",
            file=sys.stderr,
        )
    return report


def _content_hash(paths: DemoPaths) -> str:
    """sha256 over the corpus files and every file of the model directory (names and bytes)."""
    digest = hashlib.sha256()
    files = [paths.train_jsonl, paths.queries_jsonl, paths.expected_json, *sorted(paths.model_dir.iterdir())]
    for path in files:
        if path.is_file():
            digest.update(path.name.encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _cached(work_dir: Path, paths: DemoPaths, wanted: dict) -> bool:
    """True when `work_dir` holds a finished build with the wanted version/seed/settings, intact."""
    try:
        stamp = json.loads((work_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(stamp, dict) or any(stamp.get(key) != value for key, value in wanted.items()):
        return False
    if not paths.model_dir.is_dir():
        return False
    try:
        return stamp.get("content_sha256") == _content_hash(paths)
    except OSError:
        return False
