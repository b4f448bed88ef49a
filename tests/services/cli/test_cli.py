"""The `influence` command line as a public contract: output files, equality with the engine,
progress bars, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.catalog.factor_sets import load_factors
from services.cli import main
from services.cli.progress import Phase, StageBars, phase_of
from services.engine.model_io import load_model_and_tokenizer
from services.engine.records import read_queries_jsonl, read_training_jsonl
from services.engine.score import ScoreConfig, compute_scores
from services.gen.influence.v1 import common_pb2
from services.query_svc.report_html import SECTIONS
from services.toy.models import build_tiny_model, save_model_dir
from services.toy.recipe import DemoSettings, build_corpus
from services.toy.tokenizer import build_word_tokenizer

WORDS = [f"w{i}" for i in range(40)]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = build_word_tokenizer(WORDS)
    model = build_tiny_model("gpt2", len(tokenizer), n_layer=2, d_model=16, seed=0)
    save_model_dir(model, tokenizer, root / "model")
    other = build_tiny_model("gpt2", len(tokenizer), n_layer=2, d_model=16, seed=1)
    save_model_dir(other, tokenizer, root / "other-model")
    generator = torch.Generator().manual_seed(0)
    train = [
        {
            "id": f"t{i}",
            "text": " ".join(WORDS[int(j)] for j in torch.randint(0, 40, (int(3 + i % 9),), generator=generator)),
        }
        for i in range(14)
    ]
    queries = [
        {"id": "a", "prompt": "w1 w2 w3", "completion": "w4 w5"},
        {"prompt": "w7", "completion": "w9"},
    ]
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "queries.jsonl", queries)
    assert (
        main(
            [
                "fit",
                "--model",
                str(root / "model"),
                "--data",
                str(root / "train.jsonl"),
                "--out",
                str(root / "factors"),
                "--quiet",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    return root


def run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.needs_servers
def test_score_writes_the_documented_files_and_equals_the_engine(workspace, tmp_path, capsys):
    out = tmp_path / "scores"
    code, _ = run(
        [
            "score",
            "--model",
            str(workspace / "model"),
            "--factors",
            str(workspace / "factors"),
            "--data",
            str(workspace / "train.jsonl"),
            "--queries",
            str(workspace / "queries.jsonl"),
            "--out",
            str(out),
            "--top-k",
            "3",
            "--per-module",
            "--per-token",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0
    tensors = load_file(str(out / "scores.safetensors"))
    assert tensors["scores"].dtype == torch.float32 and tensors["scores"].shape == (2, 14)
    assert tensors["per_module"].shape == (4, 2, 14)
    results = json.loads((out / "results.json").read_text())
    assert [q["id"] for q in results["queries"]] == ["a", "1"]
    first = results["queries"][0]["top"]
    assert [entry["rank"] for entry in first] == [1, 2, 3]
    assert first[0]["score"] >= first[1]["score"] >= first[2]["score"]
    for entry in first:
        index = int(entry["id"][1:])
        assert entry["score"] == pytest.approx(float(tensors["scores"][0, index]), rel=1e-6)
        assert sum(t["score"] for t in entry["tokens"]) == pytest.approx(entry["score"], rel=1e-4, abs=1e-5)
        assert sum(entry["per_module"].values()) == pytest.approx(entry["score"], rel=1e-4, abs=1e-5)
        assert entry["text"] == read_training_jsonl(workspace / "train.jsonl")[index].text

    model, tokenizer = load_model_and_tokenizer(workspace / "model")
    expected = compute_scores(
        model,
        tokenizer,
        load_factors(workspace / "factors"),
        read_training_jsonl(workspace / "train.jsonl"),
        read_queries_jsonl(workspace / "queries.jsonl"),
        ScoreConfig(),
    ).scores
    assert torch.allclose(tensors["scores"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.needs_servers
def test_a_preset_is_the_damping_it_names(workspace, tmp_path, capsys):
    """--preset generalisation scores exactly as --damping-factor 0.001; a preset beside a damping
    flag is refused (exit 2)."""
    common = ["score", "--model", str(workspace / "model"), "--factors", str(workspace / "factors")]
    common += ["--data", str(workspace / "train.jsonl"), "--queries", str(workspace / "queries.jsonl"), "--quiet"]
    assert run([*common, "--out", str(tmp_path / "preset"), "--preset", "generalisation"], capsys)[0] == 0
    assert run([*common, "--out", str(tmp_path / "flag"), "--damping-factor", "0.001"], capsys)[0] == 0
    preset = load_file(str(tmp_path / "preset" / "scores.safetensors"))["scores"]
    assert torch.equal(preset, load_file(str(tmp_path / "flag" / "scores.safetensors"))["scores"])
    default = run([*common, "--out", str(tmp_path / "default"), "--preset", "sources"], capsys)
    assert default[0] == 0
    assert not torch.equal(preset, load_file(str(tmp_path / "default" / "scores.safetensors"))["scores"])
    with pytest.raises(SystemExit) as refused:
        main([*common, "--out", str(tmp_path / "both"), "--preset", "sources", "--damping", "1"])
    assert refused.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.needs_servers
def test_self_writes_one_score_per_training_sequence(workspace, tmp_path, capsys):
    code, _ = run(
        [
            "self",
            "--model",
            str(workspace / "model"),
            "--factors",
            str(workspace / "factors"),
            "--data",
            str(workspace / "train.jsonl"),
            "--out",
            str(tmp_path),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0
    scores = load_file(str(tmp_path / "scores.safetensors"))["scores"]
    assert scores.shape == (14,) and scores.dtype == torch.float32 and bool((scores > 0).all())
    top = json.loads((tmp_path / "results.json").read_text())["top"]
    assert top[0]["score"] == pytest.approx(float(scores.max()), rel=1e-6)


@pytest.mark.needs_servers
def test_fit_shows_progress_and_writes_a_manifest(workspace, tmp_path, capsys):
    code, err = run(
        [
            "fit",
            "--model",
            str(workspace / "model"),
            "--data",
            str(workspace / "train.jsonl"),
            "--out",
            str(tmp_path / "f"),
            "--strategy",
            "kfac",
            "--fisher",
            "empirical",
            "--modules",
            "attention",
        ],
        capsys,
    )
    assert code == 0
    # stderr is not a terminal here: one line per finished stage, no carriage-return redraws
    assert "\r" not in err and "%|" not in err, err
    assert any(line.strip().startswith("register: 1/1 shards in") for line in err.splitlines()), err
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    metadata = manifest["metadata"]
    assert metadata["strategy"] == "kfac" and metadata["fisher"] == "empirical"
    assert all("attn" in name for name in metadata["modules"])
    assert set(manifest["files"]) == {info["file"] for info in metadata["modules"].values()}
    assert all(len(entry["sha256"]) == 64 and entry["size"] > 0 for entry in manifest["files"].values())
    assert metadata["n_sequences"] == 14 and metadata["model_fingerprint"]


def test_stage_bars_redraw_on_a_terminal_and_print_a_line_per_stage_in_a_log():
    class Stream(io.StringIO):
        def __init__(self, tty: bool):
            super().__init__()
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    def feed(bars: StageBars) -> None:
        """A two-shard covariance stage (shown by shards), then the one-task eigen stage (shown by
        its step: modules done of total)."""
        updates = [
            dict(stage="covariance", shards_done=0, shards_total=4, step="covariance", step_done=3, step_total=9),
            dict(stage="covariance", shards_done=2, shards_total=4, tokens_processed=500),
            dict(
                stage="eigen", shards_total=1, step="eigendecomposition", step_done=3, step_total=8, step_unit="module"
            ),
            dict(
                stage="eigen", shards_total=1, step="eigendecomposition", step_done=7, step_total=8, step_unit="module"
            ),
            dict(stage="done", shards_done=1, shards_total=1, tokens_processed=900),
        ]
        for update in updates:
            bars(common_pb2.OperationMetadata(**update))

    terminal, log = Stream(True), Stream(False)
    with StageBars(True, terminal) as bars:
        feed(bars)
    with StageBars(True, log) as bars:
        feed(bars)
    shown = terminal.getvalue()
    assert "%|" in shown and "covariance" in shown and "8/8" in shown and "module" in shown, shown
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in log.getvalue(), lines
    assert lines[0].strip().startswith("covariance: 4/4 shards in"), lines
    assert lines[1].strip().startswith("eigendecomposition: 8/8 modules in"), lines
    # within the shard that runs, its task's step moves the bar (3 of 9 batches of the first of 4
    # shards); a step at its end (counted in shards_done, or left from the stage before) does not
    running = dict(stage="covariance", shards_done=0, shards_total=4, step="covariance", step_done=3, step_total=9)
    assert phase_of(common_pb2.OperationMetadata(**running)).running == pytest.approx(1 / 3)
    ended = dict(running, shards_done=1, step_done=9)
    assert phase_of(common_pb2.OperationMetadata(**ended)) == Phase("covariance", 1, 4, "shard", 0.0)


def test_a_terminal_of_no_width_gets_the_log_lines_not_blank_bars(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

        def fileno(self) -> int:
            return 2

    monkeypatch.setattr(os, "get_terminal_size", lambda fd: os.terminal_size((0, 0)))
    stream = Terminal()
    with StageBars(True, stream) as bars:
        for update in (
            dict(stage="merge", shards_total=1, step="scores", step_done=1, step_total=2),
            dict(stage="done"),
        ):
            bars(common_pb2.OperationMetadata(**update))
    assert (
        stream.getvalue().splitlines() == [stream.getvalue().strip("\n")]
        and "scores: 2/2 batches in" in stream.getvalue()
    )


def bad_cases(workspace: Path, tmp: Path):
    model, factors = str(workspace / "model"), str(workspace / "factors")
    train, queries = str(workspace / "train.jsonl"), str(workspace / "queries.jsonl")
    malformed = tmp / "malformed.jsonl"
    malformed.write_text('{"text": "w1 w2"}\n{"text": \n')
    empty_completion = write_jsonl(tmp / "empty.jsonl", [{"prompt": "w1", "completion": "  "}])
    no_text = write_jsonl(tmp / "notext.jsonl", [{"id": "x"}])
    not_a_model = tmp / "not-a-model"
    not_a_model.mkdir(exist_ok=True)
    (not_a_model / "config.json").write_text("{}")
    a_file = tmp / "a-file"
    a_file.write_text("x")
    score = ["score", "--model", model, "--factors", factors, "--data", train, "--queries", queries, "--quiet"]
    return {
        "missing data file": (
            ["fit", "--model", model, "--data", str(tmp / "nope.jsonl"), "--out", str(tmp / "o")],
            "not found",
        ),
        "malformed JSON line": (
            ["fit", "--model", model, "--data", str(malformed), "--out", str(tmp / "o")],
            ":2: malformed JSON",
        ),
        "record without text": (
            ["fit", "--model", model, "--data", str(no_text), "--out", str(tmp / "o")],
            "'text' must be a string",
        ),
        "empty completion": (
            [*score[:8], str(empty_completion), "--out", str(tmp / "o"), "--quiet"],
            "'completion' is empty",
        ),
        "unknown modules regex": (
            ["fit", "--model", model, "--data", train, "--out", str(tmp / "o"), "--modules", "zzz"],
            "matches no linear module",
        ),
        "invalid regex": (
            ["fit", "--model", model, "--data", train, "--out", str(tmp / "o"), "--modules", "(("],
            "invalid --modules",
        ),
        "missing model dir": (
            ["fit", "--model", str(tmp / "none"), "--data", train, "--out", str(tmp / "o")],
            "model directory not found",
        ),
        "model dir that does not load": (
            ["fit", "--model", str(not_a_model), "--data", train, "--out", str(tmp / "o")],
            "cannot load",
        ),
        "factors for another model": (
            ["score", "--model", str(workspace / "other-model"), *score[3:], "--out", str(tmp / "o")],
            "another model",
        ),
        "missing factors": (
            ["score", "--model", model, "--factors", str(tmp / "nf"), *score[5:], "--out", str(tmp / "o")],
            "no factors",
        ),
        "out is a file": ([*score, "--out", str(a_file)], "not a directory"),
        "bad batch size": (
            ["fit", "--model", model, "--data", train, "--out", str(tmp / "o"), "--batch-size", "0"],
            "--batch-size",
        ),
        "bad query rank": ([*score, "--out", str(tmp / "o"), "--query-rank", "0"], "--query-rank"),
        "bad dtype": (
            ["fit", "--model", model, "--data", train, "--out", str(tmp / "o"), "--dtype", "int8"],
            "unknown dtype",
        ),
        "cuda without cuda": (
            ["fit", "--model", model, "--data", train, "--out", str(tmp / "o"), "--device", "cuda"],
            "CUDA is not available",
        )
        if not torch.cuda.is_available()
        else (["fit", "--model", model, "--data", train, "--out", str(tmp / "o"), "--dtype", "int8"], "unknown dtype"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing data file",
        "malformed JSON line",
        "record without text",
        "empty completion",
        "unknown modules regex",
        "invalid regex",
        "missing model dir",
        "model dir that does not load",
        "factors for another model",
        "missing factors",
        "out is a file",
        "bad batch size",
        "bad query rank",
        "bad dtype",
        "cuda without cuda",
    ],
)
@pytest.mark.needs_servers
def test_bad_input_gets_one_line_and_exit_code_2(workspace, tmp_path, capsys, case):
    args, expected = bad_cases(workspace, tmp_path)[case]
    code, err = run(args, capsys)
    assert code == 2, err
    assert "Traceback" not in err, err
    # Progress bars of stages that ran before the failure may precede it (tqdm redraws with \r);
    # the error itself is exactly one line, and the last one.
    lines = [line.rsplit("\r", 1)[-1].strip() for line in err.splitlines()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert errors[0].startswith(f"influence {args[0]}: error: ") and expected in errors[0], errors[0]


@pytest.mark.needs_servers
def test_the_installed_entry_point_reports_errors_without_a_traceback(workspace, tmp_path):
    """The real console script, in a fresh process, offline."""
    executable = Path(sys.executable).with_name("influence")
    result = subprocess.run(
        [
            str(executable),
            "score",
            "--model",
            str(workspace / "model"),
            "--factors",
            str(workspace / "factors"),
            "--data",
            str(workspace / "train.jsonl"),
            "--queries",
            str(tmp_path / "missing.jsonl"),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"influence score: error: queries file not found: {tmp_path / 'missing.jsonl'}"
    ]


@pytest.mark.needs_servers
def test_the_foreground_embedded_system_works_on_the_callers_thread(workspace, monkeypatch):
    """EmbeddedSystem.run: tasks run on the calling thread (the one that may own torch's OpenMP
    team), the body on a helper thread; the body's result and its errors come back to the caller."""
    import threading

    from services.assembly import STAGE_TABLE
    from services.embedded import EmbeddedSystem
    from services.errors import NotFoundError
    from services.system import runner
    from services.system.plans import Stage

    seen = []
    original = STAGE_TABLE.stage("register")

    def recording(call):
        seen.append((call.stage, threading.current_thread() is threading.main_thread(), torch.get_num_threads()))
        return original.run(call)

    monkeypatch.setitem(STAGE_TABLE.stages, "register", Stage("register", recording))
    with EmbeddedSystem(foreground=True) as system:
        dataset = system.run(
            lambda client: client.register_dataset(str(workspace / "model"), workspace / "train.jsonl")
        )
        assert dataset.num_examples == 14
        with pytest.raises(NotFoundError, match="not found"):
            system.run(lambda client: client.get_dataset("datasets/0000"))
    assert seen == [("register", True, runner.available_cores())]


