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
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .corpus import GENERATOR_VERSION, Corpus
from .recipe import DemoSettings, build_corpus
from .train_demo import NUMERICS_VERSION, train_in_child

STAMP_NAME = "demo.json"


@dataclass(frozen=True)
class DemoPaths:
    model_dir: Path
    train_jsonl: Path
    queries_jsonl: Path
    expected_json: Path


def demo_paths(work_dir: Path) -> DemoPaths:
    return DemoPaths(
        work_dir / "model", work_dir / "TRAIN.jsonl", work_dir / "QUERIES.jsonl", work_dir / "EXPECTED.json"
    )


def prepare_demo(
    work_dir: Path,
    *,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    numerics: str = "pinned",
    **settings,
) -> DemoPaths:
    """Write the demo corpus and train its model into `work_dir`, unless a matching build is there.

    Keyword `settings` override `DemoSettings` fields (e.g. smaller sizes for tests). The model is
    trained in a child process with pinned numerics (`train_demo`; `numerics="inherit"` leaves the
    child's kernels to the environment, for measuring what pinning changes). Training progress
    (a tqdm bar, only on a terminal) and a one-line accuracy summary go to stderr when `progress`.
    """
    work_dir = Path(work_dir)
    config = DemoSettings(**settings)
    paths = demo_paths(work_dir)
    wanted = {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "settings": asdict(config),
        "numerics": f"{numerics}-{NUMERICS_VERSION}",
    }
    if not force and _cached(work_dir, paths, wanted):
        return paths

    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / STAMP_NAME).unlink(missing_ok=True)
    _write_corpus(build_corpus(config, seed), paths)
    if paths.model_dir.exists():
        shutil.rmtree(paths.model_dir)
    report = train_in_child(work_dir, seed=seed, settings=asdict(config), progress=progress, numerics=numerics)
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
    if not isinstance(stamp, dict):
        return False
    if any(stamp.get(key) != value for key, value in wanted.items() if key != "settings"):
        return False
    try:  # compared as settings: a stamp written before a field existed has that field's default
        if DemoSettings(**stamp.get("settings", {})) != DemoSettings(**wanted["settings"]):
            return False
    except TypeError:  # a field this version does not know
        return False
    if not paths.model_dir.is_dir():
        return False
    try:
        return stamp.get("content_sha256") == _content_hash(paths)
    except OSError:
        return False
