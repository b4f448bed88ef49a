"""Corpora as they are shipped (engine/corpora.py): Parquet files and directories, `datasets`
save_to_disk directories and pre-tokenized token shards, read as TRAIN.jsonl lines."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.engine.corpora import CorpusSpec, corpus_records, write_jsonl
from services.engine.data import rendered, tokenize_training
from services.engine.records import file_lines, stream_training_jsonl, training_examples
from services.errors import InputError
from tests.support.reference import IntTokenizer, ids_text

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


class VocabularyTokenizer(IntTokenizer):
    """IntTokenizer with a vocabulary size and decoding, as pre-tokenized data needs."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def decode(self, ids) -> str:
        return ids_text(ids)


def _records(path, spec: CorpusSpec | None = None):
    return list(corpus_records(path, spec or CorpusSpec()))


def test_a_parquet_directory_is_read_file_by_file_and_batch_by_batch(tmp_path, monkeypatch):
    monkeypatch.setattr("services.engine.corpora._BATCH_ROWS", 2)  # several record batches per file
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.table({"text": ["a b", "c d", "e f"], "extra": [1, 2, 3]}), tmp_path / "corpus" / "0.parquet")
    pq.write_table(pa.table({"text": ["g h"], "id": ["x"]}), tmp_path / "corpus" / "1.parquet")
    assert _records(tmp_path / "corpus") == [
        {"id": "0.parquet:0", "text": "a b"},
        {"id": "0.parquet:1", "text": "c d"},
        {"id": "0.parquet:2", "text": "e f"},
        {"id": "x", "text": "g h"},
    ]
    assert _records(tmp_path / "corpus" / "1.parquet") == [{"id": "x", "text": "g h"}]


def test_columns_are_named_by_the_text_or_messages_field(tmp_path):
    pq.write_table(pa.table({"body": ["a b"], "conversation": [CHAT]}), tmp_path / "t.parquet")
    assert _records(tmp_path / "t.parquet", CorpusSpec(text_field="body")) == [{"id": "t.parquet:0", "text": "a b"}]
    chats = _records(tmp_path / "t.parquet", CorpusSpec(messages_field="conversation"))
    assert chats == [{"id": "t.parquet:0", "messages": CHAT}]
    with pytest.raises(InputError, match="no column 'text' nor 'messages' \\(columns: body, conversation\\); name"):
        _records(tmp_path / "t.parquet")


def test_a_datasets_directory_is_read_through_its_state(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"messages": [CHAT, CHAT[:1] + CHAT[1:]]}).save_to_disk(tmp_path / "chat")
    assert [record["messages"] for record in _records(tmp_path / "chat")] == [CHAT, CHAT]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b"]})})
    splits.save_to_disk(tmp_path / "dict")
    with pytest.raises(InputError, match="is a DatasetDict: give one split's directory"):
        _records(tmp_path / "dict")


def test_token_shards_are_cut_into_sequences(tmp_path):
    shards = tmp_path / "tokens"
    shards.mkdir()
    np.save(shards / "a.npy", np.arange(8, dtype=np.uint16).reshape(2, 4))  # rows of the sequence length
    np.save(shards / "b.npy", np.arange(10, dtype=np.uint32))  # flat: 2 sequences, a tail of 2 dropped
    np.arange(100, 108, dtype=np.uint16).tofile(shards / "c.bin")  # raw (Megatron/Pythia-style)
    spec = CorpusSpec(sequence_length=4)
    assert _records(shards, spec) == [
        {"id": "a.npy:0", "tokens": [0, 1, 2, 3]},
        {"id": "a.npy:1", "tokens": [4, 5, 6, 7]},
        {"id": "b.npy:0", "tokens": [0, 1, 2, 3]},
        {"id": "b.npy:1", "tokens": [4, 5, 6, 7]},
        {"id": "c.bin:0", "tokens": [100, 101, 102, 103]},
        {"id": "c.bin:1", "tokens": [104, 105, 106, 107]},
    ]
    np.arange(4, dtype=np.uint32).tofile(tmp_path / "wide.bin")
    assert _records(tmp_path / "wide.bin", CorpusSpec(sequence_length=2, token_dtype="uint32")) == [
        {"id": "wide.bin:0", "tokens": [0, 1]},
        {"id": "wide.bin:1", "tokens": [2, 3]},
    ]
    with pytest.raises(InputError, match="rows of 4 tokens, not the sequence length 3"):
        _records(shards / "a.npy", CorpusSpec(sequence_length=3))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no token shards"):
        _records(tmp_path / "empty", spec)


def test_the_jsonl_written_is_training_data_like_any_other(tmp_path):
    np.save(tmp_path / "t.npy", np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64))
    count = write_jsonl(tmp_path / "t.npy", CorpusSpec(sequence_length=3), tmp_path / "train.jsonl")
    examples = list(stream_training_jsonl(lambda: file_lines(tmp_path / "train.jsonl"), "x"))
    assert count == 2 and [example.tokens for example in examples] == [(1, 2, 3), (4, 5, 6)]
    tokenizer = VocabularyTokenizer(7)
    sequences = tokenize_training(tokenizer, examples, max_length=2)  # tokens as given, truncated
    assert [sequence.input_ids.tolist() for sequence in sequences] == [[1, 2], [4, 5]]
    assert [example.text for example in rendered(tokenizer, examples)] == ["1 2 3", "4 5 6"]
    with pytest.raises(InputError, match="token id 9 is outside the tokenizer's vocabulary of 7"):
        tokenize_training(tokenizer, training_examples([{"tokens": [1, 9]}], "x"), 8)
    for bad, expected in ((["a", 1], "list of non-negative integer"), ([1], "fewer than 2"), ([-1, 2], "non-negative")):
        with pytest.raises(InputError, match=expected):
            training_examples([{"tokens": bad}], "x")
    assert json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0]) == {"id": "t.npy:0", "tokens": [1, 2, 3]}
