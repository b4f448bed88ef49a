import datetime

from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.api import resource_pb2 as _resource_pb2
from google.longrunning import operations_pb2 as _operations_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from services.gen.influence.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResultKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESULT_KIND_UNSPECIFIED: _ClassVar[ResultKind]
    RESULT_KIND_PAIRWISE: _ClassVar[ResultKind]
    RESULT_KIND_SELF: _ClassVar[ResultKind]
RESULT_KIND_UNSPECIFIED: ResultKind
RESULT_KIND_PAIRWISE: ResultKind
RESULT_KIND_SELF: ResultKind

class Query(_message.Message):
    __slots__ = ("id", "prompt", "completion", "group", "messages")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    id: str
    prompt: str
    completion: str
    group: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, id: _Optional[str] = ..., prompt: _Optional[str] = ..., completion: _Optional[str] = ..., group: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ComputeScoresRequest(_message.Message):
    __slots__ = ("request_id", "model", "factor_set", "dataset", "queries", "top_k", "damping_factor", "damping", "query_rank", "per_module", "per_token", "batch_size", "index", "rescore", "tfidf", "report", "bm25", "damping_check", "lexical", "bottom_k")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FACTOR_SET_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    DAMPING_FACTOR_FIELD_NUMBER: _ClassVar[int]
    DAMPING_FIELD_NUMBER: _ClassVar[int]
    QUERY_RANK_FIELD_NUMBER: _ClassVar[int]
    PER_MODULE_FIELD_NUMBER: _ClassVar[int]
    PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESCORE_FIELD_NUMBER: _ClassVar[int]
    TFIDF_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    BM25_FIELD_NUMBER: _ClassVar[int]
    DAMPING_CHECK_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_FIELD_NUMBER: _ClassVar[int]
    BOTTOM_K_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: _common_pb2.ModelSpec
    factor_set: str
    dataset: str
    queries: _containers.RepeatedCompositeFieldContainer[Query]
    top_k: int
    damping_factor: float
    damping: float
    query_rank: int
    per_module: bool
    per_token: bool
    batch_size: int
    index: str
    rescore: int
    tfidf: int
    report: bool
    bm25: int
    damping_check: bool
    lexical: int
    bottom_k: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ..., factor_set: _Optional[str] = ..., dataset: _Optional[str] = ..., queries: _Optional[_Iterable[_Union[Query, _Mapping]]] = ..., top_k: _Optional[int] = ..., damping_factor: _Optional[float] = ..., damping: _Optional[float] = ..., query_rank: _Optional[int] = ..., per_module: _Optional[bool] = ..., per_token: _Optional[bool] = ..., batch_size: _Optional[int] = ..., index: _Optional[str] = ..., rescore: _Optional[int] = ..., tfidf: _Optional[int] = ..., report: _Optional[bool] = ..., bm25: _Optional[int] = ..., damping_check: _Optional[bool] = ..., lexical: _Optional[int] = ..., bottom_k: _Optional[int] = ...) -> None: ...

class ComputeSelfInfluenceRequest(_message.Message):
    __slots__ = ("request_id", "model", "factor_set", "dataset", "damping_factor", "damping", "top_k", "batch_size")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FACTOR_SET_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    DAMPING_FACTOR_FIELD_NUMBER: _ClassVar[int]
    DAMPING_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: _common_pb2.ModelSpec
    factor_set: str
    dataset: str
    damping_factor: float
    damping: float
    top_k: int
    batch_size: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ..., factor_set: _Optional[str] = ..., dataset: _Optional[str] = ..., damping_factor: _Optional[float] = ..., damping: _Optional[float] = ..., top_k: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("name", "kind", "factor_set", "dataset", "num_queries", "num_train", "modules", "create_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FACTOR_SET_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    NUM_QUERIES_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: ResultKind
    factor_set: str
    dataset: str
    num_queries: int
    num_train: int
    modules: _containers.RepeatedScalarFieldContainer[str]
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[ResultKind, str]] = ..., factor_set: _Optional[str] = ..., dataset: _Optional[str] = ..., num_queries: _Optional[int] = ..., num_train: _Optional[int] = ..., modules: _Optional[_Iterable[str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetScoreResultRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteScoreResultRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListScoreResultsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListScoreResultsResponse(_message.Message):
    __slots__ = ("score_results", "next_page_token")
    SCORE_RESULTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    score_results: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    next_page_token: str
    def __init__(self, score_results: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class StreamScoreRowsRequest(_message.Message):
    __slots__ = ("name", "include_bottom")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_BOTTOM_FIELD_NUMBER: _ClassVar[int]
    name: str
    include_bottom: bool
    def __init__(self, name: _Optional[str] = ..., include_bottom: _Optional[bool] = ...) -> None: ...

class TokenScore(_message.Message):
    __slots__ = ("token", "score")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    token: str
    score: float
    def __init__(self, token: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class ScoreRow(_message.Message):
    __slots__ = ("query_id", "rank", "train_id", "score", "text", "per_module", "tokens", "line", "bottom")
    class PerModuleEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PER_MODULE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    BOTTOM_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    rank: int
    train_id: str
    score: float
    text: str
    per_module: _containers.ScalarMap[str, float]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenScore]
    line: int
    bottom: bool
    def __init__(self, query_id: _Optional[str] = ..., rank: _Optional[int] = ..., train_id: _Optional[str] = ..., score: _Optional[float] = ..., text: _Optional[str] = ..., per_module: _Optional[_Mapping[str, float]] = ..., tokens: _Optional[_Iterable[_Union[TokenScore, _Mapping]]] = ..., line: _Optional[int] = ..., bottom: _Optional[bool] = ...) -> None: ...
