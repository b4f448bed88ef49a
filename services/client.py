"""`InfluenceClient`: the Python client of a running system (or of the embedded one).

    client = InfluenceClient("localhost:50051")
    dataset = client.register_dataset("model_dir", "train.jsonl")
    factors = client.fit_factors("model_dir", dataset.name)
    result = client.compute_scores("model_dir", factors.name, dataset.name, queries)
    client.download_result(result.name, "out_dir")   # scores.safetensors + results.json

Every create call sends a request_id, so retrying it after UNAVAILABLE is safe; only
UNAVAILABLE is retried, long enough to outlast a server restart. `wait` waits on the Operations
service and reports progress; `wait_for(name)` reattaches to an operation started earlier.

Against a server started with --auth-tokens, give `token=` (default: INFLUENCE_TOKEN): it goes
with every call as `authorization: Bearer TOKEN`. TLS: `tls_ca=` the CA that signed the server's
certificate (INFLUENCE_TLS_CA), and for mutual TLS `tls_cert=`/`tls_key=` the client's own
(INFLUENCE_TLS_CERT, INFLUENCE_TLS_KEY): PEM file paths.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2

from .engine.records import Query
from .enums import enum_value
from .errors import DomainError, InputError, InternalError, NotFoundError, StorageFull, error_for_code
from .gen.influence.v1 import (
    common_pb2,
    factor_service_pb2,
    factor_service_pb2_grpc,
    gradient_service_pb2,
    gradient_service_pb2_grpc,
    query_service_pb2,
    query_service_pb2_grpc,
)
from .options import SHARD_SIZE
from .wire import MAX_MESSAGE_BYTES, dataset_id


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer TOKEN` to every call's metadata."""

    def __init__(self, token: str):
        self._metadata = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:  # never show the token
        return "_BearerToken(***)"

    def _details(self, details):
        return details._replace(metadata=[*(details.metadata or ()), self._metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def _channel_credentials(ca: str, cert: str, key: str) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM file paths (None when none is given: plaintext)."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise InputError("give both a client certificate and its key (--tls-cert and --tls-key), or neither")

    def read(path: str, what: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as error:
            raise InputError(f"cannot read the {what} {path}: {error.strerror}") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca, "TLS CA") if ca else None,
        private_key=read(key, "TLS client key") if key else None,
        certificate_chain=read(cert, "TLS client certificate") if cert else None,
    )


def _domain_error(error: grpc.RpcError) -> DomainError:
    """The domain error (services/errors.py) for a failed call's status, with the request field
    at fault when the server's rich status names one."""
    field = ""
    for key, value in (error.trailing_metadata() or ()) if hasattr(error, "trailing_metadata") else ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    request = error_details_pb2.BadRequest()
                    detail.Unpack(request)
                    field = next((v.field for v in request.field_violations), "")
    return error_for_code(error.code().name, error.details() or "", field=field)


class InfluenceClient:
    """A client of the three services and the Operations service.

    `target` reaches all of them (one `influence serve`, or a deployment's single entry point);
    `factor_target`, `gradient_target` and `query_target` send one service's calls elsewhere
    (per-service Services of a deployment). A target may name several replicas, e.g.
    `dns:///influence-query-headless:50051`: calls are spread over them round-robin, one
    HTTP/2 connection each. Operations are read through whichever target is given first
    (every server answers for every operation: they share Redis)."""

    def __init__(
        self,
        target: str = "",
        *,
        factor_target: str = "",
        gradient_target: str = "",
        query_target: str = "",
        timeout: float = 60.0,
        retries: int | None = None,
        retry_seconds: float | None = None,
        connect_seconds: float = 10.0,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ):
        targets = {
            "factor": factor_target or target,
            "gradient": gradient_target or target,
            "query": query_target or target,
        }
        missing = [role for role, value in targets.items() if not value]
        if missing:
            raise InputError(f"no target for the {', '.join(missing)} service: give `target` or each service's target")
        self.target = target or targets["query"]
        self.timeout = timeout
        self.retries = retries
        if retry_seconds is None:
            retry_seconds = float(os.environ.get("INFLUENCE_RETRY_SECONDS", "120"))
        self.retry_seconds, self.connect_seconds = retry_seconds, connect_seconds
        self._reached = False  # a call has been answered: an UNAVAILABLE now is an outage, not a typo
        self.on_operation: Callable[[str], None] | None = None  # told each operation `wait` starts on
        self._token = os.environ.get("INFLUENCE_TOKEN", "") if token is None else token
        self._credentials = _channel_credentials(
            os.environ.get("INFLUENCE_TLS_CA", "") if tls_ca is None else tls_ca,
            os.environ.get("INFLUENCE_TLS_CERT", "") if tls_cert is None else tls_cert,
            os.environ.get("INFLUENCE_TLS_KEY", "") if tls_key is None else tls_key,
        )
        self._channels: dict[str, grpc.Channel] = {}
        self.factors = factor_service_pb2_grpc.FactorServiceStub(self._channel(targets["factor"]))
        self.gradients = gradient_service_pb2_grpc.GradientServiceStub(self._channel(targets["gradient"]))
        self.queries = query_service_pb2_grpc.QueryServiceStub(self._channel(targets["query"]))
        self.operations = operations_pb2_grpc.OperationsStub(self._channel(self.target))
        self.waiting_on = ""  # the operation `wait` is (or was last) waiting on

    def _channel(self, target: str) -> grpc.Channel:
        if target not in self._channels:
            options = [
                # a restarted server is found again within ~2 s (gRPC's default backs off to 120 s)
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.lb_policy_name", "round_robin"),  # over every address the name resolves to
                ("grpc.dns_min_time_between_resolutions_ms", 5000),  # replicas come and go
            ]
            if self._credentials is None:
                channel = grpc.insecure_channel(target, options=options)
            else:
                channel = grpc.secure_channel(target, self._credentials, options=options)
            if self._token:
                channel = grpc.intercept_channel(channel, _BearerToken(self._token))
            self._channels[target] = channel
        return self._channels[target]

    def cancel(self, name: str) -> None:
        """Cancel an operation (its running tasks stop between batches)."""
        self._call(self.operations.CancelOperation, operations_pb2.CancelOperationRequest(name=name))

    def get_operation(self, name: str) -> operations_pb2.Operation:
        return self._call(self.operations.GetOperation, operations_pb2.GetOperationRequest(name=name))

    def list_operations(self, kind: str = "") -> list[operations_pb2.Operation]:
        """Every operation the server keeps (newest first), or those of one kind
        ("fit_factors", "compute_scores", ...), filtered by the server (AIP-160: `kind = X`) and,
        for servers that read another filter form, here too."""
        request = operations_pb2.ListOperationsRequest(name="operations", filter=f"kind = {kind}" if kind else "")

        def fetch(token):
            request.page_token = token
            return self._call(self.operations.ListOperations, request)

        operations = _paged(fetch, "operations")
        return [operation for operation in operations if not kind or operation_metadata(operation).kind == kind]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def __enter__(self) -> InfluenceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------

    def _may_retry(self, attempt: int, started: float) -> bool:
        """Whether an UNAVAILABLE after `attempt` retries since `started` is tried again: at most
        `retries` times when given, else within the time budget (see `_call`)."""
        if self.retries is not None:
            return attempt < self.retries
        return time.monotonic() - started < (self.retry_seconds if self._reached else self.connect_seconds)

    def _call(self, method, request, *, timeout: float | None = None):
        """Unary call; retries UNAVAILABLE with backoff (0.2 s doubling to 2 s; create calls carry a
        request_id, so a retried create runs once). Bounded by `retries` attempts when given, else
        by time: `connect_seconds` until the server has answered once (a wrong address fails
        fast), `retry_seconds` after (env INFLUENCE_RETRY_SECONDS, default 120: a server restarting
        mid-job is waited for)."""
        delay, started, attempt = 0.2, time.monotonic(), 0
        while True:
            try:
                response = method(request, timeout=timeout or self.timeout)
                self._reached = True
                return response
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE and self._may_retry(attempt, started):
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    attempt += 1
                    continue
                raise _domain_error(error) from None

    def _create(self, method, request) -> operations_pb2.Operation:
        """Start a job: `_call` of a create method, whose operation is this client's `waiting_on`
        (and is announced to `on_operation`) as soon as its name is known. A Ctrl-C or SIGTERM
        arriving while the call is in flight is held until then (a second one is not), so the
        caller's interrupt handling always knows the job it started: there is no moment at which
        a job exists on the server that an interrupted command cannot name or cancel."""
        with _interrupts_held():
            operation = self._call(method, request)
            self._waiting(operation.name)
        return operation

    def _waiting(self, name: str) -> None:
        if self.on_operation is not None and self.waiting_on != name:
            self.on_operation(name)
        self.waiting_on = name

    def _stream(self, method, request):
        try:
            yield from method(request, timeout=None)
        except grpc.RpcError as error:
            raise _domain_error(error) from None

    def _download(self, method, request, out_dir: str | Path, last: str | None = None) -> Path:
        """Stream an artifact's files into out_dir. A stream broken by UNAVAILABLE (the server
        restarted, a connection dropped) is resumed where it stopped (request.resume_file and
        resume_offset), retried as `_call` retries; a file's checksum covers all its parts."""
        receiver = _FileReceiver(Path(out_dir), last)
        delay, started, attempt = 0.2, time.monotonic(), 0
        try:
            while True:
                request.resume_file, request.resume_offset = receiver.position
                try:
                    receiver.receive(method(request, timeout=None))
                    self._reached = True
                    return receiver.finish()
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE or not self._may_retry(attempt, started):
                        raise _domain_error(error) from None
                    time.sleep(delay)
                    delay, attempt = min(delay * 2, 2.0), attempt + 1
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):  # nothing half-written stays: see finally
                raise StorageFull(f"disk full: writing {out_dir} failed ({os.strerror(error.errno)})") from None
            raise
        finally:
            receiver.discard()

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
        self._waiting(operation.name)
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

    def wait_for(self, name: str, progress=None, *, timeout: float | None = None) -> operations_pb2.Operation:
        """Reattach to an operation by name ("operations/ID") and wait for it (see `wait`)."""
        return self.wait(self.get_operation(name), progress, timeout=timeout)

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
        shard_size: int = SHARD_SIZE.default,
        max_length: int = 512,
        display_name: str = "",
        progress=None,
        by_path: bool = False,
    ) -> gradient_service_pb2.Dataset:
        """Register TRAIN.jsonl: its bytes in the request (up to the server's upload limit), or with
        `by_path` its path, which the server reads itself (it must see the same file: the embedded
        system, or a shared volume), or an "s3://bucket/key" string, an object the workers read
        from the system's object store; no byte limit in the last two (the server's limit on training
        sequences per dataset applies to all three)."""
        request = gradient_service_pb2.RegisterDatasetRequest(
            request_id=_request_id(),
            model=_model(model),
            display_name=display_name or "",
            shard_size=shard_size,
            max_length=max_length,
        )
        if isinstance(jsonl, str) and jsonl.startswith("s3://"):
            request.uri = jsonl
        elif by_path:
            request.uri = Path(jsonl).resolve().as_uri()
            digest = _sha256_file(Path(jsonl))
        else:
            request.jsonl = jsonl if isinstance(jsonl, bytes) else Path(jsonl).read_bytes()
            digest = hashlib.sha256(request.jsonl).hexdigest()
        if not request.uri.startswith("s3://"):
            # Datasets are content-addressed: one the server has is reused, not uploaded again.
            name = "datasets/" + dataset_id(digest, request.model.path, max_length, shard_size)
            try:
                return self.get_dataset(name)
            except NotFoundError:
                pass
        operation = self._create(self.gradients.RegisterDataset, request)
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
        request = factor_service_pb2.FitFactorsRequest(
            model=_model(model), dataset=dataset, **_with_enums(factor_service_pb2.FitFactorsRequest, options)
        )
        request.request_id = _request_id()
        operation = self._create(self.factors.FitFactors, request)
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

    def import_factors(
        self, directory: str | Path, *, attempts: int = 5, progress: Callable[[str], None] | None = None
    ) -> factor_service_pb2.FactorSet:
        """Upload a factor directory written by `influence fit`, of any size: only the files the
        server lacks, in chunks, each verified as it completes; an interrupted upload (UNAVAILABLE)
        is resumed from a new plan, at most `attempts` times. A set the server has is not sent."""
        directory = Path(directory)
        manifest_path = directory / "manifest.json"
        if not manifest_path.is_file():
            raise NotFoundError(f"no factors at {directory} (missing manifest.json)")
        manifest = manifest_path.read_bytes()
        for attempt in range(attempts):
            plan = self._call(
                self.factors.PlanFactorImport, factor_service_pb2.PlanFactorImportRequest(manifest=manifest)
            )
            if plan.published:
                return self.get_factor_set(plan.factor_set)
            try:
                return self.factors.ImportFactors(
                    _upload_chunks(directory, manifest, plan.missing_files, progress), timeout=None
                )
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                    raise _domain_error(error) from None
                time.sleep(min(0.2 * 2**attempt, 5.0))
        raise AssertionError("unreachable")

    def register_factors(self, directory: str | Path) -> factor_service_pb2.FactorSet:
        """Register a factor directory where it is (the server must share the filesystem and keep
        its artifacts in a local directory, as the embedded system does): nothing is copied."""
        uri = Path(directory).resolve().as_uri()
        return self._call(self.factors.RegisterFactors, factor_service_pb2.RegisterFactorsRequest(uri=uri))

    def download_factors(self, name: str, out_dir: str | Path) -> Path:
        """Write the factor set's files (manifest.json last) into out_dir: `influence score` reads it.
        Streamed to disk: memory does not grow with the set."""
        request = factor_service_pb2.StreamFactorsRequest(name=name)
        return self._download(self.factors.StreamFactors, request, out_dir, last="manifest.json")

    # -- the index ------------------------------------------------------------------------

    def build_index(
        self, model, factor_set: str, dataset: str, *, progress=None, **options
    ) -> gradient_service_pb2.Index:
        """Index `dataset`'s training gradients with `factor_set` (options: projection, rank, dim,
        seed, storage_dtype, batch_size, damping_factor, damping)."""
        request = gradient_service_pb2.BuildIndexRequest(
            model=_model(model),
            factor_set=factor_set,
            dataset=dataset,
            request_id=_request_id(),
            **_with_enums(gradient_service_pb2.BuildIndexRequest, options),
        )
        operation = self._create(self.gradients.BuildIndex, request)
        return self.unpack(self.wait(operation, progress), gradient_service_pb2.Index)

    def append_index(
        self, index: str, dataset: str, *, progress=None, batch_size: int = 0
    ) -> gradient_service_pb2.Index:
        request = gradient_service_pb2.AppendIndexRequest(
            index=index, dataset=dataset, batch_size=batch_size, request_id=_request_id()
        )
        operation = self._create(self.gradients.AppendIndex, request)
        return self.unpack(self.wait(operation, progress), gradient_service_pb2.Index)

    def get_index(self, name: str) -> gradient_service_pb2.Index:
        return self._call(self.gradients.GetIndex, gradient_service_pb2.GetIndexRequest(name=name))

    def register_index(self, directory: str | Path) -> gradient_service_pb2.Index:
        """Register an index directory in place (and its datasets), as `register_factors` does."""
        uri = Path(directory).resolve().as_uri()
        return self._call(self.gradients.RegisterIndex, gradient_service_pb2.RegisterIndexRequest(uri=uri))

    def download_index(self, name: str, out_dir: str | Path, *, index_files: bool = True) -> Path:
        """The index's files (manifest.json last) into out_dir, and each of its datasets into
        out_dir/datasets/{id} (one already there is not fetched again): a directory that
        `influence score --index` and `influence index append` read. Without `index_files`, only
        the datasets (an index registered in place is already up to date there)."""
        out_dir = Path(out_dir)
        index = self.get_index(name)
        for dataset in index.datasets:
            target = out_dir / "datasets" / dataset.removeprefix("datasets/")
            if not (target / "manifest.json").is_file():
                request = common_pb2.StreamArtifactFilesRequest(name=dataset)
                self._download(self.gradients.StreamDatasetFiles, request, target, last="manifest.json")
        if not index_files:
            return out_dir
        request = common_pb2.StreamArtifactFilesRequest(name=name)
        return self._download(self.gradients.StreamIndexFiles, request, out_dir, last="manifest.json")

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
        rescore: int | None = None,
        **options,
    ) -> query_service_pb2.ScoreResult:
        """Score queries against a dataset (recompute; options tfidf=K to score only TF-IDF
        candidates) or, with index="indexes/{id}" (dataset may be ""), against an index, the top
        `rescore` candidates per query rescored exactly (default: the server's, 2% of the corpus)."""
        request = query_service_pb2.ComputeScoresRequest(
            model=_model(model),
            factor_set=factor_set,
            dataset=dataset,
            queries=[
                query_service_pb2.Query(
                    id=q.id, prompt=q.prompt, completion=q.completion, group=getattr(q, "group", "")
                )
                for q in queries
            ],
            **options,
        )
        if damping is not None:
            request.damping = damping
        if rescore is not None:
            request.rescore = rescore
        request.request_id = _request_id()
        operation = self._create(self.queries.ComputeScores, request)
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
        operation = self._create(self.queries.ComputeSelfInfluence, request)
        return self.unpack(self.wait(operation, progress), query_service_pb2.ScoreResult)

    def get_result(self, name: str) -> query_service_pb2.ScoreResult:
        return self._call(self.queries.GetScoreResult, query_service_pb2.GetScoreResultRequest(name=name))

    def list_results(self) -> list[query_service_pb2.ScoreResult]:
        return _paged(
            lambda token: self._call(
                self.queries.ListScoreResults,
                query_service_pb2.ListScoreResultsRequest(page_size=100, page_token=token),
            ),
            "score_results",
        )

    def delete_result(self, name: str) -> None:
        self._call(self.queries.DeleteScoreResult, query_service_pb2.DeleteScoreResultRequest(name=name))

    def score_rows(self, name: str) -> Iterable[query_service_pb2.ScoreRow]:
        return self._stream(self.queries.StreamScoreRows, query_service_pb2.StreamScoreRowsRequest(name=name))

    def download_result(self, name: str, out_dir: str | Path) -> Path:
        """Write scores.safetensors and results.json (the CLI's output format) into out_dir."""
        request = common_pb2.StreamArtifactFilesRequest(name=name)
        return self._download(self.queries.StreamResultFiles, request, out_dir)


