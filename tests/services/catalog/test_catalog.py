"""The catalog (services/catalog): one name/parse pair per shared resource, infos that write back the
metadata they were read from, one listing and deletion, and one way to link a directory in place.
A local store in a temporary directory; no servers."""

from __future__ import annotations

import dataclasses
import json

import pytest

from services.catalog import datasets, factor_sets, indexes, results
from services.catalog.datasets import DATASETS, DatasetInfo, DatasetWriter
from services.catalog.factor_sets import FACTOR_SETS, FactorSetInfo
from services.catalog.indexes import INDEXES, IndexInfo
from services.catalog.results import RESULTS, ResultInfo
from services.engine.data import tokenize_training
from services.engine.factor_io import to_artifact
from services.engine.fit import FitConfig, fit_factors
from services.errors import InputError, IntegrityError, NotFoundError, PreconditionError
from services.storage import MANIFEST, LocalStore, PrefixedStore
from tests.support.reference import IntTokenizer
from tests.support.tiny import random_examples, tiny_model

# (collection, path function, parse function, the collection in names, its store root)
PAIRS = [
    (DATASETS, datasets.dataset_path, datasets.parse_dataset_path, "datasets", "datasets/"),
    (FACTOR_SETS, factor_sets.factor_set_path, factor_sets.parse_factor_set_path, "factorSets", "factors/"),
    (INDEXES, indexes.index_path, indexes.parse_index_path, "indexes", "indexes/"),
    (RESULTS, results.result_path, results.parse_result_path, "results", "results/"),
]


@pytest.mark.parametrize(("collection", "path", "parse", "name", "root"), PAIRS, ids=[p[3] for p in PAIRS])
def test_each_resource_has_one_name_and_parse_pair_and_its_store_prefix(collection, path, parse, name, root):
    assert path("abc_1-2") == f"{name}/abc_1-2"
    assert parse(path("abc_1-2"), "field") == "abc_1-2"
    assert collection.prefix("abc_1-2") == f"{root}abc_1-2/"  # the stored layout: factorSets live at factors/
    assert collection.prefix_of(path("x")) == f"{root}x/"
    assert collection.prefix_of(f"{path('x')}/shards/0") == ""  # a target that names no artifact


@pytest.mark.parametrize(("collection", "path", "parse", "name", "root"), PAIRS, ids=[p[3] for p in PAIRS])
@pytest.mark.parametrize(
    "bad", ["", "abc", "{name}/", "{name}/a/b", "{name}/a b", "{name}/" + "x" * 65, "{other}/abc", "/{name}/abc"]
)
def test_a_bad_name_is_invalid_argument_naming_the_field(collection, path, parse, name, root, bad):
    other = "operations" if name != "operations" else "datasets"
    text = bad.format(name=name, other=other)
    with pytest.raises(InputError) as raised:
        parse(text, "the_field")
    assert raised.value.code == "INVALID_ARGUMENT" and raised.value.field == "the_field"
    assert str(raised.value) == f"the_field must look like '{name}/ID', got {text!r}"


# Metadata as the code before the catalog wrote it (gradient_svc/stages.py's register and index
# publish, query_svc/stages.py's result), so the stored formats are proven unchanged.
DATASET = {
    "kind": "dataset",
    "name": "datasets/c0123",
    "display_name": "train",
    "num_examples": 23,
    "num_shards": 3,
    "shard_size": 10,
    "max_length": 64,
    "num_tokens": 187,
    "tokenizer_fingerprint": "ab12",
    "create_time": 1700000000.25,
}
INDEX = {
    "kind": "index",
    "format_version": 1,
    "name": "indexes/i1",
    "spec": {"projection": "svd", "rank": 16, "dim": 32, "seed": 0, "storage_dtype": "bfloat16", "query_rank": 16},
    "strategy": "ekfac",
    "factor_set": "factorSets/f1",
    "model_path": "/models/tiny",
    "model_fingerprint": "fp",
    "tokenizer_fingerprint": "ab12",
    "damping": {"factor": 0.1, "absolute": None, "policy": "0.1 x mean eigenvalue", "values": {"h.0.mlp": 0.5}},
    "modules": ["h.0.mlp"],
    "bytes_per_sequence": 1024,
    "create_time": 1700000001.0,
    "parts": [
        {
            "dataset": "datasets/c0123",
            "start": 0,
            "num_examples": 23,
            "shards": [
                {"shard": 0, "count": 10, "blocks": ["p000-s00000-b0000.safetensors"]},
                {"shard": 1, "count": 13, "blocks": [f"p000-s00001-b000{block}.safetensors" for block in (0, 1)]},
            ],
        },
        {
            "dataset": "datasets/c4567",
            "start": 23,
            "num_examples": 5,
            "shards": [{"shard": 0, "count": 5, "blocks": ["p001-s00000-b0000.safetensors"]}],
        },
    ],
    "num_examples": 28,
}
RESULT = {
    "kind": "result",
    "name": "results/r1",
    "result_kind": "pairwise",
    "factor_set": "factorSets/f1",
    "dataset": "datasets/c0123",
    "index": "",
    "num_queries": 2,
    "num_train": 23,
    "modules": ["h.0.mlp", "h.1.mlp"],
    "create_time": 1700000002.0,
}
INDEX_RESULT = {**RESULT, "name": "results/r2", "dataset": "", "index": "indexes/i1"}


