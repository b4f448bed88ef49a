"""Chat data: training lines and queries given as `messages`, rendered with the tokenizer's chat
template (engine/records.py validates, engine/data.py renders and masks)."""

from __future__ import annotations

import pytest

from services.engine.data import rendered, tokenize_queries, tokenize_training
from services.engine.model_io import load_tokenizer
from services.engine.records import query_records, training_examples
from services.errors import InputError
from tests.support.chat import add_chat_template
from tests.support.families import build_family_model

CHAT = [
    {"role": "system", "content": "answer in words"},
    {"role": "user", "content": "the quick brown"},
    {"role": "assistant", "content": "fox jumps over"},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    plain = build_family_model("llama", root / "plain")
    chat = add_chat_template(build_family_model("llama", root / "chat"))
    return load_tokenizer(chat), load_tokenizer(plain)


def test_a_chat_query_counts_only_its_last_assistant_turn(tokenizers):
    tokenizer, _ = tokenizers
    (query,) = query_records([{"id": "q", "messages": CHAT, "group": "g"}], "queries")
    assert (query.prompt, query.completion, query.group) == ("", "", "g")
    (sequence,) = tokenize_queries(tokenizer, [query], max_length=128)
    whole = tokenizer.apply_chat_template(CHAT, tokenize=False)
    prompt = tokenizer.apply_chat_template(CHAT[:-1], tokenize=False, add_generation_prompt=True)
    # the tokens are the template's whole rendering, tokenised as it renders (its BOS once)
    assert sequence.input_ids.tolist() == tokenizer(whole, add_special_tokens=False)["input_ids"]
    assert sequence.input_ids.tolist().count(tokenizer.bos_token_id) == 1
    completion = tokenizer.decode(sequence.input_ids[sequence.target_mask])
    assert completion == whole[len(prompt) :] and completion.startswith(" fox jumps over")
    assert not sequence.target_mask[: len(tokenizer(prompt, add_special_tokens=False)["input_ids"])].any()


def test_chat_training_lines_are_rendered_and_every_token_after_the_first_is_a_target(tokenizers):
    tokenizer, _ = tokenizers
    examples = training_examples([{"id": "c", "messages": CHAT}, {"id": "t", "text": "the lazy dog"}], "train")
    assert examples[0].text == "" and examples[0].messages[1].content == "the quick brown"
    chat, text = tokenize_training(tokenizer, examples, max_length=128)
    whole = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert rendered(tokenizer, examples)[0].text == whole
    assert chat.input_ids.tolist() == tokenizer(whole, add_special_tokens=False)["input_ids"]
    assert text.input_ids.tolist() == tokenizer("the lazy dog")["input_ids"]  # plain text as before
    assert chat.target_mask.tolist() == [False] + [True] * (chat.length - 1)


def test_a_tokenizer_without_a_chat_template_is_one_line_naming_the_fix(tokenizers):
    _, plain = tokenizers
    (query,) = query_records([{"id": "q", "messages": CHAT}], "queries")
    for attempt in (
        lambda: tokenize_queries(plain, [query], 128),
        lambda: tokenize_training(plain, training_examples([{"messages": CHAT}], "train"), 128),
    ):
        with pytest.raises(InputError, match="has no chat template: add one") as error:
            attempt()
        assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"messages": CHAT[:-1]}, "the last message must be the assistant's completion"),
        ({"messages": CHAT[-1:]}, "at least one message before it"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}, CHAT[-1]]}, "message 1: field 'content' must be a string"),
        ({"messages": ["hi", CHAT[-1]]}, "message 1 must be an object with a string 'role'"),
        ({"messages": CHAT, "prompt": "x", "completion": "y"}, "give 'messages' or 'prompt and completion', not both"),
    ],
)
def test_malformed_chat_queries_are_refused_naming_the_query(record, expected):
    with pytest.raises(InputError, match="queries: query 1") as error:
        query_records([record], "queries")
    assert expected in str(error.value)


def test_malformed_chat_training_lines_are_refused_naming_the_record():
    with pytest.raises(InputError, match="train: record 2: give 'messages' or 'text', not both"):
        training_examples([{"text": "a b"}, {"messages": CHAT, "text": "x"}], "train")
    with pytest.raises(InputError, match="train: record 1: field 'messages' must be a non-empty list"):
        training_examples([{"messages": "hello"}], "train")