def model_spec(path: str | Path, device: str = "", dtype: str = "") -> common_pb2.ModelSpec:
    """A ModelSpec from words: device "cpu" | "cuda" ("": the worker pool's), dtype "float32" (default)
    | "bfloat16" | "float16" | "float64"."""
    return common_pb2.ModelSpec(
        path=str(path),
        device=enum_value(common_pb2.Device, device, "device"),
        dtype=enum_value(common_pb2.Dtype, dtype, "dtype"),
    )


def _model(model) -> common_pb2.ModelSpec:
    if isinstance(model, common_pb2.ModelSpec):
        return model
    return model_spec(Path(model).resolve())


def _with_enums(message_type, options: dict) -> dict:
    """`options` with words ("kfac", "bfloat16") for the message's enum fields turned into numbers."""
    fields = message_type.DESCRIPTOR.fields_by_name
    converted = {}
    for key, value in options.items():
        field = fields.get(key)
        if field is not None and field.enum_type is not None and isinstance(value, str):
            value = enum_value(field.enum_type, value, key)
        converted[key] = value
    return converted


def operation_metadata(operation: operations_pb2.Operation) -> common_pb2.OperationMetadata:
    metadata = common_pb2.OperationMetadata()
    operation.metadata.Unpack(metadata)
    return metadata


