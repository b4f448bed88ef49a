"""The demo's model: trained in a child process with pinned numerics (bit-reproducible), with
length-bucketed batches, and a progress bar that stays out of logs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch

from services.toy.corpus import GENERATOR_VERSION
from services.toy.demo_data import STAMP_NAME, _cached, _content_hash, demo_paths
from services.toy.models import build_tiny_model
from services.toy.recipe import RECIPES, DemoSettings, build_corpus, train_and_save
from services.toy.tokenizer import build_word_tokenizer
from services.toy.train import TrainConfig, epoch_batches, train_causal_lm
from services.toy.train_demo import PINNED_ENV, child_environment
from services.toy.train_demo import main as train_demo_main

TINY = DemoSettings(
    num_entities=6,
    num_queries=3,
    num_filler_sequences=5,
    n_layer=1,
    d_model=16,
    n_head=2,
    epochs=2,
    batch_size=8,
)


@pytest.mark.slow  # two child processes, each importing torch and transformers: 15-46 s on a busy 2-core host
def test_the_pinned_training_child_gives_the_same_weight_bytes_whatever_the_parent_environment(tmp_path):
    """Two training children, started together: one from a plain environment, one whose parent asks
    for 2 threads, AVX2 ATen kernels and MKL's AVX code path. The pins override all of it, and the
    saved weights are the same bytes."""
    settings = json.dumps(asdict(TINY))
    noisy_parent = {"OMP_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX"}
    children = []
    for name, extra in (("plain", {}), ("noisy", noisy_parent)):
        env = child_environment("pinned", {**os.environ, **extra})
        command = [sys.executable, "-m", "services.toy.train_demo", str(tmp_path / name), "--settings", settings]
        children.append(
            subprocess.Popen([*command, "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    reports = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    digests = [
        hashlib.sha256((tmp_path / name / "model" / "model.safetensors").read_bytes()).hexdigest()
        for name in ("plain", "noisy")
    ]
    assert digests[0] == digests[1]
    for report in reports:
        assert report["numerics"] == {
            "mode": "pinned",
            "aten_cpu_capability": "DEFAULT",
            "threads": 1,
            "mkl_cbwr_branch": 3,  # MKL_CBWR_COMPATIBLE
        }
    assert PINNED_ENV["MKL_CBWR"] == "COMPATIBLE"


def test_the_child_refuses_to_train_when_the_numerics_cannot_be_pinned(tmp_path):
    """The pins must be in the environment before torch loads; in a process that already imported
    torch (this one) the child's entry point refuses instead of training unpinned."""
    with pytest.raises(SystemExit, match="torch was imported before the numerics could be pinned"):
        train_demo_main([str(tmp_path), "--settings", "{}"])
    assert not (tmp_path / "model").exists()


def test_epoch_batches_cover_every_sequence_once_and_pad_little():
    lengths = [3, 40, 5, 38, 4, 41, 6, 39] * 8  # 64 sequences, short and long interleaved
    generator = torch.Generator().manual_seed(0)
    batches = epoch_batches(lengths, 8, 8, generator)
    assert len(batches) == 8 and sorted(i for batch in batches for i in batch) == list(range(64))
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    assert padded == sum(sorted(lengths)[k + 7] * 8 for k in range(0, 64, 8))  # one pool: sorted batches
    again = epoch_batches(lengths, 8, 8, torch.Generator().manual_seed(0))
    assert again == batches


def test_training_progress_writes_no_carriage_returns_when_stderr_is_not_a_terminal(tmp_path, capsys):
    """Under a log (stderr captured, not a TTY) the tqdm bar is off: no stream of '\\r' updates, and
    the demo prints one summary line."""
    corpus = build_corpus(TINY, 0)
    report = train_and_save(corpus, TINY, 0, tmp_path / "model", progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line for line in err.splitlines() if line.strip()] == [
        line for line in err.splitlines() if line.startswith("demo model trained")
    ]
    assert len(err.splitlines()) == 1
    # the report and the line agree with the per-query outcomes, one for each of the corpus' queries
    per_query = report["per_query"]
    assert sorted(per_query) == sorted(query.id for query in corpus.queries)
    correct = sum(outcome["correct"] for outcome in per_query.values())
    assert report["query_accuracy"] == correct / TINY.num_queries
    mean_logprob = sum(outcome["logprob"] for outcome in per_query.values()) / TINY.num_queries
    assert report["query_mean_logprob"] == pytest.approx(mean_logprob, abs=1e-3) and mean_logprob < 0
    assert f": {correct}/{TINY.num_queries} query completions predicted, mean log-prob " in err

    tokenizer = build_word_tokenizer(["a", "b", "c"])
    model = build_tiny_model("gpt2", len(tokenizer), n_layer=1, d_model=8, n_head=2)
    losses = train_causal_lm(model, tokenizer, ["a b c", "c b a", "a a b"], TrainConfig(epochs=3, batch_size=2))
    assert len(losses) == 3 and "\r" not in capsys.readouterr().err


