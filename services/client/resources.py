"""`InfluenceClient`: the resource calls of the three services (datasets, factor sets, indexes,
score results), each a create call that waits for its operation or a Get/List/Delete/Stream.
Channels, retries and operations are its `Connection`'s (connection.py); files travel by
transfers.py."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

from ..engine.records import Query
from ..enums import enum_value
from ..errors import NotFoundError
from ..gen.influence.v1 import common_pb2, factor_service_pb2, gradient_service_pb2, query_service_pb2
from ..options import MAX_LENGTH, SHARD_SIZE
from ..wire import dataset_id
from .connection import Connection, paged, request_id
from .transfers import dataset_upload, sha256_file, upload_chunks


class InfluenceClient(Connection):
    """A client of the three services and the Operations service (see `Connection` for the
    targets, the token, TLS and the retry budget)."""

    # -- datasets -------------------------------------------------------------------------

    def register_dataset(
        self,
        model: str | common_pb2.ModelSpec,
        jsonl: str | Path | bytes,
        *,
        shard_size: int = SHARD_SIZE.default,
        max_length: int = MAX_LENGTH.default,
        display_name: str = "",
        progress=None,
        by_path: bool = False,
        corpus: gradient_service_pb2.Corpus | None = None,
    ) -> gradient_service_pb2.Dataset:
        """Register TRAIN.jsonl: its content (a path or bytes), uploaded in chunks (up to the
        server's upload limit), or with `by_path` its path, which the server reads itself (it must
        see the same file: the embedded system, or a shared volume), or an "s3://bucket/key" string,
        an object the workers read from the system's object store (with `corpus`: a Parquet object,
        or a prefix "s3://bucket/dir/" of Parquet, `datasets` or token shards); no byte limit in the
        last two (the server's limit on training sequences per dataset applies to all three)."""
        request = gradient_service_pb2.RegisterDatasetRequest(
            request_id=request_id(),
            model=_model(model),
            display_name=display_name or "",
            shard_size=shard_size,
            max_length=max_length,
        )
        content: Path | bytes | None = None
        if isinstance(jsonl, str) and jsonl.startswith("s3://"):
            request.uri = jsonl
            if corpus is not None:
                request.corpus.CopyFrom(corpus)
        elif by_path:
            request.uri = Path(jsonl).resolve().as_uri()
            digest = sha256_file(Path(jsonl))
        else:
            content = jsonl if isinstance(jsonl, bytes) else Path(jsonl)
            digest = hashlib.sha256(content).hexdigest() if isinstance(content, bytes) else sha256_file(content)
        if not request.uri.startswith("s3://"):
            # Datasets are content-addressed: one the server has is reused, not uploaded again.
            spec = request.model
            name = "datasets/" + dataset_id(digest, spec.path, max_length, shard_size, spec.base_model)
            try:
                return self.get_dataset(name)
            except NotFoundError:
                pass
        if content is None:
            operation = self._create(self.gradients.RegisterDataset, request)
        else:
            operation = self._create(self.gradients.UploadDataset, lambda: dataset_upload(request, content))
        return self.unpack(self.wait(operation, progress), gradient_service_pb2.Dataset)

    def get_dataset(self, name: str) -> gradient_service_pb2.Dataset:
        return self._call(self.gradients.GetDataset, gradient_service_pb2.GetDatasetRequest(name=name))

    def list_datasets(self) -> list[gradient_service_pb2.Dataset]:
        return paged(
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
        request.request_id = request_id()
        operation = self._create(self.factors.FitFactors, request)
        return self.unpack(self.wait(operation, progress), factor_service_pb2.FactorSet)

    def get_factor_set(self, name: str) -> factor_service_pb2.FactorSet:
        return self._call(self.factors.GetFactorSet, factor_service_pb2.GetFactorSetRequest(name=name))

    def list_factor_sets(self) -> list[factor_service_pb2.FactorSet]:
        return paged(
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
        is resumed from a new plan after the retry policy's backoff, at most `attempts` tries in
        all. A set the server has is not sent."""
        directory = Path(directory)
        manifest_path = directory / "manifest.json"
        if not manifest_path.is_file():
            raise NotFoundError(f"no factors at {directory} (missing manifest.json)")
        manifest = manifest_path.read_bytes()

        def plan_and_upload() -> factor_service_pb2.FactorSet:
            request = factor_service_pb2.PlanFactorImportRequest(manifest=manifest)
            plan = self._call(self.factors.PlanFactorImport, request)
            if plan.published:
                return self.get_factor_set(plan.factor_set)
            chunks = upload_chunks(directory, manifest, plan.missing_files, progress)
            return self.factors.ImportFactors(chunks, timeout=None)

        return self.retry.run(plan_and_upload, retries=attempts - 1)

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
            request_id=request_id(),
            **_with_enums(gradient_service_pb2.BuildIndexRequest, options),
        )
        operation = self._create(self.gradients.BuildIndex, request)
        return self.unpack(self.wait(operation, progress), gradient_service_pb2.Index)

    def append_index(
        self, index: str, dataset: str, *, progress=None, batch_size: int = 0
    ) -> gradient_service_pb2.Index:
        request = gradient_service_pb2.AppendIndexRequest(
            index=index, dataset=dataset, batch_size=batch_size, request_id=request_id()
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
        """Score queries against a dataset (recompute; options bm25=K or tfidf=K to score only
        each query's K lexical candidates) or, with index="indexes/{id}" (dataset may be ""), against
        an index, the top `rescore` candidates per query rescored exactly (default: the server's,
        100 candidates), with lexical=K also each query's K best sequences by BM25 over the index's
        training text (results.json's index.sources: what each source held of the final top-k).
        Option bottom_k=N also keeps each query's N most negative sequences (with an index:
        `rescore` candidates from each end of its ranking)."""
        request = query_service_pb2.ComputeScoresRequest(
            model=_model(model),
            factor_set=factor_set,
            dataset=dataset,
            queries=[
                query_service_pb2.Query(
                    id=q.id,
                    prompt=q.prompt,
                    completion=q.completion,
                    group=getattr(q, "group", ""),
                    messages=[
                        query_service_pb2.ChatMessage(role=m.role, content=m.content)
                        for m in getattr(q, "messages", ())
                    ],
                )
                for q in queries
            ],
            **options,
        )
        if damping is not None:
            request.damping = damping
        if rescore is not None:
            request.rescore = rescore
        request.request_id = request_id()
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
        request.request_id = request_id()
        operation = self._create(self.queries.ComputeSelfInfluence, request)
        return self.unpack(self.wait(operation, progress), query_service_pb2.ScoreResult)

    def get_result(self, name: str) -> query_service_pb2.ScoreResult:
        return self._call(self.queries.GetScoreResult, query_service_pb2.GetScoreResultRequest(name=name))

    def list_results(self) -> list[query_service_pb2.ScoreResult]:
        return paged(
            lambda token: self._call(
                self.queries.ListScoreResults,
                query_service_pb2.ListScoreResultsRequest(page_size=100, page_token=token),
            ),
            "score_results",
        )

    def delete_result(self, name: str) -> None:
        self._call(self.queries.DeleteScoreResult, query_service_pb2.DeleteScoreResultRequest(name=name))

    def score_rows(self, name: str, include_bottom: bool = False) -> Iterable[query_service_pb2.ScoreRow]:
        """The result's top-k rows, query by query (include_bottom: each query's bottom-k rows after
        its top ones, `row.bottom` set)."""
        request = query_service_pb2.StreamScoreRowsRequest(name=name, include_bottom=include_bottom)
        return self._stream(self.queries.StreamScoreRows, request)

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
