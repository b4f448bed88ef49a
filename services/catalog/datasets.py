"""Registered datasets: datasets/{id}/ holds each shard's packed token ids
(shards/{shard:05d}.safetensors, engine.data.pack_sequences) and records (shards/{shard:05d}.json,
a list of {"id", "text", "line"}: "line" the sequence's 1-based line in the registered TRAIN.jsonl,
absent in datasets registered before it was recorded); its metadata (DatasetInfo) describes it.
Every read is checked against the manifest.

    DATASETS.open(store, id) / .read / .list / .delete      (catalog/collection.py)
    DatasetWriter(store, id, cache).add_shard(...) ... .publish(info)
    ShardRecords()                                          a shard's records file, written as they come
    shard_sequences(cache, store, id, shard)                a shard's sequences, through the worker's cache
    DatasetView(cache, store, id)                           sequences and records (TrainingRecord) by global index
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..engine.data import TokenizedSequence, pack_sequences, unpack_sequences
from ..engine.records import TrainingExample
from ..storage import ArtifactReader, ArtifactStore, ArtifactWriter
from .collection import Cache, Collection, reading_metadata
from .links import linkable_manifest

KIND = "dataset"


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's metadata: `num_examples` sequences in `num_shards` shards of `shard_size`, each
    cut at `max_length` tokens (`num_tokens` in all) by the tokenizer with that fingerprint."""

    id: str
    num_examples: int
    num_shards: int
    shard_size: int
    max_length: int
    num_tokens: int
    tokenizer_fingerprint: str = ""
    display_name: str = ""
    create_time: float | None = None

    @property
    def name(self) -> str:
        return dataset_path(self.id)

    @property
    def mean_tokens(self) -> float:
        """Tokens per sequence, on average."""
        return self.num_tokens / max(self.num_examples, 1)

    def sequences_within(self, limit: int | None) -> int:
        """How many of its sequences a job limited to the first `limit` (None: all) uses."""
        return min(self.num_examples, limit or self.num_examples)

    def shard_of(self, index: int) -> tuple[int, int]:
        """(shard, position in the shard) of the sequence with global index `index`."""
        return divmod(index, self.shard_size)

    @classmethod
    def from_metadata(cls, metadata: dict, where: str = "dataset") -> DatasetInfo:
        with reading_metadata(where):
            return cls(
                id=parse_dataset_path(metadata["name"]),
                num_examples=metadata["num_examples"],
                num_shards=metadata["num_shards"],
                shard_size=metadata["shard_size"],
                max_length=metadata["max_length"],
                num_tokens=metadata["num_tokens"],
                tokenizer_fingerprint=metadata.get("tokenizer_fingerprint", ""),
                display_name=metadata.get("display_name", ""),
                create_time=metadata.get("create_time"),
            )

    def to_metadata(self) -> dict:
        fields = dataclasses.asdict(self)
        return {"kind": KIND, "name": self.name, **{key: value for key, value in fields.items() if key != "id"}}


@dataclass(frozen=True)
class TrainingRecord:
    """A training sequence as results name it: its id, its (rendered) text and its 1-based line in
    the TRAIN.jsonl it was registered from (None for datasets registered before lines were kept)."""

    id: str
    text: str
    line: int | None = None


def _info(dataset_id: str, metadata: dict) -> DatasetInfo:
    return DatasetInfo.from_metadata(metadata, DATASETS.describe(dataset_id))


DATASETS: Collection[DatasetInfo] = Collection("datasets", "datasets/", "dataset", _info)


def dataset_path(dataset_id: str) -> str:
    """ "datasets/{id}" """
    return DATASETS.path(dataset_id)


def parse_dataset_path(name: str, field: str = "name") -> str:
    """The id in "datasets/{id}" (InputError naming `field` otherwise)."""
    return DATASETS.parse(name, field)


def _tokens_file(shard: int) -> str:
    return f"shards/{shard:05d}.safetensors"


def _records_file(shard: int) -> str:
    return f"shards/{shard:05d}.json"


def _shard_key(dataset_id: str, shard: int) -> tuple:
    """A shard's sequences in a worker's cache."""
    return ("shard", dataset_id, shard)