@contextlib.contextmanager
def _interrupts_held():
    """SIGINT and SIGTERM received inside the block are delivered when it ends, under the handlers
    in place before it (a second one, an insisting user, at once). Only on the main thread, where
    Python runs signal handlers; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    def hold(number, frame):
        if held:  # the second: deliver it now, instead of the first
            held.clear()
            _restore(previous)
            signal.raise_signal(number)
        else:
            held.append(number)

    for number in previous:
        signal.signal(number, hold)
    try:
        yield
    finally:
        _restore(previous)
        if held:
            signal.raise_signal(held[0])


def _restore(handlers: dict) -> None:
    for number, handler in handlers.items():
        signal.signal(number, handler if handler is not None else signal.SIG_DFL)


def _request_id() -> str:
    """A fresh id per logical call: `_call` resends the same request (same id) after UNAVAILABLE,
    so the server runs it once; a new call, even with identical content, is a new job."""
    return uuid.uuid4().hex


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _paged(fetch, field: str) -> list:
    items, token = [], ""
    while True:
        response = fetch(token)
        items.extend(getattr(response, field))
        token = response.next_page_token
        if not token:
            return items


UPLOAD_CHUNK_BYTES = 4 * 2**20


def _upload_chunks(directory: Path, manifest: bytes, files, progress=None):
    """manifest.json (its size on its first chunk), then each file read from disk in chunks."""
    yield common_pb2.FileChunk(file="manifest.json", offset=0, data=manifest, size=len(manifest))
    for name in files:
        path = directory / name
        size = path.stat().st_size
        if progress is not None:
            progress(name)
        with path.open("rb") as handle:
            offset = 0
            while True:
                data = handle.read(UPLOAD_CHUNK_BYTES)
                if not data and offset:
                    break
                yield common_pb2.FileChunk(file=name, offset=offset, data=data, size=size if offset == 0 else 0)
                offset += len(data)
                if offset >= size:
                    break


class _FileReceiver:
    """Writes streamed files into a directory as they arrive (each to a temporary file, checked
    against the sha256 its first chunk carries, then renamed into place), across as many streams
    as a download takes: `position` is where a resumed stream must start. `last` (a manifest) is
    removed first and put in place after every other file. Memory holds one chunk at a time."""

    def __init__(self, out_dir: Path, last: str | None):
        self.out_dir, self.last = out_dir, last
        out_dir.mkdir(parents=True, exist_ok=True)
        if last:
            (out_dir / last).unlink(missing_ok=True)
        self.temporaries: dict[str, Path] = {}
        self.expected: dict[str, str] = {}
        self.digests: dict[str, hashlib._Hash] = {}
        self.sizes: dict[str, int] = {}
        self.current: str | None = None
        self.handle = None

    @property
    def position(self) -> tuple[str, int]:
        """(file, offset) of the first byte not yet received ("" before any)."""
        return (self.current, self.sizes[self.current]) if self.current else ("", 0)

    def receive(self, chunks) -> None:
        for chunk in chunks:
            name = chunk.file
            if name != self.current:
                self._open(name, chunk.sha256)
            if chunk.offset != self.sizes[name]:
                raise InternalError(f"stream of {name} skipped bytes at offset {chunk.offset}")
            self.handle.write(chunk.data)
            self.digests[name].update(chunk.data)
            self.sizes[name] += len(chunk.data)

    def _open(self, name: str, sha256: str) -> None:
        if self.handle is not None:
            self.handle.close()
        parts = name.split("/")
        if any(not part or part.startswith(".") for part in parts) or name in self.temporaries:
            raise InternalError(f"the server sent an invalid or repeated file {name!r}")
        self.current = name
        target = self.out_dir.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.temporaries[name] = target.with_name(f".{target.name}.part")
        self.handle = self.temporaries[name].open("wb")
        self.digests[name], self.sizes[name], self.expected[name] = hashlib.sha256(), 0, sha256

    def finish(self) -> Path:
        self.handle.close() if self.handle is not None else None
        self.handle = None
        for name, digest in self.digests.items():
            if self.expected[name] and digest.hexdigest() != self.expected[name]:
                raise InternalError(f"{name} arrived corrupted (sha256 mismatch)")
        for name in sorted(self.temporaries, key=lambda n: n == self.last):
            self.temporaries[name].replace(self.out_dir.joinpath(*name.split("/")))
        self.temporaries.clear()
        return self.out_dir

    def discard(self) -> None:
        if self.handle is not None:
            self.handle.close()
        for temporary in self.temporaries.values():
            temporary.unlink(missing_ok=True)
