"""Training examples and queries as users write them (JSONL), read and validated with errors that
name the file and line. No torch here: the client and the CLI's checks import this alone.

    TRAIN.jsonl     {"id": optional string, "text": string} per line
    QUERIES.jsonl   {"id": optional string, "prompt": string, "completion": string,
                     "group": optional string (related queries, e.g. translations)} per line
Ids default to the record's position (from 0); duplicates are an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, NotFoundError


@dataclass(frozen=True)
class TrainingExample:
    id: str
    text: str


@dataclass(frozen=True)
class Query:
    id: str
    prompt: str
    completion: str
    group: str = ""  # related queries share a group (the report's cross-query table)


def max_line_bytes() -> int:
    """The longest JSONL line accepted (env INFLUENCE_MAX_LINE_BYTES, default 4 MiB): one huge
    line would otherwise be tokenised whole, in a worker's memory, before truncation."""
    return int(os.environ.get("INFLUENCE_MAX_LINE_BYTES", DEFAULT_MAX_LINE_BYTES))


DEFAULT_MAX_LINE_BYTES = 4 * 2**20


def _read_jsonl(path: str | Path, kind: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{kind} file not found: {path}")
    with path.open("rb") as handle:
        return parse_jsonl(decoded_lines(handle, str(path)), str(path), kind)


def decoded_lines(raw_lines: Iterable[bytes], source: str) -> Iterable[str]:
    """Lines (bytes, e.g. a binary file or `data.splitlines()`) as text; invalid UTF-8 or a line
    over `max_line_bytes` is an InputError naming `source` and the line."""
    limit = max_line_bytes()
    for line_number, raw in enumerate(raw_lines, start=1):
        if len(raw) > limit:
            raise InputError(
                f"{source}:{line_number}: line of {len(raw)} bytes is over the limit of {limit} "
                "(INFLUENCE_MAX_LINE_BYTES)"
            )
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError(f"{source}:{line_number}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def parse_jsonl_bytes(data: bytes, source: str, kind: str) -> list[dict]:
    """`parse_jsonl` of uploaded bytes, checked line by line as a file is (`decoded_lines`)."""
    return parse_jsonl(decoded_lines(data.split(b"\n"), source), source, kind)


def parse_jsonl(lines: Iterable[str], source: str, kind: str) -> list[dict]:
    """JSON objects, one per non-blank line; errors name `source` and the line number."""
    records = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{source}:{line_number}: malformed JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{source}:{line_number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    if not records:
        raise InputError(f"{kind} file is empty: {source}")
    return records


def _string_field(record: dict, field: str, where: str, *, allow_empty: bool = False) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{field}' must be a string")
    if not allow_empty and not value.strip():
        raise InputError(f"{where}: field '{field}' is empty")
    return value


def _record_id(record: dict, default: str, where: str, seen: set[str]) -> str:
    raw = record.get("id", default)
    if raw is None:
        raw = default
    if not isinstance(raw, (str, int)):
        raise InputError(f"{where}: field 'id' must be a string")
    example_id = str(raw)
    if example_id in seen:
        raise InputError(f"{where}: duplicate id '{example_id}'")
    seen.add(example_id)
    return example_id


def read_training_jsonl(path: str | Path) -> list[TrainingExample]:
    """Read TRAIN.jsonl: one {"id": optional string, "text": string} per line."""
    return training_examples(_read_jsonl(path, "training data"), str(path))


def training_examples(records: Sequence[dict], source: str) -> list[TrainingExample]:
    """Validate training records ({"id": optional, "text": string}); ids default to the line position."""
    seen: set[str] = set()
    examples = []
    for number, record in enumerate(records):
        where = f"{source}: record {number + 1}"
        examples.append(
            TrainingExample(
                id=_record_id(record, str(number), where, seen),
                text=_string_field(record, "text", where),
            )
        )
    return examples


def read_queries_jsonl(path: str | Path) -> list[Query]:
    """Read QUERIES.jsonl: one {"id": optional, "prompt", "completion", "group": optional} per line."""
    return query_records(_read_jsonl(path, "queries"), str(path))


def query_records(records: Sequence[dict], source: str) -> list[Query]:
    """Validate query records; ids default to the position."""
    if not records:
        raise InputError(f"no queries in {source}")
    seen: set[str] = set()
    queries = []
    for number, record in enumerate(records):
        where = f"{source}: query {number + 1}"
        queries.append(
            Query(
                id=_record_id(record, str(number), where, seen),
                prompt=_string_field(record, "prompt", where, allow_empty=True),
                completion=_string_field(record, "completion", where),
                group=_string_field(record, "group", where) if record.get("group") is not None else "",
            )
        )
    return queries
