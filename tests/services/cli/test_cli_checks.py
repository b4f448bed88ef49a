"""What the command line checks and says before anything starts, with no server: `--version`,
factors of another architecture, or of another model of the same architecture (the fingerprint,
computed from the model directory), refused before any upload (not a word about a --modules never
given), output paths that do not exist refused or stated."""

from __future__ import annotations

import json

import pytest

from services import version
from services.catalog.factor_sets import save_factors
from services.cli import main
from services.engine.fit import FitConfig, fit_factors
from services.engine.model_io import load_model_and_tokenizer
from services.engine.records import TrainingExample
from tests.support.families import build_family_model, sentences


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"influence {version()}"


@pytest.fixture(scope="module")
def other_architecture(tmp_path_factory):
    """A GPT-2's factors, and a Llama to score with them; TRAIN and QUERIES files."""
    root = tmp_path_factory.mktemp("foreign")
    model, tokenizer = load_model_and_tokenizer(build_family_model("gpt2", root / "gpt2"))
    texts = sentences(6, seed=3)
    save_factors(
        fit_factors(model, tokenizer, [TrainingExample(f"t{i}", t) for i, t in enumerate(texts)], FitConfig()),
        root / "factors",
    )
    build_family_model("llama", root / "llama")
    build_family_model("gpt2", root / "gpt2-retrained", seed=1)  # the same architecture, other weights
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (root / "queries.jsonl").write_text(json.dumps({"prompt": "the quick", "completion": " brown fox"}) + "\n")
    return root


def test_factors_of_another_architecture_are_refused_before_any_upload(other_architecture, tmp_path, capsys):
    root = other_architecture
    args = [
        "score",
        "--model",
        str(root / "llama"),
        "--factors",
        str(root / "factors"),
        "--data",
        str(root / "train.jsonl"),
    ]
    # an address where no server listens: the refusal comes before any call would notice
    args += ["--queries", str(root / "queries.jsonl"), "--out", str(tmp_path / "o"), "--server", "127.0.0.1:9"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "another model" in error and "--modules" not in error and error.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_factors_of_another_model_of_the_same_architecture_are_refused_before_any_upload(
    other_architecture, tmp_path, capsys
):
    """Module names match; the fingerprint (config, shapes and sampled weights, read from the
    directory without loading it) does not: the worker's own one-line message, before any call."""
    from services.cli.inputs import check_factors

    root = other_architecture
    args = ["score", "--model", str(root / "gpt2-retrained"), "--factors", str(root / "factors")]
    args += ["--data", str(root / "train.jsonl"), "--queries", str(root / "queries.jsonl")]
    args += ["--out", str(tmp_path / "o"), "--server", "127.0.0.1:9"]  # no server listens: refused before any call
    assert main(args) == 2
    error = capsys.readouterr().err
    expected = "factors were fitted for another model (model fingerprint differs); refit them for this model"
    assert expected in error and error.count("\n") == 1
    assert not (tmp_path / "o").exists()

    class Args:  # the factors' own model passes the same check
        model, factors = str(root / "gpt2"), str(root / "factors")

    check_factors(Args())


def test_an_out_directory_under_missing_ones_is_stated(tmp_path, capsys):
    from services.cli.running import out_dir

    class Args:
        quiet = json = False

    assert out_dir(str(tmp_path / "a" / "b" / "out"), Args()).is_dir()
    assert f"created --out {tmp_path / 'a' / 'b' / 'out'}" in capsys.readouterr().err
    out_dir(str(tmp_path / "a" / "b" / "again"), Args())  # only its own directory was missing: nothing to say
    assert capsys.readouterr().err == ""


def test_every_pass_of_a_fit_is_listed_from_its_provenance(tmp_path):
    """The fit's summary names every pass with its seconds (its bars: test_progress_steps.py)."""
    from services.cli.progress import fit_passes

    timings = {"covariance": 75.4, "eigen": 1.1, "correction": 0.04}
    (tmp_path / "manifest.json").write_text(json.dumps({"metadata": {"provenance": {"timings": timings}}}))
    assert fit_passes(tmp_path) == "covariance 75.4s, eigen 1.1s, correction 0.0s"