@pytest.fixture(scope="module")
def factor_set():
    """A small fitted factor set (the engine's own writer gives its metadata)."""
    model = tiny_model("llama")
    return fit_factors(model, IntTokenizer(), random_examples(8), FitConfig(strategy="ekfac", modules="mlp"))


@pytest.mark.parametrize(
    ("info_type", "metadata"),
    [(DatasetInfo, DATASET), (IndexInfo, INDEX), (ResultInfo, RESULT), (ResultInfo, INDEX_RESULT)],
    ids=["dataset", "index", "result", "index result"],
)
def test_an_info_writes_back_exactly_the_metadata_it_was_read_from(info_type, metadata):
    if info_type is IndexInfo:  # format 1 (before issue 24) is read, and written back as format 2
        metadata = {**metadata, "format_version": 2, "spec": {**metadata["spec"], "energy": 1.0, "budget": 0}}
    info = info_type.from_metadata(json.loads(json.dumps(metadata)), "it")
    assert info.to_metadata() == metadata
    assert json.dumps(info.to_metadata(), sort_keys=True) == json.dumps(metadata, sort_keys=True)
    assert dataclasses.is_dataclass(info) and info.__dataclass_params__.frozen


def test_an_index_of_format_1_reads_as_every_pair_and_a_later_format_is_refused_naming_the_rebuild():
    info = IndexInfo.from_metadata(json.loads(json.dumps(INDEX)), "it")
    assert info.spec.energy == 1.0 and info.spec.budget == 0 and info.spec.storage_dtype == "bfloat16"
    assert info.to_metadata()["format_version"] == 2
    with pytest.raises(PreconditionError, match=r"format 3.*rebuild it with `influence index build`"):
        IndexInfo.from_metadata({**INDEX, "format_version": 3}, "it")


def test_a_factor_set_info_writes_back_the_engines_metadata(factor_set):
    metadata, _ = to_artifact(factor_set)
    metadata = json.loads(json.dumps(metadata))  # as stored
    info = FactorSetInfo.from_metadata(metadata, "f1")
    assert info.to_metadata() == metadata
    assert info.name == "factorSets/f1" and list(info.tracked()) == list(factor_set.modules)
    assert info.files() == [f"{name}.safetensors" for name in factor_set.modules]
    with pytest.raises(NotFoundError, match="no module 'nope'"):
        info.files(["nope"])


def test_the_typed_parts_read_what_the_code_used_to_read_by_key():
    index = IndexInfo.from_metadata(INDEX, "indexes/i1")
    assert (index.id, index.factor_set_id, index.factor_set) == ("i1", "f1", "factorSets/f1")
    assert (index.damping.factor, index.damping.absolute, index.damping.values) == (0.1, None, {"h.0.mlp": 0.5})
    assert index.dataset_ids == ["c0123", "c4567"] and index.num_examples == 28 and index.whitened
    shards = [(number, shard.shard, shard.count) for number, _, shard in index.shards()]
    assert shards == [(0, 0, 10), (0, 1, 13), (1, 0, 5)]
    result = ResultInfo.from_metadata(INDEX_RESULT, "it")
    assert (result.dataset, result.index, result.factor_set) == ("", "indexes/i1", "factorSets/f1")


def test_metadata_of_another_kind_or_incomplete_is_a_precondition_naming_the_artifact():
    with pytest.raises(PreconditionError, match="indexes/i1 is not an index this code reads"):
        IndexInfo.from_metadata({**INDEX, "kind": "factors"}, "indexes/i1")
    incomplete = {key: value for key, value in DATASET.items() if key != "num_shards"}
    with pytest.raises(PreconditionError, match="dataset 'datasets/c0123' has incomplete metadata"):
        DatasetInfo.from_metadata(incomplete, "dataset 'datasets/c0123'")
    with pytest.raises(PreconditionError, match="is not a factor set"):
        FactorSetInfo.from_metadata(DATASET, "f1", "factor set 'factorSets/f1'")


def _register(store, dataset_id: str, count: int = 5) -> DatasetInfo:
    examples = random_examples(count)
    writer = DatasetWriter(store, dataset_id)
    sequences = tokenize_training(IntTokenizer(), examples, 16)
    writer.add_shard(sequences, examples)
    info = DatasetInfo(dataset_id, count, 1, count, 16, sum(s.length for s in sequences), "fp", "", 1.0)
    return writer.publish(info)


