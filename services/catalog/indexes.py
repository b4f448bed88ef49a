"""Indexes: indexes/{id}/ holds the block files of every part (one part per indexed dataset; an
append adds one) and manifest.json, whose metadata (IndexInfo) describes the index:

    kind "index", format_version, name, spec (engine.index.IndexSpec), strategy, factor_set,
    model_path, model_fingerprint, tokenizer_fingerprint,
    damping {factor, absolute, policy, values per module} (the whitening's; queries must match),
    modules (model order), bytes_per_sequence (the mean stored), num_examples, create_time,
    parts [{dataset, start, num_examples, shards [{shard, count, blocks [file names]}]}]
A sequence's global index is its part's `start` plus its index in the part's dataset. Blocks
hold "index" [n] (global) and each module's compressed gradients (engine/index.py).
Publishing rewrites the manifest (files of earlier parts stay as they are), so readers see the
index before or after an append, never a mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.data import TokenizedSequence
from ..engine.index import IndexSpec
from ..errors import PreconditionError
from ..storage import MANIFEST, ArtifactStore, FileEntry, Manifest
from . import datasets
from .collection import Cache, Collection, Published, reading_metadata
from .datasets import DATASETS, DatasetInfo, DatasetView, TrainingRecord, dataset_path, parse_dataset_path
from .factor_sets import factor_set_path, parse_factor_set_path
from .links import linkable_manifest

KIND = "index"
# 2 (issue 24): svd blocks hold the kept factor pairs of each sequence and their counts, int8 with
# scales where stored so, and the spec says its energy and budget. Format 1 (svd blocks u [n, d_out, R],
# v [n, d_in, R]; every pair of every module) is still read, its spec as energy 1 and no budget; an
# append onto it publishes format 2 (its old blocks stay as they are: engine/index_scan.py reads both).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
FORMAT_1_SPEC = {"energy": 1.0, "budget": 0}


@dataclass(frozen=True)
class IndexShard:
    """One shard of a part: `count` sequences in the block files `blocks`, in order."""

    shard: int
    count: int
    blocks: tuple[str, ...]

    def to_metadata(self) -> dict:
        return {"shard": self.shard, "count": self.count, "blocks": list(self.blocks)}


@dataclass(frozen=True)
class IndexPart:
    """One indexed dataset: its sequences are the index's `start` .. `start + num_examples - 1`."""

    dataset_id: str
    start: int
    num_examples: int
    shards: tuple[IndexShard, ...]
    # the batch sizes its index_shard passes ran at (a lowered one after an out-of-memory error,
    # engine/budget.within_memory); empty in a part built before they were recorded
    batch_sizes: tuple[int, ...] = ()

    @property
    def dataset(self) -> str:
        """The dataset's name."""
        return dataset_path(self.dataset_id)

    @classmethod
    def from_metadata(cls, metadata: dict) -> IndexPart:
        return cls(
            parse_dataset_path(metadata["dataset"]),
            metadata["start"],
            metadata["num_examples"],
            tuple(IndexShard(s["shard"], s["count"], tuple(s["blocks"])) for s in metadata["shards"]),
            tuple(metadata.get("batch_sizes", ())),
        )

    def to_metadata(self) -> dict:
        return {
            "dataset": self.dataset,
            "start": self.start,
            "num_examples": self.num_examples,
            "shards": [shard.to_metadata() for shard in self.shards],
            **({"batch_sizes": list(self.batch_sizes)} if self.batch_sizes else {}),
        }


@dataclass(frozen=True)
class IndexDamping:
    """The damping the index was whitened with: the request's `factor` and `absolute`, the policy
    in words, and the value each module got."""

    factor: float
    absolute: float | None
    policy: str
    values: dict[str, float]

    def to_metadata(self) -> dict:
        return {"factor": self.factor, "absolute": self.absolute, "policy": self.policy, "values": self.values}


@dataclass(frozen=True)
class IndexInfo:
    id: str
    spec: IndexSpec
    strategy: str
    factor_set_id: str
    model_path: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    damping: IndexDamping
    modules: tuple[str, ...]
    bytes_per_sequence: int
    create_time: float | None
    parts: tuple[IndexPart, ...]

    @property
    def name(self) -> str:
        return index_path(self.id)

    @property
    def factor_set(self) -> str:
        """The name of the factor set it was built with."""
        return factor_set_path(self.factor_set_id)

    @property
    def num_examples(self) -> int:
        return sum(part.num_examples for part in self.parts)

    @property
    def dataset_ids(self) -> list[str]:
        return [part.dataset_id for part in self.parts]

    @property
    def whitened(self) -> bool:
        """Whether its blocks are whitened with its damping (every projection but `random`)."""
        return self.spec.projection != "random"

    def shards(self) -> list[tuple[int, IndexPart, IndexShard]]:
        """Every (part number, part, shard) of the index, in order: its score tasks."""
        return [(number, part, shard) for number, part in enumerate(self.parts) for shard in part.shards]

    @classmethod
    def from_metadata(cls, metadata: dict, where: str) -> IndexInfo:
        """PreconditionError unless `metadata` describes an index of the format this code reads."""
        if metadata.get("kind") != KIND:
            raise PreconditionError(f"{where} is not an index this code reads")
        version = metadata.get("format_version")
        if version not in READABLE_VERSIONS:
            raise PreconditionError(
                f"{where} is an index of format {version!r}, which this code does not read (it reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}): rebuild it with `influence index build`"
            )
        with reading_metadata(where):
            damping = metadata["damping"]
            spec = metadata["spec"] if version == FORMAT_VERSION else {**metadata["spec"], **FORMAT_1_SPEC}
            return cls(
                id=parse_index_path(metadata["name"]),
                spec=IndexSpec(**spec),
                strategy=metadata["strategy"],
                factor_set_id=parse_factor_set_path(metadata["factor_set"]),
                model_path=metadata["model_path"],
                model_fingerprint=metadata["model_fingerprint"],
                tokenizer_fingerprint=metadata["tokenizer_fingerprint"],
                damping=IndexDamping(damping["factor"], damping["absolute"], damping["policy"], damping["values"]),
                modules=tuple(metadata["modules"]),
                bytes_per_sequence=metadata["bytes_per_sequence"],
                create_time=metadata.get("create_time"),
                parts=tuple(IndexPart.from_metadata(part) for part in metadata["parts"]),
            )

    def to_metadata(self) -> dict:
        return {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "spec": self.spec.to_dict(),
            "strategy": self.strategy,
            "factor_set": self.factor_set,
            "model_path": self.model_path,
            "model_fingerprint": self.model_fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "damping": self.damping.to_metadata(),
            "modules": list(self.modules),
            "bytes_per_sequence": self.bytes_per_sequence,
            "create_time": self.create_time,
            "parts": [part.to_metadata() for part in self.parts],
            "num_examples": self.num_examples,
        }


