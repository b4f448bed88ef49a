"""`InfluenceClient`: the Python client of a running system (or of the embedded one).

    client = InfluenceClient("localhost:50051")
    dataset = client.register_dataset("model_dir", "train.jsonl")
    factors = client.fit_factors("model_dir", dataset.name)
    result = client.compute_scores("model_dir", factors.name, dataset.name, queries)
    client.download_result(result.name, "out_dir")   # scores.safetensors + results.json

Every create call sends a request_id, so retrying it after UNAVAILABLE is safe; only
UNAVAILABLE is retried. `wait` polls the Operations service and reports progress.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import code_pb2

from .engine.records import Query
from .errors import DomainError, InternalError, error_for_code
from .gen.influence.v1 import (
    common_pb2,
    factor_service_pb2,
    factor_service_pb2_grpc,
    gradient_service_pb2,
    gradient_service_pb2_grpc,
    query_service_pb2,
    query_service_pb2_grpc,
)
from .wire import DEFAULT_SHARD_SIZE, MAX_MESSAGE_BYTES


def _domain_error(error: grpc.RpcError) -> DomainError:
    """The domain error (services/errors.py) for a failed call's status."""
    return error_for_code(error.code().name, error.details() or "")


class InfluenceClient:
    def __init__(self, target: str, *, timeout: float = 60.0, retries: int = 5):
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.factors = factor_service_pb2_grpc.FactorServiceStub(self.channel)
        self.gradients = gradient_service_pb2_grpc.GradientServiceStub(self.channel)
        self.queries = query_service_pb2_grpc.QueryServiceStub(self.channel)
        self.operations = operations_pb2_grpc.OperationsStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> InfluenceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------

    def _call(self, method, request, *, timeout: float | None = None):
        """Unary call; retries UNAVAILABLE with backoff (create calls carry a request_id)."""
        delay = 0.2
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=timeout or self.timeout)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                raise _domain_error(error) from None
        raise AssertionError("unreachable")

    def _stream(self, method, request):
        try:
            yield from method(request, timeout=None)
        except grpc.RpcError as error:
            raise _domain_error(error) from None

    def wait(
        self,
        operation: operations_pb2.Operation,
        progress: Callable[[common_pb2.OperationMetadata], None] | None = None,
        *,
        timeout: float | None = None,
        interval: float = 0.5,
    ):
        """Block until the operation is done; return it (see `unpack` for its response).

        Uses the server-side WaitOperation in `interval`-long slices, so completion is noticed
        at once and `progress(metadata)` is called between slices when the metadata changed.
        A failed operation raises the domain error of its status code with the server's message.
        """
        from google.protobuf import duration_pb2

        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        while True:
            metadata = common_pb2.OperationMetadata()
            if operation.metadata.Unpack(metadata) and progress and metadata != last:
                progress(metadata)
                last = metadata
            if operation.done:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise InternalError(f"timed out waiting for {operation.name}")
            request = operations_pb2.WaitOperationRequest(
                name=operation.name, timeout=duration_pb2.Duration(nanos=int(interval * 1e9))
            )
            operation = self._call(self.operations.WaitOperation, request, timeout=interval + 30)
        if operation.HasField("error"):
            name = code_pb2.Code.Name(operation.error.code) if operation.error.code in code_pb2.Code.values() else ""
            raise error_for_code(name, operation.error.message)
        return operation

    @staticmethod
    def unpack(operation, message_type):
        message = message_type()
        operation.response.Unpack(message)
        return message

    # -- datasets -------------------------------------------------------------------------

    def register_dataset(
        self,
        model: str | common_pb2.ModelSpec,
        jsonl: str | Path | bytes,
        *,
        shard_size: int = DEFAULT_SHARD_SIZE,
        max_length: int = 512,
        display_name: str = "",
        progress=None,
    ) -> gradient_service_pb2.Dataset:
        data = jsonl if isinstance(jsonl, bytes) else Path(jsonl).read_bytes()
        request = gradient_service_pb2.RegisterDatasetRequest(
            request_id=_request_id(),
            model=_model(model),
            display_name=display_name or "",
            jsonl=data,
            shard_size=shard_size,
            max_length=max_length,
        )
        operation = self._call(self.gradients.RegisterDataset, request)
        return self.unpack(self.wait(operation, progress), gradient_service_pb2.Dataset)

    def get_dataset(self, name: str) -> gradient_service_pb2.Dataset:
        return self._call(self.gradients.GetDataset, gradient_service_pb2.GetDatasetRequest(name=name))

    def list_datasets(self) -> list[gradient_service_pb2.Dataset]:
        return _paged(
            lambda token: self._call(
                self.gradients.ListDatasets, gradient_service_pb2.ListDatasetsRequest(page_size=100, page_token=token)
            ),
            "datasets",
        )

    def delete_dataset(self, name: str) -> None:
        self._call(self.gradients.DeleteDataset, gradient_service_pb2.DeleteDatasetRequest(name=name))

    # -- factors --------------------------------------------------------------------------

    def fit_factors(self, model, dataset: str, *, progress=None, **options) -> factor_service_pb2.FactorSet:
        request = factor_service_pb2.FitFactorsRequest(model=_model(model), dataset=dataset, **options)
        request.request_id = _request_id()
        operation = self._call(self.factors.FitFactors, request)
        return self.unpack(self.wait(operation, progress), factor_service_pb2.FactorSet)

    def get_factor_set(self, name: str) -> factor_service_pb2.FactorSet:
        return self._call(self.factors.GetFactorSet, factor_service_pb2.GetFactorSetRequest(name=name))

    def list_factor_sets(self) -> list[factor_service_pb2.FactorSet]:
        return _paged(
            lambda token: self._call(
                self.factors.ListFactorSets, factor_service_pb2.ListFactorSetsRequest(page_size=100, page_token=token)
            ),
            "factor_sets",
        )

    def delete_factor_set(self, name: str) -> None:
        self._call(self.factors.DeleteFactorSet, factor_service_pb2.DeleteFactorSetRequest(name=name))

    def import_factors(self, directory: str | Path) -> factor_service_pb2.FactorSet:
        """Upload a factor directory written by `influence fit`; the server verifies every sha256."""
        directory = Path(directory)
        names = sorted(path.name for path in directory.iterdir() if path.is_file() and not path.name.startswith("."))

        def chunks():
            for name in names:
                data = (directory / name).read_bytes()
                for offset in range(0, max(len(data), 1), 4 * 2**20):
                    yield common_pb2.FileChunk(file=name, offset=offset, data=data[offset : offset + 4 * 2**20])

        try:
            return self.factors.ImportFactors(chunks(), timeout=self.timeout)
        except grpc.RpcError as error:
            raise _domain_error(error) from None

    def download_factors(self, name: str, out_dir: str | Path) -> Path:
        """Write the factor set's files (manifest.json last) into out_dir: `influence score` reads it."""
        files = _collect(self._stream(self.factors.StreamFactors, factor_service_pb2.StreamFactorsRequest(name=name)))
        return _write_files(files, Path(out_dir), last="manifest.json")

    # -- scores ---------------------------------------------------------------------------

    def compute_scores(
        self,
        model,
        factor_set: str,
        dataset: str,
        queries: Iterable[Query],
        *,
        progress=None,
        damping: float | None = None,
        **options,
    ) -> query_service_pb2.ScoreResult:
        request = query_service_pb2.ComputeScoresRequest(
            model=_model(model),
            factor_set=factor_set,
            dataset=dataset,
            queries=[query_service_pb2.Query(id=q.id, prompt=q.prompt, completion=q.completion) for q in queries],
            **options,
        )
        if damping is not None:
            request.damping = damping
        request.request_id = _request_id()
        operation = self._call(self.queries.ComputeScores, request)
        return self.unpack(self.wait(operation, progress), query_service_pb2.ScoreResult)

    def compute_self_influence(
        self, model, factor_set: str, dataset: str, *, progress=None, damping: float | None = None, **options
    ) -> query_service_pb2.ScoreResult:
        request = query_service_pb2.ComputeSelfInfluenceRequest(
            model=_model(model), factor_set=factor_set, dataset=dataset, **options
        )
        if damping is not None:
            request.damping = damping
        request.request_id = _request_id()
        operation = self._call(self.queries.ComputeSelfInfluence, request)
        return self.unpack(self.wait(operation, progress), query_service_pb2.ScoreResult)

    def get_result(self, name: str) -> query_service_pb2.ScoreResult:
        return self._call(self.queries.GetScoreResult, query_service_pb2.GetScoreResultRequest(name=name))

    def score_rows(self, name: str) -> Iterable[query_service_pb2.ScoreRow]:
        return self._stream(self.queries.StreamScoreRows, query_service_pb2.StreamScoreRowsRequest(name=name))

    def download_result(self, name: str, out_dir: str | Path) -> Path:
        """Write scores.safetensors and results.json (the CLI's output format) into out_dir."""
        files = _collect(
            self._stream(self.queries.StreamResultFiles, query_service_pb2.StreamResultFilesRequest(name=name))
        )
        return _write_files(files, Path(out_dir))