def test_published_resources_are_read_listed_and_deleted_through_their_collection(tmp_path, factor_set):
    store = LocalStore(tmp_path / "store")
    for dataset_id in ("b", "a", "c"):
        _register(store, dataset_id)
    assert store.exists("datasets/a/shards/00000.safetensors")  # the stored layout
    page, more = DATASETS.list(store, "", 2)
    assert [info.id for info in page] == ["a", "b"] and more
    page, more = DATASETS.list(store, "b", 2)
    assert [info.id for info in page] == ["c"] and not more
    assert DATASETS.read(store, "a").to_metadata() == json.loads(store.get_bytes("datasets/a/" + MANIFEST))["metadata"]
    DATASETS.delete(store, "b")
    assert not DATASETS.exists(store, "b") and not store.list("datasets/b/")
    with pytest.raises(NotFoundError, match=r"^dataset 'datasets/b' not found$"):
        DATASETS.delete(store, "b")
    with pytest.raises(NotFoundError, match=r"^factor set 'factorSets/f9' not found$"):
        FACTOR_SETS.open(store, "f9")

    info = factor_sets.publish(store, "f1", factor_set)
    assert store.exists("factors/f1/" + MANIFEST) and FACTOR_SETS.read(store, "f1") == info
    loaded = factor_sets.load(store, "f1")
    assert sorted(loaded.modules) == sorted(factor_set.modules)


def test_the_worker_cache_is_filled_by_publishing_and_read_through_one_function(tmp_path, factor_set):
    from services.system.caches import ArtifactCache

    store, cache = LocalStore(tmp_path / "store"), ArtifactCache()
    factor_sets.publish(store, "f1", factor_set, cache)
    store.delete_prefix("factors/f1/")  # only the cache can answer now
    assert factor_sets.load_cached(cache, store, "f1").strategy == factor_set.strategy
    examples = random_examples(4)
    writer = DatasetWriter(store, "d1", cache)
    writer.add_shard(tokenize_training(IntTokenizer(), examples, 16), examples)
    writer.publish(DatasetInfo("d1", 4, 1, 4, 16, 20))
    store.delete_prefix("datasets/d1/")
    assert len(datasets.shard_sequences(cache, store, "d1", 0)) == 4
    assert [s.index for s in datasets.shard_sequences(cache, store, "d1", 0, limit=2)] == [0, 1]


def test_linking_a_directory_in_place_is_one_checked_step_for_factor_sets_indexes_and_datasets(tmp_path, factor_set):
    store = LocalStore(tmp_path / "store")
    directory = factor_sets.save_factors(factor_set, tmp_path / "factors")
    info = factor_sets.link(store, directory)
    assert factor_sets.link(store, directory) == info  # idempotent
    assert FACTOR_SETS.read(store, info.id) == info and (tmp_path / "store" / "factors" / info.id).is_symlink()

    with pytest.raises(InputError, match=r"^a factor set can be registered by path only when the server's artifact"):
        factor_sets.link(PrefixedStore(store, "tenants/t/"), directory)
    with pytest.raises(InputError, match=r"^an index can be registered by path only"):
        indexes.link(PrefixedStore(store, "tenants/t/"), directory)
    with pytest.raises(NotFoundError, match="no index at"):
        indexes.link(store, tmp_path / "nothing")
    with pytest.raises(PreconditionError, match="is not an index this code reads"):
        indexes.link(store, directory)  # a factor directory is no index

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / MANIFEST).write_bytes((directory / MANIFEST).read_bytes())
    with pytest.raises(IntegrityError, match="is missing or its size differs"):
        factor_sets.link(store, broken)
    escaping = json.loads((directory / MANIFEST).read_bytes())
    escaping["files"] = {"../outside": {"sha256": "0" * 64, "size": 1}}
    (broken / MANIFEST).write_text(json.dumps(escaping))
    with pytest.raises(InputError, match="invalid key"):
        factor_sets.link(store, broken)

    dataset_directory = tmp_path / "datasets-store"
    _register(LocalStore(dataset_directory), "d1")
    linked = datasets.link(store, dataset_directory / "datasets" / "d1")  # the files under shards/ too
    assert DATASETS.read(store, "d1") == linked


def test_a_datasets_records_keep_each_lines_number_and_older_shards_read_without_one(tmp_path):
    """DatasetView.record: id, text and the 1-based line the example was read from; a shard
    written before lines were kept (records without "line") reads with line None."""
    from services.system.caches import ArtifactCache

    store = LocalStore(tmp_path / "store")
    read = [dataclasses.replace(example, line=3 * n + 2) for n, example in enumerate(random_examples(3))]
    writer = DatasetWriter(store, "lines")
    writer.add_shard(tokenize_training(IntTokenizer(), read, 16), read)
    writer.publish(DatasetInfo("lines", 3, 1, 3, 16, 20))
    view = datasets.DatasetView(ArtifactCache(), store, "lines")
    assert [view.record(i) for i in range(3)] == [datasets.TrainingRecord(e.id, e.text, e.line) for e in read]
    _register(store, "old", 2)  # examples not read from a file: their records carry no "line"
    assert all("line" not in record for record in datasets.load_records(DATASETS.open(store, "old").reader, 0))
    assert datasets.DatasetView(ArtifactCache(), store, "old").record(1).line is None
