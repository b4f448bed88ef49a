"""Chat data through the public contract: TRAIN.jsonl lines and queries given as `messages`,
rendered with the model's chat template, `influence fit` -> `influence score --per-token`,
embedded and through `influence serve`, checked against the in-process engine; a model whose
tokenizer has no chat template is refused in one line naming the fix."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from services.catalog.factor_sets import load_factors
from services.cli import main
from services.client import InfluenceClient
from services.engine.model_io import load_model_and_tokenizer
from services.engine.records import ChatMessage, Query, read_queries_jsonl, read_training_jsonl
from services.engine.score import ScoreConfig, compute_scores
from services.errors import InputError
from tests.support.chat import add_chat_template
from tests.support.families import build_family_model, sentences
from tests.support.numerics import FLOAT32, assert_close

pytestmark = pytest.mark.needs_servers


def _chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-cli")
    texts = sentences(16, seed=5)
    lines = [{"id": f"c{i}", "messages": _chat(t[: len(t) // 2], t[len(t) // 2 :])} for i, t in enumerate(texts[:10])]
    lines += [{"id": f"t{i}", "text": t} for i, t in enumerate(texts[10:])]  # chat and text lines may mix
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    queries = [
        {"id": "q-fox", "messages": _chat("the quick brown", "fox jumps"), "group": "animals"},
        {"id": "q-tea", "messages": [{"role": "system", "content": "trade"}, *_chat("merchants", "copper tea")]},
        {"id": "q-plain", "prompt": "seven sailors", "completion": " sing about"},
    ]
    (root / "queries.jsonl").write_text("".join(json.dumps(query) + "\n" for query in queries))
    model = add_chat_template(build_family_model("llama", root / "llama-chat"))
    plain = build_family_model("gpt2", root / "gpt2-plain")
    return root, model, plain


def _fit_and_score(root, model, out, server: str | None) -> None:
    extra = ["--server", server] if server else []
    common = ["--model", str(model), "--data", str(root / "train.jsonl"), "--quiet", "--batch-size", "4", *extra]
    assert main(["fit", *common, "--out", str(out / "factors")]) == 0
    score = ["score", *common, "--factors", str(out / "factors"), "--queries", str(root / "queries.jsonl")]
    assert main([*score, "--out", str(out / "scores"), "--top-k", "3", "--per-token"]) == 0


def _check_against_the_engine(root, model_dir, out) -> None:
    model, tokenizer = load_model_and_tokenizer(model_dir)
    examples, queries = read_training_jsonl(root / "train.jsonl"), read_queries_jsonl(root / "queries.jsonl")
    factors = load_factors(out / "factors")
    expected = compute_scores(model, tokenizer, factors, examples, queries, ScoreConfig(top_k=3, batch_size=4))
    scores = load_file(str(out / "scores" / "scores.safetensors"))["scores"]
    assert_close(scores, expected.scores, FLOAT32, "chat scores")
    report = json.loads((out / "scores" / "results.json").read_text())
    fox = report["queries"][0]
    assert fox["group"] == "animals" and fox["completion"] == "fox jumps" and fox["prompt"] == "user: the quick brown"
    assert fox["messages"] == _chat("the quick brown", "fox jumps")
    for entry in fox["top"]:  # a chat line's text is its rendering, and its tokens are the rendering's
        if entry["id"].startswith("c"):
            example = next(e for e in examples if e.id == entry["id"])
            messages = [{"role": m.role, "content": m.content} for m in example.messages]
            assert entry["text"] == tokenizer.apply_chat_template(messages, tokenize=False)
        assert sum(token["score"] for token in entry["tokens"]) == pytest.approx(entry["score"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_chat_data_fit_and_score_embedded(chat_data, tmp_path):
    root, model, _ = chat_data
    _fit_and_score(root, model, tmp_path, server=None)
    _check_against_the_engine(root, model, tmp_path)


def test_chat_data_fit_and_score_through_influence_serve(chat_data, served, tmp_path):
    root, model, _ = chat_data
    _fit_and_score(root, model, tmp_path, server=served[0])
    _check_against_the_engine(root, model, tmp_path)
    # registration validates chat lines as the CLI does, naming the line; a chat query as well
    bad = b'{"text": "a b"}\n{"messages": [{"role": "user"}]}\n'
    with InfluenceClient(served[0]) as client:
        with pytest.raises(InputError, match="dataset: record 2: message 1: field 'content' must be a string"):
            client.register_dataset(str(model), bad)
        query = Query("q", "", "", messages=(ChatMessage("user", "the dog"),))
        with pytest.raises(InputError, match="the last message must be the assistant's completion"):
            # any factor set and dataset: the query is refused
            factor_set, dataset = client.list_factor_sets()[0].name, client.list_datasets()[0].name
            client.compute_scores(str(model), factor_set, dataset, [query])


def test_chat_data_for_a_model_without_a_chat_template_is_one_line(chat_data, tmp_path, capsys):
    root, _, plain = chat_data
    args = ["fit", "--model", str(plain), "--data", str(root / "train.jsonl"), "--out", str(tmp_path / "f"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "has no chat template: add one" in lines[0] and "Traceback" not in err, err
