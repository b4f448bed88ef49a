"""Resource messages (Dataset, FactorSet, ScoreResult) built from their artifacts' metadata."""

from __future__ import annotations

from google.protobuf import any_pb2, timestamp_pb2

from ..enums import enum_value
from ..gen.influence.v1 import common_pb2, factor_service_pb2, gradient_service_pb2, query_service_pb2


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    if seconds:
        stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def dataset_message(metadata: dict) -> gradient_service_pb2.Dataset:
    return gradient_service_pb2.Dataset(
        name=metadata["name"],
        display_name=metadata.get("display_name", ""),
        num_examples=metadata["num_examples"],
        num_shards=metadata["num_shards"],
        shard_size=metadata["shard_size"],
        max_length=metadata["max_length"],
        num_tokens=metadata["num_tokens"],
        tokenizer_fingerprint=metadata.get("tokenizer_fingerprint", ""),
        create_time=_timestamp(metadata.get("create_time")),
    )


def index_message(metadata: dict) -> gradient_service_pb2.Index:
    spec = metadata["spec"]
    return gradient_service_pb2.Index(
        name=metadata["name"],
        datasets=[part["dataset"] for part in metadata["parts"]],
        factor_set=metadata["factor_set"],
        model=common_pb2.ModelSpec(path=metadata.get("model_path", "")),
        projection=enum_value(gradient_service_pb2.Projection, spec["projection"], "projection"),
        rank=spec["rank"],
        dim=spec["dim"],
        seed=spec["seed"],
        storage_dtype=enum_value(common_pb2.Dtype, spec["storage_dtype"], "storage_dtype"),
        num_examples=metadata["num_examples"],
        bytes_per_sequence=metadata["bytes_per_sequence"],
        model_fingerprint=metadata["model_fingerprint"],
        create_time=_timestamp(metadata.get("create_time")),
    )


def factor_set_message(factor_set_id: str, metadata: dict) -> factor_service_pb2.FactorSet:
    """metadata: engine.factor_io's factor metadata."""
    provenance = metadata.get("provenance", {})
    return factor_service_pb2.FactorSet(
        name=f"factorSets/{factor_set_id}",
        dataset=provenance.get("dataset", ""),
        model=common_pb2.ModelSpec(
            path=provenance.get("model_path", ""),
            dtype=enum_value(common_pb2.Dtype, provenance.get("model_dtype", ""), "model_dtype"),
        ),
        strategy=enum_value(factor_service_pb2.Strategy, metadata["strategy"], "strategy"),
        fisher=enum_value(factor_service_pb2.Fisher, metadata["fisher"], "fisher"),
        modules=list(metadata["modules"]),
        num_sequences=metadata["n_sequences"],
        num_tokens=metadata["n_tokens"],
        model_fingerprint=metadata["model_fingerprint"],
        create_time=_timestamp(provenance.get("create_time")),
    )


def result_message(metadata: dict) -> query_service_pb2.ScoreResult:
    return query_service_pb2.ScoreResult(
        name=metadata["name"],
        kind=enum_value(query_service_pb2.ResultKind, metadata["result_kind"], "result_kind"),
        factor_set=metadata["factor_set"],
        dataset=metadata["dataset"],
        num_queries=metadata["num_queries"],
        num_train=metadata["num_train"],
        modules=metadata.get("modules", []),
        create_time=_timestamp(metadata.get("create_time")),
    )


def packed(message) -> bytes:
    """A message wrapped in google.protobuf.Any, serialised (an operation's stored response)."""
    wrapper = any_pb2.Any()
    wrapper.Pack(message)
    return wrapper.SerializeToString()


def empty_response() -> bytes:
    """The response of a job whose output is not a resource (e.g. StreamBlocks' blocks job)."""
    from google.protobuf import empty_pb2

    return packed(empty_pb2.Empty())