def _info(index_id: str, metadata: dict) -> IndexInfo:
    return IndexInfo.from_metadata(metadata, index_path(index_id))


INDEXES: Collection[IndexInfo] = Collection("indexes", "indexes/", "index", _info)


def index_path(index_id: str) -> str:
    """ "indexes/{id}" """
    return INDEXES.path(index_id)


def parse_index_path(name: str, field: str = "name") -> str:
    """The id in "indexes/{id}" (InputError naming `field` otherwise)."""
    return INDEXES.parse(name, field)


def block_file(part: int, shard: int, block: int) -> str:
    """In an index artifact: one block of compressed gradients (safetensors; engine/index.py)."""
    return f"p{part:03d}-s{shard:05d}-b{block:04d}.safetensors"


def publish(store: ArtifactStore, info: IndexInfo, files: dict[str, FileEntry]) -> IndexInfo:
    """Write the index's manifest (its files stored already): it is visible, or updated, from now on."""
    manifest = Manifest(dict(sorted(files.items())), info.to_metadata())
    store.put_bytes(INDEXES.prefix(info.id) + MANIFEST, manifest.to_bytes())
    return info


def open_for_job(cache: Cache, store: ArtifactStore, index_id: str, job_id: str) -> Published[IndexInfo]:
    """The index as job `job_id` reads it, opened once per job on this worker. An append during
    the job only adds shards after the ones the job was submitted with, which it ignores."""
    return cache.get(("index", index_id, job_id), lambda: INDEXES.open(store, index_id))


def read_block(cache: Cache, index: Published[IndexInfo], name: str) -> dict[str, torch.Tensor]:
    """A block file's tensors, through the worker's block cache (hot blocks stay in memory)."""
    return cache.get((index.id, name), lambda: index.reader.read_tensors(name))


def first_dataset(store: ArtifactStore, info: IndexInfo) -> DatasetInfo:
    """The index's first dataset (max_length, tokenizer: every part shares them)."""
    return DATASETS.read(store, info.parts[0].dataset_id)


def example_ids(store: ArtifactStore, info: IndexInfo) -> set[str]:
    """The example ids of every part of an index (an append must not repeat them)."""
    return set().union(*(datasets.example_ids(store, dataset_id) for dataset_id in info.dataset_ids))


class IndexView:
    """An index's training sequences and records by global index, through its datasets."""

    def __init__(self, cache: Cache, store: ArtifactStore, info: IndexInfo):
        self.parts = [
            (part.start, part.num_examples, DatasetView(cache, store, part.dataset_id)) for part in info.parts
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

    def sequences(self, count: int) -> list[TokenizedSequence]:
        """The first `count` sequences, in global index order (a sequence's position is its index):
        the training text of a job's shards, e.g. for lexical candidates."""
        return [self.sequence(index) for index in range(count)]

    def record(self, index: int) -> TrainingRecord:
        local, view = self._locate(index)
        return view.record(local)


def link(store: ArtifactStore, directory: Path) -> IndexInfo:
    """Register an index directory written by `influence index build` in place: the index itself
    and each of its datasets (directory/datasets/{id}) are linked into the local store."""
    manifest = linkable_manifest(
        store,
        directory,
        what="index",
        noun="an index",
        remedy="build it on the server instead (influence index build --server)",
    )
    info = IndexInfo.from_metadata(manifest.metadata, str(directory))
    for dataset_id in info.dataset_ids:
        if not DATASETS.exists(store, dataset_id):
            datasets.link(store, Path(directory) / "datasets" / dataset_id)
    prefix = INDEXES.prefix(info.id)
    if INDEXES.exists(store, info.id):
        if store.get_bytes(prefix + MANIFEST) == manifest.to_bytes():
            return info
        store.delete_prefix(prefix)  # an older version of this index: replaced
    store.link_directory(prefix, directory, writable=True)  # an append adds its blocks there
    return info