class ShardRecords:
    """A shard's records file ({"id", "text", "line"} per sequence, in order: the bytes of
    `json.dumps` of the list; "line" only for examples read from a file) written to a temporary
    file as the examples come, so that a shard's texts are never in memory together:
    `with ShardRecords() as records:` add them, then hand it to DatasetWriter.add_shard; the file
    goes when the block ends."""

    def __init__(self):
        self._directory = tempfile.TemporaryDirectory(prefix="shard-records-")
        self.path = Path(self._directory.name) / "records.json"
        self._handle = self.path.open("wb")
        self._handle.write(b"[")
        self.count = 0

    def add(self, examples: Iterable[TrainingExample]) -> None:
        for example in examples:
            separator = b", " if self.count else b""
            record = {"id": example.id, "text": example.text}
            if example.line is not None:
                record["line"] = example.line
            self._handle.write(separator + json.dumps(record).encode())
            self.count += 1

    def finish(self) -> Path:
        """The complete file (nothing may be added after)."""
        if not self._handle.closed:
            self._handle.write(b"]")
            self._handle.close()
        return self.path

    def __enter__(self) -> ShardRecords:
        return self

    def __exit__(self, *_) -> None:
        self._handle.close()
        self._directory.cleanup()


class DatasetWriter:
    """Writes a dataset's shards, then publishes it (manifest last). With `cache` (the worker's),
    each shard's sequences are kept there as written (within its budget), so a job that follows on
    this worker reads none back."""

    def __init__(self, store: ArtifactStore, dataset_id: str, cache: Cache | None = None):
        self.dataset_id, self.cache = dataset_id, cache
        self._writer = ArtifactWriter(store, DATASETS.prefix(dataset_id))
        self.num_shards = 0

    def add_shard(self, sequences: list[TokenizedSequence], examples: Iterable[TrainingExample] | ShardRecords) -> None:
        """The next shard: its sequences and the records ({"id", "text"}) they were tokenised from
        (examples, or a ShardRecords written as they were tokenised)."""
        shard = self.num_shards
        if isinstance(examples, ShardRecords):
            self._writer.add_file(_records_file(shard), examples.finish())
        else:
            with ShardRecords() as records:
                records.add(examples)
                self._writer.add_file(_records_file(shard), records.finish())
        self._writer.add_tensors(_tokens_file(shard), pack_sequences(sequences))
        if self.cache is not None:
            self.cache.put(_shard_key(self.dataset_id, shard), sequences)
        self.num_shards += 1

    def publish(self, info: DatasetInfo) -> DatasetInfo:
        """Write the manifest: the dataset is visible from now on."""
        self._writer.publish(info.to_metadata())
        return info


def load_shard(dataset: ArtifactReader, shard: int) -> list[TokenizedSequence]:
    """A shard's sequences, with their global indices."""
    return unpack_sequences(dataset.read_tensors(_tokens_file(shard)))


def load_records(dataset: ArtifactReader, shard: int) -> list[dict]:
    """A shard's {"id", "text", "line"?} records, in shard order."""
    return json.loads(dataset.read_bytes(_records_file(shard)))


def shard_sequences(
    cache: Cache, store: ArtifactStore, dataset_id: str, shard: int, limit: int | None = None
) -> list[TokenizedSequence]:
    """`load_shard` through the worker's cache (a published dataset never changes, and a fit's two
    passes and a score pass all read the same shards), cut at global index `limit` if given."""
    sequences = cache.get(
        _shard_key(dataset_id, shard), lambda: load_shard(DATASETS.open(store, dataset_id).reader, shard)
    )
    return sequences if limit is None else [sequence for sequence in sequences if sequence.index < limit]


def example_ids(store: ArtifactStore, dataset_id: str) -> set[str]:
    """The ids of every record of the dataset."""
    dataset = DATASETS.open(store, dataset_id)
    return {record["id"] for shard in range(dataset.info.num_shards) for record in load_records(dataset.reader, shard)}


class DatasetView:
    """Lazy access to a dataset's sequences (through the worker's shard cache) and records, by
    global index."""

    def __init__(self, cache: Cache, store: ArtifactStore, dataset_id: str):
        self.cache, self.store = cache, store
        self.dataset = DATASETS.open(store, dataset_id)
        self._records: dict[int, list[dict]] = {}

    def sequence(self, index: int) -> TokenizedSequence:
        shard, offset = self.dataset.info.shard_of(index)
        return shard_sequences(self.cache, self.store, self.dataset.id, shard)[offset]

    def record(self, index: int) -> TrainingRecord:
        shard, offset = self.dataset.info.shard_of(index)
        if shard not in self._records:
            self._records[shard] = load_records(self.dataset.reader, shard)
        entry = self._records[shard][offset]
        return TrainingRecord(entry["id"], entry["text"], entry.get("line"))


def link(store: ArtifactStore, directory: Path) -> DatasetInfo:
    """Register a dataset directory (one an index directory holds) in place, at the id its
    metadata names."""
    manifest = linkable_manifest(
        store, directory, what="dataset", noun="a dataset", remedy="register it with RegisterDataset instead"
    )
    info = DatasetInfo.from_metadata(manifest.metadata, f"the dataset at {directory}")
    store.link_directory(DATASETS.prefix(info.id), directory)
    return info
