"""Registered datasets, as the other services read them: the artifact datasets/{id}/ holds each
shard's packed token ids (`layout.shard_tokens`) and records (`layout.shard_records`), and its
metadata describes it. Every read is checked against the manifest."""

from __future__ import annotations

import json

from ..engine.data import TokenizedSequence, unpack_sequences
from ..rpc import validation
from ..storage import ArtifactReader, ArtifactStore, open_artifact
from ..system import layout
from ..system.context import WorkerContext


def dataset_artifact(store: ArtifactStore, dataset_id: str) -> ArtifactReader:
    """The published dataset (NotFoundError if absent); its metadata describes it."""
    return open_artifact(store, layout.dataset_prefix(dataset_id), f"dataset 'datasets/{dataset_id}'")


def dataset_metadata(store: ArtifactStore, dataset_id: str) -> dict:
    """The published dataset's metadata (NotFoundError if absent)."""
    return dataset_artifact(store, dataset_id).metadata


def check_dataset_size(sequences: int, limit: int, source: str, field: str = "") -> None:
    """ResourceExhaustedError if a dataset of this many training sequences is over the server's
    --max-dataset-sequences (`limit`; 0: none). RegisterDataset checks what it reads (an upload, a
    file:// path) before submitting; the register task checks again whatever it reads, the only
    check an s3:// source gets, and fails its job at once (the error is the caller's fault)."""
    what = f"{source}: the dataset has {sequences} sequences"
    validation.within_limit(sequences, limit, "max_dataset_sequences", what, field)


def load_shard(dataset: ArtifactReader, shard: int) -> list[TokenizedSequence]:
    """A shard's sequences, with their global indices."""
    return unpack_sequences(dataset.read_tensors(layout.shard_tokens(shard)))


def load_records(dataset: ArtifactReader, shard: int) -> list[dict]:
    """A shard's {"id", "text"} records, in shard order."""
    return json.loads(dataset.read_bytes(layout.shard_records(shard)))


def shard_sequences(
    context: WorkerContext, dataset_id: str, shard: int, limit: int | None = None
) -> list[TokenizedSequence]:
    """`load_shard` through the worker's cache (a published dataset never changes, and a fit's two
    passes and a score pass all read the same shards), cut at global index `limit` if given."""
    sequences = context.artifacts.get(
        ("shard", dataset_id, shard), lambda: load_shard(dataset_artifact(context.store, dataset_id), shard)
    )
    return sequences if limit is None else [sequence for sequence in sequences if sequence.index < limit]


class DatasetView:
    """Lazy access to a dataset's sequences (through the worker's shard cache) and records, by
    global index."""

    def __init__(self, context: WorkerContext, dataset_id: str):
        self.context, self.dataset_id = context, dataset_id
        self.artifact = dataset_artifact(context.store, dataset_id)
        self._records: dict[int, list[dict]] = {}

    def _shard(self, index: int) -> tuple[int, int]:
        return divmod(index, self.artifact.metadata["shard_size"])

    def sequence(self, index: int) -> TokenizedSequence:
        shard, offset = self._shard(index)
        return shard_sequences(self.context, self.dataset_id, shard)[offset]

    def record(self, index: int) -> tuple[str, str]:
        shard, offset = self._shard(index)
        if shard not in self._records:
            self._records[shard] = load_records(self.artifact, shard)
        entry = self._records[shard][offset]
        return entry["id"], entry["text"]
