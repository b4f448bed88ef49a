"""FactorService's resource message: a FactorSet from its catalog info."""

from __future__ import annotations

from ..catalog.factor_sets import FactorSetInfo
from ..enums import enum_value
from ..gen.influence.v1 import common_pb2, factor_service_pb2
from ..rpc.messages import timestamp


def factor_set_message(info: FactorSetInfo) -> factor_service_pb2.FactorSet:
    return factor_service_pb2.FactorSet(
        name=info.name,
        dataset=info.dataset,
        model=common_pb2.ModelSpec(
            path=info.model_path, dtype=enum_value(common_pb2.Dtype, info.model_dtype, "model_dtype")
        ),
        strategy=enum_value(factor_service_pb2.Strategy, info.strategy, "strategy"),
        fisher=enum_value(factor_service_pb2.Fisher, info.fisher, "fisher"),
        modules=list(info.modules),
        num_sequences=info.n_sequences,
        num_tokens=info.n_tokens,
        model_fingerprint=info.model_fingerprint,
        create_time=timestamp(info.create_time),
        coverage=coverage_message(info.coverage),
    )


def coverage_message(coverage: dict) -> factor_service_pb2.ModuleCoverage | None:
    """The factor set's recorded coverage (engine modules.Coverage.to_dict), None when it has none."""
    if not coverage:
        return None
    return factor_service_pb2.ModuleCoverage(
        selection=coverage["selection"],
        explicit_subset=coverage["explicit"],
        modules=coverage["modules"],
        expert_projections=coverage["experts"],
        tracked_parameters=coverage["tracked_parameters"],
        model_parameters=coverage["model_parameters"],
        tracked_mlp_parameters=coverage["tracked_mlp_parameters"],
        mlp_parameters=coverage["mlp_parameters"],
        mlp_left_out=coverage["mlp_left_out"],
        summary=coverage["summary"],
    )