@pytest.mark.slow  # three trainings of the tiny demo: a few seconds on an idle host, a minute on a busy one
def test_training_on_a_subset_keeps_the_recipe_and_saves_nothing(tmp_path):
    """bench/lds retrains on subsets: keeping every sequence is the full training (same log-probs,
    unrounded in `query_logprobs`), keeping half changes them, and no model directory is written."""
    corpus = build_corpus(TINY, 0)
    full = train_and_save(corpus, TINY, 0, tmp_path / "model", progress=False)
    everything = train_and_save(corpus, TINY, 0, None, progress=False, keep=range(len(corpus.training)))
    half = train_and_save(corpus, TINY, 0, None, progress=False, keep=range(0, len(corpus.training), 2))
    assert everything["query_logprobs"] == full["query_logprobs"]
    assert [round(value, 4) for value in full["query_logprobs"]] == [q["logprob"] for q in full["per_query"].values()]
    assert half["query_logprobs"] != full["query_logprobs"] and len(half["query_logprobs"]) == TINY.num_queries
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_the_toy_llama_recipes_are_bench_index_workload_with_completed_queries():
    """RECIPES["toy-llama"] is bench/bench_index.py's toy Llama (~1,150 sequences, 48 planted-fact
    queries, each a prompt and its answer as the completion, with the sequences stating it), and
    "small-llama" (bench/lds's second model) its widths on a smaller corpus."""
    recipe = RECIPES["toy-llama"]
    corpus = build_corpus(recipe, 0)
    assert len(corpus.training) == 1152 and len(corpus.queries) == 48
    assert all(q.prompt.endswith("a :") and q.completion and len(q.expected_ids) == 4 for q in corpus.queries)
    small = RECIPES["small-llama"]
    assert (small.architecture, small.d_model, small.d_ff, small.n_layer) == ("llama", 64, 256, 4)
    assert len(build_corpus(small, 0).training) == 652 and len(build_corpus(small, 0).queries) == 48


@pytest.mark.slow  # a tiny Llama trained in-process: ~4 s of CPU, more on a busy host
def test_the_recipe_trains_the_architecture_it_names(tmp_path):
    """A Llama recipe trains a Llama of the settings' shape (d_ff included), as bench/lds retrains it."""
    tiny = replace(TINY, architecture="llama", d_ff=24)
    report = train_and_save(build_corpus(tiny, 0), tiny, 0, tmp_path / "model", progress=False)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["intermediate_size"] == 24 and config["hidden_size"] == 16
    assert len(report["query_logprobs"]) == tiny.num_queries and all(v < 0 for v in report["query_logprobs"])


def test_a_demo_directory_stamped_before_the_architecture_fields_is_still_reused(tmp_path):
    """A stamp written before DemoSettings had `architecture` and `d_ff` names the demo's GPT-2: the
    cache (and bench/lds's manifest check) reads it with those fields at their defaults."""
    paths = demo_paths(tmp_path)
    for path in (paths.train_jsonl, paths.queries_jsonl, paths.expected_json):
        path.write_text("{}\n")
    paths.model_dir.mkdir()
    (paths.model_dir / "config.json").write_text("{}")
    old_settings = {k: v for k, v in asdict(DemoSettings()).items() if k not in ("architecture", "d_ff")}
    wanted = {"version": GENERATOR_VERSION, "seed": 0, "settings": asdict(DemoSettings()), "numerics": "pinned-1"}
    stamp = {**wanted, "settings": old_settings, "content_sha256": _content_hash(paths)}
    (tmp_path / STAMP_NAME).write_text(json.dumps(stamp))
    assert _cached(tmp_path, paths, wanted)
    assert not _cached(tmp_path, paths, {**wanted, "settings": asdict(RECIPES["toy-llama"])})
    (tmp_path / STAMP_NAME).write_text(json.dumps({**stamp, "settings": {**old_settings, "unknown": 1}}))
    assert not _cached(tmp_path, paths, wanted)
