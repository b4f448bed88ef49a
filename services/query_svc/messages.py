"""QueryService's resource message: a ScoreResult from its catalog info."""

from __future__ import annotations

from ..catalog.results import ResultInfo
from ..enums import enum_value
from ..gen.influence.v1 import query_service_pb2
from ..rpc.messages import timestamp


def result_message(info: ResultInfo) -> query_service_pb2.ScoreResult:
    return query_service_pb2.ScoreResult(
        name=info.name,
        kind=enum_value(query_service_pb2.ResultKind, info.result_kind, "result_kind"),
        factor_set=info.factor_set,
        dataset=info.dataset,
        num_queries=info.num_queries,
        num_train=info.num_train,
        modules=list(info.modules),
        create_time=timestamp(info.create_time),
    )