@pytest.mark.needs_servers
@pytest.mark.slow
def test_the_demo_runs_end_to_end(tmp_path, capsys):
    """The README's main job, with a briefly trained model: every query is answered with its
    top-5 training sequences, and the summary is written."""
    code = main(
        ["demo", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--epochs", "2", "--quiet"]
    )
    assert code == 0
    summary = json.loads((tmp_path / "out" / "demo.json").read_text())["summary"]
    report = json.loads((tmp_path / "out" / "scores" / "results.json").read_text())
    assert all(len(query["top"]) == 5 and query["top"][0]["tokens"] for query in report["queries"])
    # The counts, recounted from the scores and the planted sequences of the demo's corpus (made
    # here from its recipe: 4 per queried fact). After 2 epochs the model knows little, so the
    # counts themselves are not asserted (20 epochs give 24/24: README, "The demo").
    corpus = build_corpus(DemoSettings(), seed=0)
    planted = corpus.expected()
    assert len(planted) == 24 and {len(ids) for ids in planted.values()} == {DemoSettings().mentions_per_fact}
    top = {query["id"]: [entry["id"] for entry in query["top"]] for query in report["queries"]}
    assert top.keys() == planted.keys()
    at_1 = sum(top[query][0] in ids for query, ids in planted.items())
    in_5 = sum(bool(set(top[query]) & set(ids)) for query, ids in planted.items())
    assert (summary["queries"], summary["training_sequences"]) == (24, len(corpus.training))
    assert (summary["top1_is_planted"], summary["planted_in_top5"]) == (at_1, in_5)
    assert load_factors(tmp_path / "out" / "factors").strategy == "ekfac"
    printed = capsys.readouterr().out
    assert f"{at_1}/24 queries have a planted training sequence" in printed and f"{in_5}/24 among" in printed
    page = tmp_path / "out" / "report.html"
    assert printed.strip().splitlines()[-1] == f"Report: {page.resolve()}"
    assert all(f'id="{section}"' in page.read_text() for section in SECTIONS)


@pytest.mark.parametrize("command", ["serve", "worker"])
@pytest.mark.parametrize("flag", [["--coalesce-ms", "-1"], ["--coalesce-limit", "0"]])
def test_a_negative_coalescing_window_is_refused_before_anything_starts(command, flag, tmp_path, capsys):
    code, err = run([command, "--state-dir", str(tmp_path / "state"), *flag], capsys)
    given = "-1 and 16" if flag[0] == "--coalesce-ms" else "200 and 0"
    assert code == 2 and err.strip().splitlines()[-1].endswith(f"--coalesce-limit >= 1, got {given}"), err
    assert not (tmp_path / "state").exists()  # nothing started
