"""Job specs as the services register them: the runtime decodes them generically from their field
types, and every spec the code before the registration wrote (literal JSON below, written by
services/system/specs.py's encode_job at 619833f) decodes to the same job and encodes back to the
same bytes (the dead ScoreJob.tfidf key apart, ScoreConfig.bm25, damping_check and bottom_k and
ScoreJob.lexical added at their defaults). No servers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from services.assembly import STAGE_TABLE
from services.engine.fit import FitConfig
from services.engine.index import IndexSpec
from services.engine.model_io import ModelRef
from services.engine.records import Query
from services.engine.score import ScoreConfig
from services.errors import InputError
from services.factor_svc.jobs import FitJob
from services.gradient_svc.jobs import BlocksJob, IndexJob, RegisterJob
from services.query_svc.jobs import ScoreJob, SelfJob
from services.system.specs import Job, decode_job, encode_job

MODEL = '"model": {"device": "", "dtype": "float32", "path": "/models/tiny"}'
SCORE_CONFIG = (
    '"config": {{"batch_size": 8, "damping": null, "damping_factor": {factor}, "max_length": 512, "per_module": false, '
    '"per_token": false, "query_rank": null, "tfidf": 0, "top_k": {top_k}}}'
)
DEFAULT_CONFIG = SCORE_CONFIG.format(factor=0.1, top_k=10)
OLD_SPECS = {
    "register": (
        '{"create_time": 1700000000.5, "dataset_id": "c0123", "display_name": "train", "kind": "register", '
        f'"max_dataset_sequences": 100, "max_length": 64, {MODEL}, "shard_size": 10, "source_uri": "s3://b/k.jsonl"}}'
    ),
    "fit": (
        '{"config": {"batch_size": 8, "cache_gib": 0.5, "fisher": "sampled", "max_examples": 20, "max_length": 512, '
        '"modules": "mlp", "seed": 0, "strategy": "kfac"}, "create_time": 1700000001.0, "dataset_id": "c0123", '
        f'"factor_set_id": "f1", "kind": "fit", {MODEL}, "shards": 3}}'
    ),
    "score": (
        '{"config": {"batch_size": 8, "damping": 0.01, "damping_factor": 0.1, "max_length": 512, "per_module": false, '
        '"per_token": true, "query_rank": 4, "tfidf": 7, "top_k": 5}, "create_time": 1700000002.0, '
        f'"dataset_id": "c0123", "factor_set_id": "f1", "index_id": "", "kind": "score", {MODEL}, '
        '"queries": [{"completion": "b", "group": "g", "id": "q1", "prompt": "a"}, '
        '{"completion": "d", "group": "", "id": "q2", "prompt": "c"}], "report": true, "rescore": 0, '
        '"result_id": "r1", "shards": 3, "tfidf": 0}'
    ),
    "score against an index": (
        f'{{{DEFAULT_CONFIG}, "create_time": 1700000003.0, "dataset_id": "", "factor_set_id": "f1", "index_id": "i1", '
        '"kind": "score", "model": {"device": "cuda", "dtype": "bfloat16", "path": "/models/tiny"}, '
        '"queries": [{"completion": "b", "group": "", "id": "q1", "prompt": "a"}], "report": false, "rescore": 20, '
        '"result_id": "r2", "shards": 2, "tfidf": 0}'
    ),
    "self": (
        f'{{{SCORE_CONFIG.format(factor=0.1, top_k=4)}, "create_time": 1700000004.0, "dataset_id": "c0123", '
        f'"factor_set_id": "f1", "kind": "self", {MODEL}, "result_id": "r3", "shards": 3}}'
    ),
    "blocks": (
        '{"block_size": 8, "create_time": 1700000005.0, "dataset_id": "c0123", "kind": "blocks", '
        f'{MODEL}, "modules": "mlp", "shard": 1}}'
    ),
    "index": (
        '{"base": {"kind": "index", "parts": [{"dataset": "datasets/c0", "start": 0}]}, '
        f'{SCORE_CONFIG.format(factor=0.2, top_k=10)}, "create_time": 1700000006.0, '
        f'"dataset_id": "c0123", "factor_set_id": "f1", "index_id": "i1", "kind": "index", {MODEL}, "part": 1, '
        '"shards": 3, "spec": {"dim": 32, "projection": "svd", "query_rank": 16, "rank": 16, "seed": 0, '
        '"storage_dtype": "bfloat16"}, "start": 23}'
    ),
}
MODEL_REF = ModelRef("/models/tiny", "", "float32")
EXPECTED = {
    "register": RegisterJob(
        MODEL_REF,
        dataset_id="c0123",
        display_name="train",
        shard_size=10,
        max_length=64,
        source_uri="s3://b/k.jsonl",
        max_dataset_sequences=100,
        create_time=1700000000.5,
    ),
    "fit": FitJob(
        MODEL_REF,
        dataset_id="c0123",
        shards=3,
        factor_set_id="f1",
        config=FitConfig(strategy="kfac", max_examples=20, cache_gib=0.5),
        create_time=1700000001.0,
    ),
    "score": ScoreJob(
        MODEL_REF,
        dataset_id="c0123",
        shards=3,
        factor_set_id="f1",
        result_id="r1",
        config=ScoreConfig(damping=0.01, query_rank=4, top_k=5, per_token=True, tfidf=7),
        queries=[Query("q1", "a", "b", "g"), Query("q2", "c", "d")],
        report=True,
        create_time=1700000002.0,
    ),
    "score against an index": ScoreJob(
        ModelRef("/models/tiny", "cuda", "bfloat16"),
        dataset_id="",
        shards=2,
        factor_set_id="f1",
        result_id="r2",
        config=ScoreConfig(),
        queries=[Query("q1", "a", "b")],
        index_id="i1",
        rescore=20,
        create_time=1700000003.0,
    ),
    "self": SelfJob(
        MODEL_REF,
        dataset_id="c0123",
        shards=3,
        factor_set_id="f1",
        result_id="r3",
        config=ScoreConfig(top_k=4),
        create_time=1700000004.0,
    ),
    "blocks": BlocksJob(MODEL_REF, dataset_id="c0123", shard=1, modules="mlp", block_size=8, create_time=1700000005.0),
    "index": IndexJob(
        MODEL_REF,
        dataset_id="c0123",
        shards=3,
        factor_set_id="f1",
        index_id="i1",
        spec=IndexSpec("svd", 16, 32, 0, "bfloat16"),
        config=ScoreConfig(damping_factor=0.2),
        part=1,
        start=23,
        base={"kind": "index", "parts": [{"dataset": "datasets/c0", "start": 0}]},
        create_time=1700000006.0,
    ),
}


@pytest.mark.parametrize("case", list(OLD_SPECS))
def test_a_spec_written_before_the_registration_decodes_to_the_same_job_and_encodes_back(case):
    job = STAGE_TABLE.decode(OLD_SPECS[case].encode())
    assert job == EXPECTED[case]  # dataclass equality: the same classes, nested ones included
    old = json.loads(OLD_SPECS[case])
    if job.kind == "score":
        del old["tfidf"]  # the dead ScoreJob field: ignored when read, no longer written
        for query in old["queries"]:
            query["messages"] = []  # a query's chat, written since chat queries exist (none: a prompt's)
        old["lexical"] = 0  # an index query's BM25 candidates, written since --lexical exists (none)
    if "tfidf" in old.get("config", {}):
        old["config"].update(bm25=0, damping_check=False, bottom_k=0)  # ScoreConfig fields added since: defaults
    if job.kind in ("fit", "score"):  # the budget's plan (engine/budget.py), added since: its defaults, one group
        old.update(module_groups=[], batch_size=0)
    if job.kind == "register":
        old["corpus"] = None  # how to read a corpus, written since corpora register (none: TRAIN.jsonl)
    old["model"]["base"] = ""  # an adapter's base model, written since adapters load (none: the config's)
    if job.kind == "index":  # issue 24's spec fields, written with their old meaning: every pair, no budget
        old["spec"].update(energy=1.0, budget=0)
    assert encode_job(job) == json.dumps(old, sort_keys=True).encode()


def test_every_job_kind_is_registered_by_its_service_with_its_operation_kinds():
    assert STAGE_TABLE.job_types == {
        "register": RegisterJob,
        "fit": FitJob,
        "score": ScoreJob,
        "self": SelfJob,
        "blocks": BlocksJob,
        "index": IndexJob,
    }
    assert set(STAGE_TABLE.operation_kinds) == {
        "register_dataset",
        "fit_factors",
        "compute_scores",
        "compute_self_influence",
        "stream_blocks",
        "build_index",
        "append_index",
    }
    assert STAGE_TABLE.check_operation("append_index", EXPECTED["index"]) == "append_index"
    with pytest.raises(ValueError, match="not registered"):
        STAGE_TABLE.check_operation("fit_factors", EXPECTED["score"])
    with pytest.raises(ValueError, match="not registered"):
        STAGE_TABLE.check_operation("train_model")


@pytest.mark.parametrize(
    ("kind", "target", "prefix"),
    [
        ("register_dataset", "datasets/d1", "datasets/d1/"),
        ("fit_factors", "factorSets/f1", "factors/f1/"),
        ("compute_scores", "results/r1", "results/r1/"),
        ("compute_self_influence", "results/r1", "results/r1/"),
        ("build_index", "indexes/i1", "indexes/i1/"),
        ("append_index", "indexes/i1", "indexes/i1/"),
        ("stream_blocks", "datasets/d1/shards/0", ""),
        ("fit_factors", "results/r1", ""),
        ("fit_factors", "", ""),
        ("no_such_kind", "factorSets/f1", ""),
    ],
)
def test_an_operations_target_maps_to_the_store_prefix_its_service_registered(kind, target, prefix):
    assert STAGE_TABLE.target_prefix(kind, target) == prefix


def test_decoding_is_driven_by_the_field_types_and_ignores_unknown_keys():
    spec = json.loads(OLD_SPECS["score"])
    spec["config"]["a_future_option"] = 1
    spec["queries"][0]["weight"] = 2.0
    spec["not_a_field"] = {"x": 1}
    job = STAGE_TABLE.decode(json.dumps(spec).encode())
    assert job == EXPECTED["score"]
    assert all(isinstance(query, Query) for query in job.queries) and isinstance(job.config, ScoreConfig)

    for job in (
        NestedJob(MODEL_REF, configs=[ScoreConfig(top_k=3), ScoreConfig()], spec=IndexSpec("none"), create_time=1.0),
        NestedJob(MODEL_REF, configs=[], limit=3, create_time=2.0),
    ):
        assert decode_job(encode_job(job), {"nested": NestedJob}) == job


@dataclass
class NestedJob(Job):
    """A job with the field types a service may use: lists of dataclasses, optional dataclasses."""

    kind: ClassVar[str] = "nested"
    configs: list[ScoreConfig]
    spec: IndexSpec | None = None
    limit: int | None = None


@pytest.mark.parametrize(
    "spec",
    [b"not json", b'{"kind": "train"}', b'{"kind": "fit", "model": {"path": "m"}}', b'{"model": {"path": "m"}}'],
    ids=["not json", "unknown kind", "missing fields", "no kind"],
)
def test_an_unreadable_spec_is_an_input_error(spec):
    with pytest.raises(InputError, match="unreadable job spec"):
        STAGE_TABLE.decode(spec)
