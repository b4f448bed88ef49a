"""Every pass of an operation shows in the CLI's progress, even one that begins and ends between two
polls: the operation's metadata carries its step history (OperationMetadata.steps, kept by the
operation record as tasks report), and the bars (or log lines, or --json events) show the steps
no poll saw running, complete, in the order they ran."""

from __future__ import annotations

import io
import json

import pytest

from services.cli import main
from services.cli.progress import JsonProgress, StageBars
from services.gen.influence.v1 import common_pb2
from services.toy.models import build_tiny_model, save_model_dir
from services.toy.tokenizer import build_word_tokenizer

WORDS = [f"w{i}" for i in range(20)]


def _step(stage: str, step: str, done: int, total: int, unit: str = "batch") -> common_pb2.StepProgress:
    return common_pb2.StepProgress(stage=stage, step=step, done=done, total=total, unit=unit)


def test_steps_between_two_polls_get_their_line_in_the_order_they_ran():
    """Polls saw the covariance pass running, then the operation done: the eigendecomposition and
    the correction pass ran between them, and are shown from the step history before it ends."""
    covariance = _step("fit_one_shard", "covariance", 3, 3)
    history = [
        covariance,
        _step("fit_one_shard", "eigendecomposition", 4, 4, "module"),
        _step("fit_one_shard", "correction", 3, 3),
    ]
    polls = [
        common_pb2.OperationMetadata(
            stage="fit_one_shard", shards_total=1, step="covariance", step_done=1, step_total=3, steps=[covariance]
        ),
        common_pb2.OperationMetadata(stage="done", shards_done=1, shards_total=1, steps=history),
    ]
    log = io.StringIO()
    with StageBars(True, log) as bars:
        for poll in polls:
            bars(poll)
    lines = [line.strip() for line in log.getvalue().splitlines()]
    assert [line.split(":")[0] for line in lines] == ["covariance", "eigendecomposition", "correction"], lines
    assert lines[1] == "eigendecomposition: 4/4 modules between two polls"
    assert lines[2] == "correction: 3/3 batches between two polls"

    events = io.StringIO()
    with JsonProgress(True, events) as progress:
        for poll in polls:
            progress(poll)
    phases = [json.loads(line)["phase"] for line in events.getvalue().splitlines()]
    assert phases == ["covariance", "eigendecomposition", "correction", "done"]


def test_a_stage_over_shards_covers_its_steps():
    """A stage run over shards is shown by its name: its tasks' steps are not shown again."""
    log = io.StringIO()
    steps = [_step("covariance", "covariance", 9, 9)]
    with StageBars(True, log) as bars:
        bars(common_pb2.OperationMetadata(stage="covariance", shards_total=4, steps=steps))
        bars(common_pb2.OperationMetadata(stage="done", shards_done=4, shards_total=4, steps=steps))
    assert [line.split(":")[0].strip() for line in log.getvalue().splitlines()] == ["covariance"]


@pytest.mark.needs_servers
def test_a_fit_logs_every_pass_through_the_real_progress_path(tmp_path, capsys):
    """`influence fit` (the embedded system, its operation polled every 0.5 s) on a tiny one-shard
    fit whose passes take milliseconds: every pass has its line, in order, each once."""
    tokenizer = build_word_tokenizer(WORDS)
    save_model_dir(build_tiny_model("gpt2", len(tokenizer), n_layer=1, d_model=8, seed=0), tokenizer, tmp_path / "m")
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"w{i} w{(i * 7) % 20} w{(i * 3) % 20}"}) + "\n" for i in range(6))
    )
    args = [
        "fit",
        "--model",
        str(tmp_path / "m"),
        "--data",
        str(tmp_path / "train.jsonl"),
        "--out",
        str(tmp_path / "f"),
    ]
    assert main(args) == 0
    names = [line.split(":")[0].strip() for line in capsys.readouterr().err.splitlines() if ": " in line]
    passes = [name for name in names if name in ("covariance", "eigendecomposition", "correction")]
    assert passes == ["covariance", "eigendecomposition", "correction"], names