def _model(model) -> common_pb2.ModelSpec:
    if isinstance(model, common_pb2.ModelSpec):
        return model
    return common_pb2.ModelSpec(path=str(Path(model).resolve()))


def _request_id() -> str:
    """A fresh id per logical call: `_call` resends the same request (same id) after UNAVAILABLE,
    so the server runs it once; a new call, even with identical content, is a new job."""
    return uuid.uuid4().hex


def _paged(fetch, field: str) -> list:
    items, token = [], ""
    while True:
        response = fetch(token)
        items.extend(getattr(response, field))
        token = response.next_page_token
        if not token:
            return items


def _collect(chunks) -> dict[str, bytearray]:
    files: dict[str, bytearray] = {}
    expected: dict[str, str] = {}
    for chunk in chunks:
        buffer = files.setdefault(chunk.file, bytearray())
        if chunk.offset != len(buffer):
            raise InternalError(f"stream of {chunk.file} skipped bytes at offset {chunk.offset}")
        buffer.extend(chunk.data)
        if chunk.sha256:
            expected[chunk.file] = chunk.sha256
    for name, digest in expected.items():
        if hashlib.sha256(files[name]).hexdigest() != digest:
            raise InternalError(f"{name} arrived corrupted (sha256 mismatch)")
    return files


def _write_files(files: dict[str, bytearray], out_dir: Path, last: str | None = None) -> Path:
    """Write every file atomically; `last` (a manifest) is removed first and written last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if last:
        (out_dir / last).unlink(missing_ok=True)
    for name in sorted(files, key=lambda n: n == last):
        temporary = out_dir / f".{name}.part"
        temporary.write_bytes(bytes(files[name]))
        temporary.replace(out_dir / name)
    return out_dir
