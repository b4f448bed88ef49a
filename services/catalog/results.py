"""Score results: results/{id}/ holds results.json (the report: query_svc/reports.py),
scores.safetensors (the scores and the top-k's breakdowns) and, when asked for, report.html; its
metadata (ResultInfo) says what was scored with what.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..storage import ArtifactStore, ArtifactWriter
from .collection import Collection, Published, reading_metadata
from .datasets import dataset_path, parse_dataset_path
from .factor_sets import factor_set_path, parse_factor_set_path
from .indexes import index_path, parse_index_path

KIND = "result"
REPORT = "results.json"
SCORES = "scores.safetensors"
REPORT_HTML = "report.html"


@dataclass(frozen=True)
class ResultInfo:
    """A result's metadata: its kind ("pairwise" or "self"), the factor set and the dataset or
    index ("" when none) it was computed with, num_queries x num_train scores, the modules scored."""

    id: str
    result_kind: str
    factor_set_id: str
    dataset_id: str
    index_id: str
    num_queries: int
    num_train: int
    modules: tuple[str, ...] = ()
    create_time: float | None = None

    @property
    def name(self) -> str:
        return result_path(self.id)

    @property
    def factor_set(self) -> str:
        return factor_set_path(self.factor_set_id)

    @property
    def dataset(self) -> str:
        """The scored dataset's name ("" for a result scored against an index)."""
        return dataset_path(self.dataset_id) if self.dataset_id else ""

    @property
    def index(self) -> str:
        """The index's name ("" unless scored against one)."""
        return index_path(self.index_id) if self.index_id else ""

    @classmethod
    def from_metadata(cls, metadata: dict, where: str = "result") -> ResultInfo:
        with reading_metadata(where):
            return cls(
                id=parse_result_path(metadata["name"]),
                result_kind=metadata["result_kind"],
                factor_set_id=parse_factor_set_path(metadata["factor_set"]),
                dataset_id=parse_dataset_path(metadata["dataset"]) if metadata["dataset"] else "",
                index_id=parse_index_path(metadata["index"]) if metadata.get("index") else "",
                num_queries=metadata["num_queries"],
                num_train=metadata["num_train"],
                modules=tuple(metadata.get("modules", ())),
                create_time=metadata.get("create_time"),
            )

    def to_metadata(self) -> dict:
        return {
            "kind": KIND,
            "name": self.name,
            "result_kind": self.result_kind,
            "factor_set": self.factor_set,
            "dataset": self.dataset,
            "index": self.index,
            "num_queries": self.num_queries,
            "num_train": self.num_train,
            "modules": list(self.modules),
            "create_time": self.create_time,
        }


def _info(result_id: str, metadata: dict) -> ResultInfo:
    return ResultInfo.from_metadata(metadata, RESULTS.describe(result_id))


RESULTS: Collection[ResultInfo] = Collection("results", "results/", "result", _info)


def result_path(result_id: str) -> str:
    """ "results/{id}" """
    return RESULTS.path(result_id)


def parse_result_path(name: str, field: str = "name") -> str:
    """The id in "results/{id}" (InputError naming `field` otherwise)."""
    return RESULTS.parse(name, field)


def publish(
    store: ArtifactStore, info: ResultInfo, report: dict, tensors: dict[str, torch.Tensor], html: str | None = None
) -> ResultInfo:
    """Write results.json, scores.safetensors and (if given) report.html, then the manifest."""
    writer = ArtifactWriter(store, RESULTS.prefix(info.id))
    writer.add_bytes(REPORT, json.dumps(report, indent=2, allow_nan=False).encode())
    writer.add_tensors(SCORES, tensors)
    if html is not None:
        writer.add_bytes(REPORT_HTML, html.encode())
    writer.publish(info.to_metadata())
    return info


def read_report(result: Published[ResultInfo]) -> dict:
    """Its results.json."""
    return json.loads(result.reader.read_bytes(REPORT))
