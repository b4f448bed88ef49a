"""The device check (bench/gpu_check.sh) runs here, on the CPU at toy sizes (`--dry-run`), so the
script a lent GPU machine runs cannot rot: every stage prints one JSON line and passes. The numbers
that matter come only from a GPU (BENCHMARKS.md says whether it has run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import ROOT

STAGES = ["environment", "exactness", "precision", "smollm2", "llama_4096", "fed", "service", "summary"]


@pytest.mark.slow
def test_the_device_check_runs_every_stage_on_the_cpu():
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHON": sys.executable},
    )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["stage"] for line in lines] == STAGES, result.stderr[-3000:]
    failed = {line["stage"]: line for line in lines if line["ok"] is not True}
    assert not failed, failed
    assert result.returncode == 0
    by_stage = {line["stage"]: line for line in lines}
    assert by_stage["exactness"]["relative_error"]["empirical"]["scores"] <= 1e-9
    assert by_stage["environment"]["tf32_inside_the_engine"]["matmul_tf32"] is False
    assert by_stage["service"]["shards"] > 1 and by_stage["service"]["token_scores"]
    assert set(by_stage["precision"]["spearman"]) == {"float32", "bfloat16"}
    assert by_stage["fed"]["groups"]["count"] > 1 and by_stage["fed"]["groups"]["identical_factor_files"]
    for stage in ("smollm2", "llama_4096"):
        assert by_stage[stage]["seconds"] and by_stage[stage]["tokens"] > 0, by_stage[stage]


def test_stages_are_chosen_and_the_script_says_what_it_skips():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_check.py"),
            "--dry-run",
            "--stages",
            "environment",
            "--budget-seconds",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["stage"] for line in lines] == ["environment", "summary"]
    assert lines[0]["ok"] is None and "budget" in lines[0]["skipped"]
    assert lines[1]["ok"] is False and result.returncode == 1  # nothing ran: no verdict to trust
