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

class Projection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROJECTION_UNSPECIFIED: _ClassVar[Projection]
    PROJECTION_NONE: _ClassVar[Projection]
    PROJECTION_SVD: _ClassVar[Projection]
    PROJECTION_EIGEN: _ClassVar[Projection]
    PROJECTION_RANDOM: _ClassVar[Projection]

class TokenType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_TYPE_UNSPECIFIED: _ClassVar[TokenType]
    TOKEN_TYPE_UINT16: _ClassVar[TokenType]
    TOKEN_TYPE_UINT32: _ClassVar[TokenType]
PROJECTION_UNSPECIFIED: Projection
PROJECTION_NONE: Projection
PROJECTION_SVD: Projection
PROJECTION_EIGEN: Projection
PROJECTION_RANDOM: Projection
TOKEN_TYPE_UNSPECIFIED: TokenType
TOKEN_TYPE_UINT16: TokenType
TOKEN_TYPE_UINT32: TokenType

class Index(_message.Message):
    __slots__ = ("name", "datasets", "factor_set", "model", "projection", "rank", "dim", "seed", "storage_dtype", "num_examples", "bytes_per_sequence", "energy", "budget", "model_fingerprint", "create_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    FACTOR_SET_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STORAGE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    datasets: _containers.RepeatedScalarFieldContainer[str]
    factor_set: str
    model: _common_pb2.ModelSpec
    projection: Projection
    rank: int
    dim: int
    seed: int
    storage_dtype: _common_pb2.Dtype
    num_examples: int
    bytes_per_sequence: int
    energy: float
    budget: int
    model_fingerprint: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., datasets: _Optional[_Iterable[str]] = ..., factor_set: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ..., projection: _Optional[_Union[Projection, str]] = ..., rank: _Optional[int] = ..., dim: _Optional[int] = ..., seed: _Optional[int] = ..., storage_dtype: _Optional[_Union[_common_pb2.Dtype, str]] = ..., num_examples: _Optional[int] = ..., bytes_per_sequence: _Optional[int] = ..., energy: _Optional[float] = ..., budget: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class BuildIndexRequest(_message.Message):
    __slots__ = ("request_id", "model", "factor_set", "dataset", "projection", "rank", "dim", "seed", "storage_dtype", "energy", "budget", "batch_size", "damping_factor", "damping")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FACTOR_SET_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STORAGE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DAMPING_FACTOR_FIELD_NUMBER: _ClassVar[int]
    DAMPING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: _common_pb2.ModelSpec
    factor_set: str
    dataset: str
    projection: Projection
    rank: int
    dim: int
    seed: int
    storage_dtype: _common_pb2.Dtype
    energy: float
    budget: int
    batch_size: int
    damping_factor: float
    damping: float
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ..., factor_set: _Optional[str] = ..., dataset: _Optional[str] = ..., projection: _Optional[_Union[Projection, str]] = ..., rank: _Optional[int] = ..., dim: _Optional[int] = ..., seed: _Optional[int] = ..., storage_dtype: _Optional[_Union[_common_pb2.Dtype, str]] = ..., energy: _Optional[float] = ..., budget: _Optional[int] = ..., batch_size: _Optional[int] = ..., damping_factor: _Optional[float] = ..., damping: _Optional[float] = ...) -> None: ...

class AppendIndexRequest(_message.Message):
    __slots__ = ("request_id", "index", "dataset", "batch_size")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: str
    dataset: str
    batch_size: int
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[str] = ..., dataset: _Optional[str] = ..., batch_size: _Optional[int] = ...) -> None: ...

class GetIndexRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteIndexRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListIndexesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListIndexesResponse(_message.Message):
    __slots__ = ("indexes", "next_page_token")
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    indexes: _containers.RepeatedCompositeFieldContainer[Index]
    next_page_token: str
    def __init__(self, indexes: _Optional[_Iterable[_Union[Index, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RegisterIndexRequest(_message.Message):
    __slots__ = ("uri",)
    URI_FIELD_NUMBER: _ClassVar[int]
    uri: str
    def __init__(self, uri: _Optional[str] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("name", "display_name", "num_examples", "num_shards", "shard_size", "max_length", "num_tokens", "tokenizer_fingerprint", "create_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    SHARD_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    num_examples: int
    num_shards: int
    shard_size: int
    max_length: int
    num_tokens: int
    tokenizer_fingerprint: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., num_examples: _Optional[int] = ..., num_shards: _Optional[int] = ..., shard_size: _Optional[int] = ..., max_length: _Optional[int] = ..., num_tokens: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RegisterDatasetRequest(_message.Message):
    __slots__ = ("request_id", "model", "display_name", "jsonl", "shard_size", "max_length", "uri", "corpus")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    JSONL_FIELD_NUMBER: _ClassVar[int]
    SHARD_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    CORPUS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: _common_pb2.ModelSpec
    display_name: str
    jsonl: bytes
    shard_size: int
    max_length: int
    uri: str
    corpus: Corpus
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ..., display_name: _Optional[str] = ..., jsonl: _Optional[bytes] = ..., shard_size: _Optional[int] = ..., max_length: _Optional[int] = ..., uri: _Optional[str] = ..., corpus: _Optional[_Union[Corpus, _Mapping]] = ...) -> None: ...

class Corpus(_message.Message):
    __slots__ = ("text_field", "messages_field", "sequence_length", "token_type")
    TEXT_FIELD_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    text_field: str
    messages_field: str
    sequence_length: int
    token_type: TokenType
    def __init__(self, text_field: _Optional[str] = ..., messages_field: _Optional[str] = ..., sequence_length: _Optional[int] = ..., token_type: _Optional[_Union[TokenType, str]] = ...) -> None: ...

class UploadDatasetRequest(_message.Message):
    __slots__ = ("request", "data")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    request: RegisterDatasetRequest
    data: bytes
    def __init__(self, request: _Optional[_Union[RegisterDatasetRequest, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetDatasetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteDatasetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets", "next_page_token")
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[Dataset]
    next_page_token: str
    def __init__(self, datasets: _Optional[_Iterable[_Union[Dataset, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class StreamBlocksRequest(_message.Message):
    __slots__ = ("dataset", "shard", "model", "modules", "block_size")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    shard: int
    model: _common_pb2.ModelSpec
    modules: str
    block_size: int
    def __init__(self, dataset: _Optional[str] = ..., shard: _Optional[int] = ..., model: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ..., modules: _Optional[str] = ..., block_size: _Optional[int] = ...) -> None: ...

class GradientBlock(_message.Message):
    __slots__ = ("shard", "example_ids", "safetensors")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    shard: int
    example_ids: _containers.RepeatedScalarFieldContainer[str]
    safetensors: bytes
    def __init__(self, shard: _Optional[int] = ..., example_ids: _Optional[_Iterable[str]] = ..., safetensors: _Optional[bytes] = ...) -> None: ...
