"""Artifacts of any size never travel in one message: a factor set larger than the old 256 MiB
upload cap is scored in embedded mode (registered in place) and through `influence serve`
(uploaded in resumable chunks); an interrupted upload resumes with only the missing files."""

from __future__ import annotations

import json

import grpc
import pytest
import torch
from safetensors.torch import load_file

from services.catalog.factor_sets import load_factors, save_factors
from services.cli import main
from services.client import InfluenceClient
from services.client.transfers import upload_chunks
from services.embedded import EmbeddedSystem
from services.engine.factors import FactorSet, ModuleFactors
from services.engine.fit import prepare_model
from services.engine.model_io import load_model_and_tokenizer, model_fingerprint
from services.engine.records import read_queries_jsonl, read_training_jsonl
from services.engine.score import ScoreConfig, compute_scores
from services.gen.influence.v1 import factor_service_pb2
from services.toy.models import build_tiny_model, save_model_dir
from services.toy.tokenizer import build_word_tokenizer
from tests.support.numerics import FLOAT32, assert_close

pytestmark = pytest.mark.needs_servers  # every test scores or uploads through a system

OLD_CAP = 256 * 2**20
WORDS = [f"w{i}" for i in range(30)]


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 2-layer GPT-2 with 4096-wide MLPs and a valid EK-FAC factor set for it (identity
    eigenbases, Λ = 1: no eigendecomposition needed to build it) of about 352 MB."""
    root = tmp_path_factory.mktemp("big")
    tokenizer = build_word_tokenizer(WORDS)
    model = build_tiny_model("gpt2", len(tokenizer), n_layer=2, d_model=1024, n_head=8, d_ff=4096, seed=0)
    save_model_dir(model, tokenizer, root / "model")
    _, tracked = prepare_model(model, "mlp")
    factors = {
        name: ModuleFactors(
            eigenvalues=torch.ones(module.d_out, module.d_in_full),
            activation_eigenvectors=torch.eye(module.d_in_full),
            gradient_eigenvectors=torch.eye(module.d_out),
        )
        for name, module in tracked.items()
    }
    fingerprint = model_fingerprint(model, list(tracked))
    factor_set = FactorSet("ekfac", "sampled", tracked, factors, 1, 1, fingerprint, {"model_dtype": "float32"})
    save_factors(factor_set, root / "factors")
    size = sum(path.stat().st_size for path in (root / "factors").iterdir())
    assert size > OLD_CAP, size
    texts = [" ".join(WORDS[(i * j) % 30] for j in range(5)) for i in range(6)]
    write_jsonl(root / "train.jsonl", [{"id": f"t{i}", "text": text} for i, text in enumerate(texts)])
    write_jsonl(root / "queries.jsonl", [{"id": "q", "prompt": "w1 w2", "completion": "w3"}])
    return root


def score(big, out, server=None) -> torch.Tensor:
    extra = ["--server", server] if server else []
    args = [
        "score",
        "--model",
        str(big / "model"),
        "--factors",
        str(big / "factors"),
        "--data",
        str(big / "train.jsonl"),
    ]
    assert main([*args, "--queries", str(big / "queries.jsonl"), "--out", str(out), "--quiet", *extra]) == 0
    return load_file(str(out / "scores.safetensors"))["scores"]


def expected_scores(big) -> torch.Tensor:
    model, tokenizer = load_model_and_tokenizer(big / "model")
    examples, queries = read_training_jsonl(big / "train.jsonl"), read_queries_jsonl(big / "queries.jsonl")
    return compute_scores(model, tokenizer, load_factors(big / "factors"), examples, queries, ScoreConfig()).scores


@pytest.mark.slow
def test_a_factor_set_over_the_old_cap_scores_in_embedded_mode_without_copies(big, tmp_path):
    manifest = big / "factors" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    assert_close(score(big, tmp_path), expected_scores(big), FLOAT32, "embedded scores")
    assert manifest.stat().st_mtime_ns == before and (big / "factors").is_dir(), "the directory is used in place"


@pytest.mark.slow
def test_a_factor_set_over_the_old_cap_uploads_in_chunks_to_a_server(big, served, tmp_path):
    target, _ = served
    assert_close(score(big, tmp_path / "first", target), expected_scores(big), FLOAT32, "server scores")
    with InfluenceClient(target) as client:
        manifest = (big / "factors" / "manifest.json").read_bytes()
        plan = client.factors.PlanFactorImport(factor_service_pb2.PlanFactorImportRequest(manifest=manifest))
        assert plan.published and not plan.missing_files, "a second run sends nothing"


def test_an_interrupted_upload_resumes_with_the_missing_files(tmp_path):
    tokenizer = build_word_tokenizer(WORDS)
    model = build_tiny_model("gpt2", len(tokenizer), n_layer=3, d_model=16, seed=0)
    save_model_dir(model, tokenizer, tmp_path / "model")
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [{"text": f"w{i} w{i + 1} w{i + 2}"} for i in range(8)])
    fit = ["fit", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(tmp_path / "f"), "--quiet"]
    assert main(fit) == 0
    directory = tmp_path / "f"
    manifest = (directory / "manifest.json").read_bytes()
    files = sorted(json.loads(manifest)["files"])
    assert len(files) == 6
    with EmbeddedSystem() as system, InfluenceClient(system.target) as client:
        # an upload that stops after three files (the stream ends: every chunk sent was received)
        with pytest.raises(grpc.RpcError) as stopped:
            client.factors.ImportFactors(upload_chunks(directory, manifest, files[:3], None))
        assert stopped.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "upload is incomplete: 3 files missing" in stopped.value.details()
        plan = client.factors.PlanFactorImport(factor_service_pb2.PlanFactorImportRequest(manifest=manifest))
        assert not plan.published and list(plan.missing_files) == files[3:]
        sent = []
        imported = client.import_factors(directory, progress=sent.append)
        assert sent == files[3:] and imported.name == plan.factor_set
        client.download_factors(imported.name, tmp_path / "back")
    for name in [*files, "manifest.json"]:
        assert (tmp_path / "back" / name).read_bytes() == (directory / name).read_bytes(), name
