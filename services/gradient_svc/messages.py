"""GradientService's resource messages: a Dataset and an Index from their catalog infos."""

from __future__ import annotations

from ..catalog.datasets import DatasetInfo
from ..catalog.indexes import IndexInfo
from ..enums import enum_value
from ..gen.influence.v1 import common_pb2, gradient_service_pb2
from ..rpc.messages import timestamp


def dataset_message(info: DatasetInfo) -> gradient_service_pb2.Dataset:
    return gradient_service_pb2.Dataset(
        name=info.name,
        display_name=info.display_name,
        num_examples=info.num_examples,
        num_shards=info.num_shards,
        shard_size=info.shard_size,
        max_length=info.max_length,
        num_tokens=info.num_tokens,
        tokenizer_fingerprint=info.tokenizer_fingerprint,
        create_time=timestamp(info.create_time),
    )


def index_message(info: IndexInfo) -> gradient_service_pb2.Index:
    spec = info.spec
    return gradient_service_pb2.Index(
        name=info.name,
        datasets=[part.dataset for part in info.parts],
        factor_set=info.factor_set,
        model=common_pb2.ModelSpec(path=info.model_path),
        projection=enum_value(gradient_service_pb2.Projection, spec.projection, "projection"),
        rank=spec.rank,
        dim=spec.dim,
        seed=spec.seed,
        storage_dtype=enum_value(common_pb2.Dtype, spec.storage_dtype, "storage_dtype"),
        num_examples=info.num_examples,
        bytes_per_sequence=info.bytes_per_sequence,
        energy=spec.energy,
        budget=spec.budget,
        model_fingerprint=info.model_fingerprint,
        create_time=timestamp(info.create_time),
    )
