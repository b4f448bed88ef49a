"""Corpora through the public contract: `influence fit` / `score` with --data a Parquet directory
(a chat column among them) or --tokens token shards, locally (embedded) and from s3:// through
`influence serve`, each dataset the same as the TRAIN.jsonl it is read as (engine/corpora.py),
its scores equal to the in-process engine's on those lines."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from services.catalog.factor_sets import load_factors
from services.cli import main
from services.client import InfluenceClient
from services.engine.corpora import CorpusSpec, corpus_records
from services.engine.model_io import load_model_and_tokenizer
from services.engine.records import read_queries_jsonl, training_examples
from services.engine.score import ScoreConfig, compute_scores
from services.errors import InputError
from services.storage import S3Store
from tests.support.chat import add_chat_template
from tests.support.families import build_family_model, sentences
from tests.support.numerics import FLOAT32, assert_close

pytestmark = pytest.mark.needs_servers


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    texts = sentences(12, seed=7)
    (root / "parquet").mkdir()
    pq.write_table(pa.table({"text": texts[:6], "id": [f"p{i}" for i in range(6)]}), root / "parquet" / "a.parquet")
    chats = [[{"role": "user", "content": t[:9]}, {"role": "assistant", "content": t[9:]}] for t in texts[6:]]
    pq.write_table(pa.table({"messages": chats}), root / "parquet" / "b.parquet")  # a chat column, no ids
    model = add_chat_template(build_family_model("llama", root / "llama"))
    _, tokenizer = load_model_and_tokenizer(model)
    ids = [tokenizer(t)["input_ids"] for t in texts]
    flat = np.array([token for sequence in ids for token in sequence[:6]][: 6 * 10], dtype=np.uint16)
    (root / "tokens").mkdir()
    np.save(root / "tokens" / "part-0.npy", flat[:30].reshape(5, 6))
    flat[30:].tofile(root / "tokens" / "part-1.bin")
    (root / "queries.jsonl").write_text(
        json.dumps({"id": "q", "prompt": "the quick brown", "completion": " fox jumps"})
        + "\n"
        + json.dumps({"id": "c", "messages": [*chats[0][:1], {"role": "assistant", "content": "tea"}]})
        + "\n"
    )
    return root, model


def _fit_and_score(model, data: list[str], root, out, server: str | None = None) -> None:
    extra = [*data, "--quiet", "--batch-size", "4", "--model", str(model)] + (["--server", server] if server else [])
    assert main(["fit", *extra, "--out", str(out / "factors")]) == 0
    queries = ["--queries", str(root / "queries.jsonl"), "--factors", str(out / "factors")]
    assert main(["score", *extra, *queries, "--out", str(out / "scores"), "--top-k", "3"]) == 0


def _check(model_dir, root, out, source, spec: CorpusSpec) -> None:
    model, tokenizer = load_model_and_tokenizer(model_dir)
    examples = training_examples(list(corpus_records(source, spec)), str(source))
    factors = load_factors(out / "factors")
    queries = read_queries_jsonl(root / "queries.jsonl")
    expected = compute_scores(model, tokenizer, factors, examples, queries, ScoreConfig(top_k=3, batch_size=4))
    assert_close(load_file(str(out / "scores" / "scores.safetensors"))["scores"], expected.scores, FLOAT32, "scores")
    report = json.loads((out / "scores" / "results.json").read_text())
    assert {entry["id"] for query in report["queries"] for entry in query["top"]} <= {e.id for e in examples}
    row = {example.id: position + 1 for position, example in enumerate(examples)}  # a corpus' line: its row
    assert all(entry["line"] == row[entry["id"]] for query in report["queries"] for entry in query["top"])


@pytest.mark.slow
def test_a_parquet_directory_and_token_shards_fit_and_score_embedded(corpora, tmp_path):
    root, model = corpora
    _fit_and_score(model, ["--data", str(root / "parquet")], root, tmp_path / "parquet")
    _check(model, root, tmp_path / "parquet", root / "parquet", CorpusSpec())
    tokens = ["--tokens", str(root / "tokens"), "--sequence-length", "6"]
    _fit_and_score(model, tokens, root, tmp_path / "tokens")
    _check(model, root, tmp_path / "tokens", root / "tokens", CorpusSpec(sequence_length=6))


def test_corpora_from_s3_through_influence_serve(corpora, served, s3_server, tmp_path):
    root, model = corpora
    bucket = f"corpora-{uuid.uuid4().hex[:8]}"
    store = S3Store(s3_server.endpoint, bucket, s3_server.access_key, s3_server.secret_key)
    for folder in ("parquet", "tokens"):
        for file in (root / folder).iterdir():
            store.put_file(f"{folder}/{file.name}", file)
    server = served[0]
    _fit_and_score(model, ["--data", f"s3://{bucket}/parquet/"], root, tmp_path / "parquet", server)
    _check(model, root, tmp_path / "parquet", root / "parquet", CorpusSpec())
    tokens = ["--tokens", f"s3://{bucket}/tokens/", "--sequence-length", "6"]
    _fit_and_score(model, tokens, root, tmp_path / "tokens", server)
    _check(model, root, tmp_path / "tokens", root / "tokens", CorpusSpec(sequence_length=6))
    # a corpus by a path on the server is refused, naming what works
    with InfluenceClient(server) as client, pytest.raises(InputError, match="a corpus is read from s3://"):
        client.register_dataset(str(model), root / "parquet" / "a.parquet", by_path=True)
    # a local corpus through a server is sent as its TRAIN.jsonl lines
    _fit_and_score(model, ["--data", str(root / "parquet" / "a.parquet")], root, tmp_path / "local", server)
    _check(model, root, tmp_path / "local", root / "parquet" / "a.parquet", CorpusSpec())
