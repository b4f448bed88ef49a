"""`influence serve` as its own process, configured by environment against the real Redis and S3,
driven by the CLI's --server mode and the client; StreamBlocks against the autograd loop."""

from __future__ import annotations

import json
import signal
import time

import grpc
import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file

from services.cli import main
from services.client import InfluenceClient
from services.client.connection import operation_metadata
from services.engine.data import tokenize_training
from services.engine.fit import prepare_model
from services.engine.model_io import load_model_and_tokenizer
from services.engine.records import training_examples
from services.errors import NotFoundError
from services.gen.influence.v1 import common_pb2, gradient_service_pb2
from tests.support.reference import loop_gradients
from tests.support.servers.influence import serving
from tests.support.system import unique_jsonl


@pytest.mark.slow
def test_cli_commands_run_through_a_deployed_system(served, workspace, tmp_path, capsys):
    target, _ = served
    with InfluenceClient(target) as client:
        earlier = {operation.name for operation in client.list_operations()}
    model, data = str(workspace / "model"), str(workspace / "train.jsonl")
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"id": "q", "prompt": "w1 w2", "completion": "w3"}) + "\n")
    assert (
        main(["fit", "--server", target, "--model", model, "--data", data, "--out", str(tmp_path / "f"), "--quiet"])
        == 0
    )
    assert (tmp_path / "f" / "manifest.json").exists()
    assert (
        main(
            [
                "score",
                "--server",
                target,
                "--model",
                model,
                "--data",
                data,
                "--queries",
                str(queries),
                "--factors",
                str(tmp_path / "f"),
                "--out",
                str(tmp_path / "s"),
                "--quiet",
                "--per-token",
                "--top-k",
                "2",
            ]
        )
        == 0
    )
    assert load_file(str(tmp_path / "s" / "scores.safetensors"))["scores"].shape == (1, 23)
    report = json.loads((tmp_path / "s" / "results.json").read_text())
    assert len(report["queries"][0]["top"]) == 2 and report["queries"][0]["top"][0]["tokens"]
    assert (
        main(
            [
                "self",
                "--server",
                target,
                "--model",
                model,
                "--data",
                data,
                "--factors",
                str(tmp_path / "f"),
                "--out",
                str(tmp_path / "x"),
                "--quiet",
            ]
        )
        == 0
    )
    assert load_file(str(tmp_path / "x" / "scores.safetensors"))["scores"].shape == (23,)
    with InfluenceClient(target) as client:
        ours = [operation for operation in client.list_operations() if operation.name not in earlier]
    assert all(operation.done and not operation.HasField("error") for operation in ours)
    # a register_dataset too, unless the server had the data already (fit, score and self reuse it)
    kinds = sorted(operation_metadata(operation).kind for operation in ours)
    assert [kind for kind in kinds if kind != "register_dataset"] == [
        "compute_scores",
        "compute_self_influence",
        "fit_factors",
    ]
    assert kinds.count("register_dataset") <= 1


def test_stream_blocks_are_the_per_sequence_gradients(served, workspace):
    target, _ = served
    model_dir = str(workspace / "model")
    with InfluenceClient(target) as client:
        # data of its own: the dataset is deleted below, on a server other tests share
        dataset = client.register_dataset(model_dir, unique_jsonl(workspace), shard_size=10)
        blocks = list(
            client.gradients.StreamBlocks(
                gradient_service_pb2.StreamBlocksRequest(
                    dataset=dataset.name,
                    shard=1,
                    model=common_pb2.ModelSpec(path=model_dir),
                    block_size=4,
                )
            )
        )
        assert [len(block.example_ids) for block in blocks] == [4, 4, 2]
        assert blocks[0].example_ids[0] == "t10"
        with pytest.raises(grpc.RpcError) as raised:
            list(
                client.gradients.StreamBlocks(
                    gradient_service_pb2.StreamBlocksRequest(
                        dataset=dataset.name, shard=7, model=common_pb2.ModelSpec(path=model_dir)
                    )
                )
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        records = [json.loads(line) for line in (workspace / "train.jsonl").read_text().splitlines()]
        model, tokenizer = load_model_and_tokenizer(model_dir)
        sequences = tokenize_training(tokenizer, training_examples(records[10:20], "t"), 512, start_index=10)
        modules, _ = prepare_model(model, "mlp")
        expected = loop_gradients(model, modules, sequences)
        for name in modules:
            streamed = torch.cat([load_tensors(block.safetensors)[name] for block in blocks]).reshape(10, -1)
            torch.testing.assert_close(streamed.double(), expected[name], rtol=1e-4, atol=1e-6)

        client.delete_dataset(dataset.name)
        with pytest.raises(NotFoundError):
            client.get_dataset(dataset.name)
        with pytest.raises(NotFoundError):
            client.delete_dataset(dataset.name)


def test_serve_stops_gracefully_on_sigterm(redis_server, s3_server, tmp_path):
    with serving(redis_server, s3_server, tmp_path / "state") as (_, process):
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(30) == 0
        assert time.monotonic() - started < 20


@pytest.mark.slow
def test_split_services_are_reached_through_per_service_targets(redis_server, s3_server, workspace, tmp_path):
    """The chart's split mode: the factor service on one server, gradient and query on another,
    one Redis and bucket. `--server` alone reaches no FactorService there; `--factor-server` does."""
    import uuid

    shared = {"INFLUENCE_STORE_URL": s3_server.url(f"split{uuid.uuid4().hex[:8]}"), "INFLUENCE_QUEUE_PREFIX": "split"}
    factor_args, rest_args = ("--role", "factor"), ("--role", "gradient,query", "--workers", "0")
    with (
        serving(redis_server, s3_server, tmp_path / "factor", factor_args, env=shared) as (factor, _),
        serving(redis_server, s3_server, tmp_path / "rest", rest_args, env=shared) as (rest, _),
    ):
        arguments = ["--model", str(workspace / "model"), "--data", str(workspace / "train.jsonl"), "--quiet"]
        assert main(["fit", "--server", rest, *arguments, "--out", str(tmp_path / "no")]) != 0
        split = ["--server", rest, "--factor-server", factor]
        assert main(["fit", *split, *arguments, "--out", str(tmp_path / "f")]) == 0
        assert (tmp_path / "f" / "manifest.json").exists()
