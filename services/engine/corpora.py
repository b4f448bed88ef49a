"""Training corpora as they are shipped, read as TRAIN.jsonl lines: a Parquet file or directory, a
Hugging Face `datasets` save_to_disk directory (Arrow), or pre-tokenized token shards (.npy or raw
.bin arrays of token ids, as Pythia and OLMo ship them). No torch here.

Each is converted, streamed record batch by record batch (pyarrow) or row by row of a memory-mapped
array (numpy), into the JSONL lines the rest of the system reads (engine/records.py):

    a text column        {"id", "text"}        (--text-field, default "text")
    a messages column    {"id", "messages"}    (--messages-field, default "messages"; used when
                                               the text column is absent)
    token shards         {"id", "tokens"}      each row of a 2-D .npy, or each `sequence_length`
                                               tokens of a flat one or of a .bin (a shorter tail
                                               is dropped, as the trainers that wrote them do)
Ids: an "id" column when there is one, else "{file}:{row}". The JSONL is the dataset's content:
registered, limited and content-addressed exactly as an uploaded TRAIN.jsonl. Memory holds one
record batch (at most _BATCH_ROWS rows) or one sequence; disk holds the JSONL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, NotFoundError

# raw .bin (and header-less .npy) shards: the dtype of their token ids
TOKEN_DTYPES = ("uint16", "uint32")
_BATCH_ROWS = 1024
_NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class CorpusSpec:
    """How to read a corpus that is not TRAIN.jsonl. `sequence_length` > 0: token shards cut into
    sequences of that many tokens (raw shards hold `token_dtype` ids); else a table read by its
    `text_field` or `messages_field` column."""

    text_field: str = "text"
    messages_field: str = "messages"
    sequence_length: int = 0
    token_dtype: str = "uint16"

    @property
    def tokens(self) -> bool:
        return self.sequence_length > 0

    def validate(self) -> CorpusSpec:
        if self.sequence_length < 0:
            raise InputError(f"sequence length must be >= 1, got {self.sequence_length}", field="sequence_length")
        if self.token_dtype not in TOKEN_DTYPES:
            raise InputError(f"token dtype must be one of {', '.join(TOKEN_DTYPES)}, got {self.token_dtype!r}")
        if not self.text_field or not self.messages_field:
            raise InputError("the text and messages fields must be column names, not empty")
        return self


_CORPUS_SUFFIXES = (".parquet", ".arrow", ".npy", ".bin")


def is_jsonl(path: Path) -> bool:
    """A plain file that is neither Parquet nor a token shard: TRAIN.jsonl as before."""
    return path.is_file() and path.suffix not in _CORPUS_SUFFIXES


def is_jsonl_name(uri: str) -> bool:
    """An object's name that is TRAIN.jsonl's: not a prefix ("…/") nor a Parquet, Arrow or token file."""
    return not uri.endswith("/") and Path(uri).suffix not in _CORPUS_SUFFIXES


def write_jsonl(path: Path, spec: CorpusSpec, out: Path) -> int:
    """The corpus at `path` (a file or directory) as TRAIN.jsonl lines in `out`; returns the lines written."""
    count = 0
    with out.open("w", encoding="utf-8") as handle:
        for record in corpus_records(path, spec):
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    if not count:
        raise InputError(f"the corpus at {path} holds no sequences")
    return count


def corpus_records(path: Path, spec: CorpusSpec) -> Iterator[dict]:
    """The corpus' records, one at a time (see the module's docstring)."""
    if not path.exists():
        raise NotFoundError(f"training data not found: {path}")
    if spec.tokens:
        for shard in _files(path, (".npy", ".bin"), "token shards (.npy or .bin)"):
            yield from _token_records(shard, spec)
        return
    for name, batches in _tables(path):
        yield from _table_records(name, batches, spec)


def _files(path: Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in suffixes and p.is_file())
    if not files or any(file.suffix not in suffixes for file in files):
        raise InputError(f"{path} holds no {what}")
    return files


def _tables(path: Path) -> Iterator[tuple[str, Iterator]]:
    """(name, record batches) of each file of a Parquet file or directory, or of a `datasets`
    save_to_disk directory (its state.json names its Arrow files, in order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_dir() and (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise InputError(
            f"{path} is a DatasetDict: give one split's directory ({', '.join(f'{path}/{s}' for s in splits)})"
        )
    if path.is_dir() and (path / "state.json").is_file():
        files = [path / entry["filename"] for entry in json.loads((path / "state.json").read_text())["_data_files"]]
        for file in files:
            with pa.memory_map(str(file)) as source:
                yield file.name, iter(pa.ipc.open_stream(source))
        return
    for file in _files(path, (".parquet",), "Parquet files (.parquet), nor a datasets save_to_disk directory"):
        try:
            parquet = pq.ParquetFile(file)
        except (pa.ArrowInvalid, OSError) as error:
            raise InputError(f"{file}: not a readable Parquet file ({str(error).splitlines()[0][:200]})") from None
        with parquet:
            yield file.name, parquet.iter_batches(batch_size=_BATCH_ROWS)


def _table_records(name: str, batches, spec: CorpusSpec) -> Iterator[dict]:
    row = 0
    for batch in batches:
        columns = batch.schema.names
        field = spec.text_field if spec.text_field in columns else spec.messages_field
        if field not in columns:
            raise InputError(
                f"{name}: no column {spec.text_field!r} nor {spec.messages_field!r} (columns: {', '.join(columns)}); "
                "name yours with --text-field or --messages-field"
            )
        values = batch.column(field).to_pylist()
        ids = batch.column("id").to_pylist() if "id" in columns else [None] * len(values)
        key = "text" if field == spec.text_field else "messages"
        for example_id, value in zip(ids, values, strict=True):
            yield {"id": str(example_id) if example_id is not None else f"{name}:{row}", key: value}
            row += 1


def _token_records(shard: Path, spec: CorpusSpec) -> Iterator[dict]:
    import numpy as np

    with shard.open("rb") as handle:
        headed = handle.read(len(_NPY_MAGIC)) == _NPY_MAGIC
    try:
        array = np.load(shard, mmap_mode="r") if headed else np.memmap(shard, dtype=spec.token_dtype, mode="r")
    except (ValueError, OSError) as error:
        raise InputError(f"{shard}: not a readable token array ({str(error).splitlines()[0][:200]})") from None
    if array.dtype.kind not in "iu":
        raise InputError(f"{shard}: token ids must be integers, the array holds {array.dtype}")
    if array.ndim == 2:
        if array.shape[1] != spec.sequence_length:
            raise InputError(
                f"{shard}: rows of {array.shape[1]} tokens, not the sequence length {spec.sequence_length}"
            )
        rows = (array[row] for row in range(array.shape[0]))
    elif array.ndim == 1:
        rows = (
            array[start : start + spec.sequence_length]
            for start in range(0, array.shape[0] - spec.sequence_length + 1, spec.sequence_length)
        )
    else:
        raise InputError(f"{shard}: a token array is 1-D or 2-D, this one has shape {tuple(array.shape)}")
    for row, tokens in enumerate(rows):
        yield {"id": f"{shard.name}:{row}", "tokens": [int(token) for token in tokens]}
