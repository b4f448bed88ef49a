"""Resource messages (Dataset, FactorSet, ScoreResult) built from artifact manifests."""

from __future__ import annotations

from google.protobuf import any_pb2, timestamp_pb2

from ..gen.influence.v1 import common_pb2, factor_service_pb2, gradient_service_pb2, query_service_pb2


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    if seconds:
        stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def dataset_message(manifest: dict) -> gradient_service_pb2.Dataset:
    return gradient_service_pb2.Dataset(
        name=manifest["name"],
        display_name=manifest.get("display_name", ""),
        num_examples=manifest["num_examples"],
        num_shards=manifest["num_shards"],
        shard_size=manifest["shard_size"],
        max_length=manifest["max_length"],
        num_tokens=manifest["num_tokens"],
        tokenizer_fingerprint=manifest.get("tokenizer_fingerprint", ""),
        create_time=_timestamp(manifest.get("create_time")),
    )


def factor_set_message(factor_set_id: str, manifest: dict) -> factor_service_pb2.FactorSet:
    metadata = manifest.get("metadata", {})
    return factor_service_pb2.FactorSet(
        name=f"factorSets/{factor_set_id}",
        dataset=metadata.get("dataset", ""),
        model=common_pb2.ModelSpec(path=metadata.get("model_path", ""), dtype=metadata.get("model_dtype", "")),
        strategy=manifest["strategy"],
        fisher=manifest["fisher"],
        modules=list(manifest["modules"]),
        num_sequences=manifest["n_sequences"],
        num_tokens=manifest["n_tokens"],
        model_fingerprint=manifest["model_fingerprint"],
        create_time=_timestamp(metadata.get("create_time")),
    )


def result_message(manifest: dict) -> query_service_pb2.ScoreResult:
    return query_service_pb2.ScoreResult(
        name=manifest["name"],
        kind=manifest["result_kind"],
        factor_set=manifest["factor_set"],
        dataset=manifest["dataset"],
        num_queries=manifest["num_queries"],
        num_train=manifest["num_train"],
        modules=manifest.get("modules", []),
    )


def packed(message) -> bytes:
    """A message wrapped in google.protobuf.Any, serialised (an operation's stored response)."""
    wrapper = any_pb2.Any()
    wrapper.Pack(message)
    return wrapper.SerializeToString()
