"""Indexes as artifacts: indexes/{id}/ holds the block files of every part (one part per indexed
dataset; an append adds one) and manifest.json, whose metadata describes the index:

    kind "index", format_version, name, spec (engine.index.IndexSpec), strategy, factor_set,
    model_path, model_fingerprint, tokenizer_fingerprint,
    damping {factor, absolute, policy, values per module} (the whitening's; queries must match),
    modules (model order), bytes_per_sequence, num_examples, create_time,
    parts [{dataset, start, num_examples, shards [{shard, count, blocks [file names]}]}]
A sequence's global index is its part's `start` plus its index in the part's dataset. Blocks
hold "index" [n] (global) and each module's compressed gradients (engine/index.py).
Publishing rewrites the manifest (files of earlier parts stay as they are), so readers see the
index before or after an append, never a mix.
"""

from __future__ import annotations

from pathlib import Path

from ..engine.data import TokenizedSequence
from ..errors import InputError, NotFoundError, PreconditionError
from ..storage import (
    MANIFEST,
    ArtifactReader,
    ArtifactStore,
    FileEntry,
    LocalStore,
    Manifest,
    is_published,
    open_artifact,
)
from ..system import layout
from ..system.context import WorkerContext
from .datasets import DatasetView, dataset_artifact, load_records

KIND = "index"
FORMAT_VERSION = 1


def index_artifact(store: ArtifactStore, index_id: str) -> ArtifactReader:
    """The published index indexes/{id} (NotFoundError if absent; PreconditionError if not an index)."""
    reader = open_artifact(store, layout.index_prefix(index_id), f"index 'indexes/{index_id}'")
    metadata = reader.metadata
    if metadata.get("kind") != KIND or metadata.get("format_version") != FORMAT_VERSION:
        raise PreconditionError(f"indexes/{index_id} is not an index this code reads (format {FORMAT_VERSION})")
    return reader


def dataset_of(store: ArtifactStore, metadata: dict) -> dict:
    """The metadata of the index's first dataset (max_length, tokenizer: every part shares them)."""
    return dataset_artifact(store, metadata["parts"][0]["dataset"].removeprefix("datasets/")).metadata


def shard_list(metadata: dict) -> list[tuple[int, dict, dict]]:
    """Every (part number, part, shard) of an index, in order: the index's score tasks."""
    return [(number, part, shard) for number, part in enumerate(metadata["parts"]) for shard in part["shards"]]


def publish(store: ArtifactStore, index_id: str, metadata: dict, files: dict[str, FileEntry]) -> None:
    """Write the index's manifest (files stored already): it is visible, or updated, from now on."""
    manifest = Manifest(dict(sorted(files.items())), metadata)
    store.put_bytes(layout.index_prefix(index_id) + MANIFEST, manifest.to_bytes())


def existing_ids(store: ArtifactStore, metadata: dict) -> set[str]:
    """The example ids of every part of an index (an append must not repeat them)."""
    ids: set[str] = set()
    for part in metadata["parts"]:
        dataset = dataset_artifact(store, part["dataset"].removeprefix("datasets/"))
        for shard in range(dataset.metadata["num_shards"]):
            ids.update(record["id"] for record in load_records(dataset, shard))
    return ids


class IndexView:
    """An index's training sequences and records by global index, through its datasets."""

    def __init__(self, context: WorkerContext, metadata: dict):
        self.parts = [
            (part["start"], part["num_examples"], DatasetView(context, part["dataset"].removeprefix("datasets/")))
            for part in metadata["parts"]
        ]

    def _locate(self, index: int) -> tuple[int, DatasetView]:
        for start, count, view in self.parts:
            if start <= index < start + count:
                return index - start, view
        raise PreconditionError(f"sequence {index} is not in the index")

    def sequence(self, index: int) -> TokenizedSequence:
        local, view = self._locate(index)
        sequence = view.sequence(local)
        return TokenizedSequence(index, sequence.input_ids, sequence.target_mask)

    def record(self, index: int) -> tuple[str, str]:
        local, view = self._locate(index)
        return view.record(local)


def link(store: ArtifactStore, directory: Path) -> dict:
    """Register an index directory written by `influence index build` in place: the index itself
    and each of its datasets (directory/datasets/{id}) are linked into the local store. Returns
    the index's metadata."""
    if not isinstance(store, LocalStore):
        raise InputError(
            "an index can be registered by path only when the server's artifact store is a local directory; "
            "build it on the server instead (influence index build --server)"
        )
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise NotFoundError(f"no index at {directory} (missing {MANIFEST})")
    manifest = Manifest.from_bytes((directory / MANIFEST).read_bytes(), str(directory / MANIFEST))
    metadata = manifest.metadata
    if metadata.get("kind") != KIND or metadata.get("format_version") != FORMAT_VERSION:
        raise PreconditionError(f"{directory} is not an index this code reads (format {FORMAT_VERSION})")
    for part in metadata["parts"]:
        dataset_id = part["dataset"].removeprefix("datasets/")
        if not is_published(store, layout.dataset_prefix(dataset_id)):
            store.link_directory(layout.dataset_prefix(dataset_id), directory / "datasets" / dataset_id)
    index_id = metadata["name"].removeprefix("indexes/")
    if is_published(store, layout.index_prefix(index_id)):
        if store.get_bytes(layout.index_prefix(index_id) + MANIFEST) == manifest.to_bytes():
            return metadata
        store.delete_prefix(layout.index_prefix(index_id))  # an older version of this index: replaced
    store.link_directory(layout.index_prefix(index_id), directory, writable=True)  # an append adds its blocks there
    return metadata
