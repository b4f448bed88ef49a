"""NaN and Inf are refused where they first appear, with a one-line error naming the module and
the stage: exit code 2 from the CLI, FAILED_PRECONDITION through the API; results.json is always
strict JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2
from google.rpc import code_pb2
from safetensors.torch import load_file, save_file

from services.cli import main
from services.client import InfluenceClient
from services.embedded import EmbeddedSystem
from services.errors import PreconditionError
from services.gen.influence.v1 import common_pb2, factor_service_pb2
from services.storage import LocalStore, Manifest
from services.storage.manifest import MANIFEST, FileEntry, sha256_bytes
from services.toy.models import build_tiny_model, save_model_dir
from services.toy.tokenizer import build_word_tokenizer

pytestmark = pytest.mark.needs_servers  # every test runs the CLI's embedded system

WORDS = [f"w{i}" for i in range(30)]


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A healthy model, one with a NaN in a tracked weight, and one whose position embedding 20 is
    Inf (harmless until a sequence is longer than 20 tokens); factors fitted on short clean data."""
    root = tmp_path_factory.mktemp("nonfinite")
    tokenizer = build_word_tokenizer(WORDS)
    model = build_tiny_model("gpt2", len(tokenizer), d_model=16, seed=0)
    save_model_dir(model, tokenizer, root / "model")
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 5] = float("nan")
    save_model_dir(model, tokenizer, root / "nan-weight")
    model = build_tiny_model("gpt2", len(tokenizer), d_model=16, seed=0)
    with torch.no_grad():
        model.transformer.wpe.weight[20] = float("inf")
    save_model_dir(model, tokenizer, root / "poison-position")
    clean = [{"id": f"t{i}", "text": " ".join(f"w{(i * 7 + j) % 30}" for j in range(3 + i % 5))} for i in range(10)]
    paths = {
        "clean": write_jsonl(root / "clean.jsonl", clean),
        "poisoned": write_jsonl(root / "poisoned.jsonl", [*clean, {"id": "long", "text": " ".join(["w1"] * 25)}]),
        "queries": write_jsonl(root / "queries.jsonl", [{"id": "q", "prompt": "w1 w2", "completion": "w3"}]),
        "poison-query": write_jsonl(
            root / "poison-query.jsonl",
            [
                {"id": "ok", "prompt": "w1", "completion": "w2"},
                {"id": "long", "prompt": " ".join(["w1"] * 22), "completion": "w2"},
            ],
        ),
    }
    for name in ("model", "poison-position"):
        assert (
            main(
                [
                    "fit",
                    "--model",
                    str(root / name),
                    "--data",
                    paths["clean"],
                    "--out",
                    str(root / f"{name}-factors"),
                    "--quiet",
                ]
            )
            == 0
        )
    return root, paths


def run(args, capsys) -> tuple[int, str]:
    code = main([*args, "--quiet"])
    return code, capsys.readouterr().err.strip()


def test_a_nan_weight_is_refused_at_load(setup, tmp_path, capsys):
    root, paths = setup
    code, err = run(
        ["fit", "--model", str(root / "nan-weight"), "--data", paths["clean"], "--out", str(tmp_path)], capsys
    )
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "transformer.h.1.mlp.c_fc.weight holds NaN or Inf" in err
    assert not (tmp_path / MANIFEST).exists()


def test_non_finite_activations_are_refused_in_the_covariance_pass(setup, tmp_path, capsys):
    root, paths = setup
    code, err = run(
        ["fit", "--model", str(root / "poison-position"), "--data", paths["poisoned"], "--out", str(tmp_path)], capsys
    )
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "training sequence 11 (in file order) makes the inputs of module transformer.h.0.mlp.c_fc NaN or Inf" in err
    assert "(covariance pass)" in err
    assert not (tmp_path / MANIFEST).exists()


def test_a_non_finite_query_gradient_is_refused_naming_the_query(setup, tmp_path, capsys):
    root, paths = setup
    model, factors = str(root / "poison-position"), str(root / "poison-position-factors")
    args = ["score", "--model", model, "--factors", factors, "--data", paths["clean"], "--out", str(tmp_path)]
    code, err = run([*args, "--queries", paths["poison-query"]], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "query 2 (in request order) makes the inputs of module transformer.h.0.mlp.c_fc NaN or Inf" in err
    assert not (tmp_path / "results.json").exists()


def test_a_non_finite_training_score_is_refused_naming_the_sequence(setup, tmp_path, capsys):
    root, paths = setup
    model, factors = str(root / "poison-position"), str(root / "poison-position-factors")
    for command in (["score", "--queries", paths["queries"]], ["self"]):
        args = [*command, "--model", model, "--factors", factors, "--data", paths["poisoned"], "--out", str(tmp_path)]
        code, err = run(args, capsys)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "training sequence 11 (in file order) makes the inputs of module transformer.h.0.mlp.c_fc" in err
        assert not (tmp_path / "results.json").exists()


def test_factor_files_with_nan_are_refused_even_with_a_matching_manifest(setup, tmp_path, capsys):
    root, paths = setup
    factors = tmp_path / "factors"
    factors.mkdir()
    source = LocalStore(root / "model-factors")
    manifest = Manifest.from_bytes(source.get_bytes(MANIFEST), MANIFEST)
    for name in manifest.files:
        (factors / name).write_bytes(source.get_bytes(name))
    victim = sorted(name for name in manifest.files if name.endswith(".safetensors"))[0]
    tensors = load_file(str(factors / victim))
    tensors["eigenvalues"][0, 0] = float("nan")
    save_file(tensors, str(factors / victim))
    data = (factors / victim).read_bytes()
    files = dict(manifest.files)
    files[victim] = FileEntry(victim, sha256_bytes(data), len(data))
    (factors / MANIFEST).write_bytes(Manifest(files, manifest.metadata).to_bytes())
    args = ["score", "--model", str(root / "model"), "--factors", str(factors), "--data", paths["clean"]]
    code, err = run([*args, "--queries", paths["queries"], "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    module = victim.removesuffix(".safetensors")
    assert f"tensor eigenvalues of module {module} holds NaN or Inf" in err


def test_the_api_fails_such_a_job_with_failed_precondition(setup):
    root, paths = setup
    model = str(root / "nan-weight")
    with EmbeddedSystem() as system, InfluenceClient(system.target) as client:
        dataset = client.register_dataset(model, paths["clean"])
        request = factor_service_pb2.FitFactorsRequest(model=common_pb2.ModelSpec(path=model), dataset=dataset.name)
        operation = client.factors.FitFactors(request)
        while not operation.done:
            wait = operations_pb2.WaitOperationRequest(name=operation.name, timeout=duration_pb2.Duration(seconds=5))
            operation = client.operations.WaitOperation(wait)
        assert operation.error.code == code_pb2.FAILED_PRECONDITION
        assert "transformer.h.1.mlp.c_fc.weight holds NaN or Inf" in operation.error.message
        with pytest.raises(PreconditionError, match=r"c_fc\.weight holds NaN or Inf"):
            client.fit_factors(model, dataset.name)
