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

class Strategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STRATEGY_UNSPECIFIED: _ClassVar[Strategy]
    STRATEGY_IDENTITY: _ClassVar[Strategy]
    STRATEGY_DIAGONAL: _ClassVar[Strategy]
    STRATEGY_KFAC: _ClassVar[Strategy]
    STRATEGY_EKFAC: _ClassVar[Strategy]

class Fisher(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FISHER_UNSPECIFIED: _ClassVar[Fisher]
    FISHER_SAMPLED: _ClassVar[Fisher]
    FISHER_EMPIRICAL: _ClassVar[Fisher]
STRATEGY_UNSPECIFIED: Strategy
STRATEGY_IDENTITY: Strategy
STRATEGY_DIAGONAL: Strategy
STRATEGY_KFAC: Strategy
STRATEGY_EKFAC: Strategy
FISHER_UNSPECIFIED: Fisher
FISHER_SAMPLED: Fisher
FISHER_EMPIRICAL: Fisher

class FactorSet(_message.Message):
    __slots__ = ("name", "dataset", "model", "strategy", "fisher", "modules", "num_sequences", "num_tokens", "model_fingerprint", "create_time", "coverage")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    FISHER_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    NUM_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dataset: str
    model: _common_pb2.ModelSpec
    strategy: Strategy
    fisher: Fisher
    modules: _containers.RepeatedScalarFieldContainer[str]
    num_sequences: int
    num_tokens: int
    model_fingerprint: str
    create_time: _timestamp_pb2.Timestamp
    coverage: ModuleCoverage
    def __init__(self, name: _Optional[str] = ..., dataset: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ..., strategy: _Optional[_Union[Strategy, str]] = ..., fisher: _Optional[_Union[Fisher, str]] = ..., modules: _Optional[_Iterable[str]] = ..., num_sequences: _Optional[int] = ..., num_tokens: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., coverage: _Optional[_Union[ModuleCoverage, _Mapping]] = ...) -> None: ...

class ModuleCoverage(_message.Message):
    __slots__ = ("selection", "explicit_subset", "modules", "expert_projections", "tracked_parameters", "model_parameters", "tracked_mlp_parameters", "mlp_parameters", "mlp_left_out", "summary")
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    EXPLICIT_SUBSET_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_PROJECTIONS_FIELD_NUMBER: _ClassVar[int]
    TRACKED_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TRACKED_MLP_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MLP_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MLP_LEFT_OUT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    selection: str
    explicit_subset: bool
    modules: int
    expert_projections: int
    tracked_parameters: int
    model_parameters: int
    tracked_mlp_parameters: int
    mlp_parameters: int
    mlp_left_out: _containers.RepeatedScalarFieldContainer[str]
    summary: str
    def __init__(self, selection: _Optional[str] = ..., explicit_subset: _Optional[bool] = ..., modules: _Optional[int] = ..., expert_projections: _Optional[int] = ..., tracked_parameters: _Optional[int] = ..., model_parameters: _Optional[int] = ..., tracked_mlp_parameters: _Optional[int] = ..., mlp_parameters: _Optional[int] = ..., mlp_left_out: _Optional[_Iterable[str]] = ..., summary: _Optional[str] = ...) -> None: ...

class FitFactorsRequest(_message.Message):
    __slots__ = ("request_id", "model", "dataset", "strategy", "fisher", "modules", "batch_size", "max_examples", "seed", "cache_gib")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    FISHER_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CACHE_GIB_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: _common_pb2.ModelSpec
    dataset: str
    strategy: Strategy
    fisher: Fisher
    modules: str
    batch_size: int
    max_examples: int
    seed: int
    cache_gib: float
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ..., dataset: _Optional[str] = ..., strategy: _Optional[_Union[Strategy, str]] = ..., fisher: _Optional[_Union[Fisher, str]] = ..., modules: _Optional[str] = ..., batch_size: _Optional[int] = ..., max_examples: _Optional[int] = ..., seed: _Optional[int] = ..., cache_gib: _Optional[float] = ...) -> None: ...

class GetFactorSetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteFactorSetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListFactorSetsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListFactorSetsResponse(_message.Message):
    __slots__ = ("factor_sets", "next_page_token")
    FACTOR_SETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    factor_sets: _containers.RepeatedCompositeFieldContainer[FactorSet]
    next_page_token: str
    def __init__(self, factor_sets: _Optional[_Iterable[_Union[FactorSet, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class PlanFactorImportRequest(_message.Message):
    __slots__ = ("manifest",)
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    manifest: bytes
    def __init__(self, manifest: _Optional[bytes] = ...) -> None: ...

class FactorImportPlan(_message.Message):
    __slots__ = ("factor_set", "published", "missing_files")
    FACTOR_SET_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FILES_FIELD_NUMBER: _ClassVar[int]
    factor_set: str
    published: bool
    missing_files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, factor_set: _Optional[str] = ..., published: _Optional[bool] = ..., missing_files: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterFactorsRequest(_message.Message):
    __slots__ = ("uri",)
    URI_FIELD_NUMBER: _ClassVar[int]
    uri: str
    def __init__(self, uri: _Optional[str] = ...) -> None: ...

class StreamFactorsRequest(_message.Message):
    __slots__ = ("name", "modules", "chunk_bytes", "resume_file", "resume_offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESUME_FILE_FIELD_NUMBER: _ClassVar[int]
    RESUME_OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    modules: _containers.RepeatedScalarFieldContainer[str]
    chunk_bytes: int
    resume_file: str
    resume_offset: int
    def __init__(self, name: _Optional[str] = ..., modules: _Optional[_Iterable[str]] = ..., chunk_bytes: _Optional[int] = ..., resume_file: _Optional[str] = ..., resume_offset: _Optional[int] = ...) -> None: ...
