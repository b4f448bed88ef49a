"""Training examples and queries as users write them (JSONL), read and validated with errors that
name the file and line. No torch here: the client and the CLI's checks import this alone.

    TRAIN.jsonl     {"id": optional string, "text": string} per line, or a chat:
                    {"id": optional string, "messages": [{"role": string, "content": string}, ...]}
                    or pre-tokenized: {"id": optional string, "tokens": [token id, ...]}
    QUERIES.jsonl   {"id": optional string, "prompt": string, "completion": string,
                     "group": optional string (related queries, e.g. translations)} per line, or a chat:
                    {"id", "messages": [..., {"role": "assistant", "content": the completion}], "group"}
Ids default to the record's position (from 0); duplicates are an error. Each training example
read from a file keeps its 1-based line there (`TrainingExample.line`: blank lines are skipped but
counted), so results can point back into the user's file. Chats are rendered with the model's
chat template where the tokenizer is (engine/data.py), not here.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, NotFoundError


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation: its role ("system", "user", "assistant", ...) and text."""

    role: str
    content: str


@dataclass(frozen=True)
class TrainingExample:
    """A training text, or a chat (`messages`) or token ids (`tokens`), whose `text` is empty until
    the tokenizer renders it (engine/data.rendered: the chat template, or the decoded tokens)."""

    id: str
    text: str
    messages: tuple[ChatMessage, ...] = ()
    tokens: tuple[int, ...] = ()
    line: int | None = None  # its 1-based line in the file it was read from (None: not read from a file)


@dataclass(frozen=True)
class Query:
    """A prompt and its completion, or a chat (`messages`, prompt and completion empty) whose last
    assistant turn is the completion."""

    id: str
    prompt: str
    completion: str
    group: str = ""  # related queries share a group (the report's cross-query table)
    messages: tuple[ChatMessage, ...] = ()


def max_line_bytes() -> int:
    """The longest JSONL line accepted (env INFLUENCE_MAX_LINE_BYTES, default 4 MiB): one huge
    line would otherwise be tokenised whole, in a worker's memory, before truncation."""
    return int(os.environ.get("INFLUENCE_MAX_LINE_BYTES", DEFAULT_MAX_LINE_BYTES))


DEFAULT_MAX_LINE_BYTES = 4 * 2**20


def _existing(path: str | Path, kind: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{kind} file not found: {path}")
    return path


def _too_long(source: str, line_number: int, length: int, limit: int) -> InputError:
    return InputError(
        f"{source}:{line_number}: line of {length} bytes is over the limit of {limit} (INFLUENCE_MAX_LINE_BYTES)"
    )


def file_lines(path: Path, source: str | None = None) -> Iterator[bytes]:
    """The file's lines as bytes (without their newline), one at a time: memory holds one line,
    never more than `max_line_bytes` of it (a longer line is an InputError naming `source` and the
    line, its length counted without keeping it)."""
    limit, source = max_line_bytes(), source or str(path)
    with path.open("rb") as handle:
        for line_number, line in enumerate(iter(lambda: handle.readline(limit + 2), b""), start=1):
            content = line[:-1] if line.endswith(b"\n") else line
            if len(content) > limit:
                length = len(content)
                while not line.endswith(b"\n") and (line := handle.readline(1 << 20)):
                    length += len(line) - line.endswith(b"\n")
                raise _too_long(source, line_number, length, limit)
            yield content


def decoded_lines(raw_lines: Iterable[bytes], source: str) -> Iterable[str]:
    """Lines (bytes, e.g. `file_lines` or `data.split(b"\\n")`) as text; invalid UTF-8 or a line
    over `max_line_bytes` is an InputError naming `source` and the line."""
    limit = max_line_bytes()
    for line_number, raw in enumerate(raw_lines, start=1):
        if len(raw) > limit:
            raise _too_long(source, line_number, len(raw), limit)
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError(f"{source}:{line_number}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def jsonl_records(lines: Iterable[str], source: str) -> Iterator[tuple[int, dict]]:
    """(1-based line number, JSON object), one per non-blank line, as they are read; errors name
    `source` and the line."""
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{source}:{line_number}: malformed JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{source}:{line_number}: expected a JSON object, got {type(record).__name__}")
        yield line_number, record


def parse_jsonl(lines: Iterable[str], source: str, kind: str) -> list[dict]:
    """`jsonl_records` as a list; InputError if there are none."""
    records = [record for _, record in jsonl_records(lines, source)]
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


def _messages(record: dict, where: str, *, query: bool) -> tuple[ChatMessage, ...]:
    """A record's "messages": a non-empty list of {"role": string, "content": string}; a query's
    ends with an assistant turn (its completion) after at least one other turn."""
    raw = record["messages"]
    others = [field for field in (("prompt", "completion") if query else ("text",)) if field in record]
    if others:
        raise InputError(f"{where}: give 'messages' or {' and '.join(others)!r}, not both")
    if not isinstance(raw, list) or not raw:
        raise InputError(f'{where}: field \'messages\' must be a non-empty list of {{"role", "content"}} objects')
    messages = []
    for number, message in enumerate(raw, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"]:
            raise InputError(f"{where}: message {number} must be an object with a string 'role'")
        if not isinstance(message.get("content"), str):
            raise InputError(f"{where}: message {number}: field 'content' must be a string")
        messages.append(ChatMessage(message["role"], message["content"]))
    if query:
        if messages[-1].role != "assistant" or not messages[-1].content.strip():
            raise InputError(
                f"{where}: the last message must be the assistant's completion (role 'assistant', not empty)"
            )
        if len(messages) < 2:
            raise InputError(f"{where}: the completion needs at least one message before it to answer")
    return tuple(messages)


def _tokens(record: dict, where: str) -> tuple[int, ...]:
    """A record's "tokens": a list of at least 2 non-negative integer token ids."""
    if "text" in record:
        raise InputError(f"{where}: give 'tokens' or 'text', not both")
    tokens = record["tokens"]
    if not isinstance(tokens, list) or not all(type(token) is int and token >= 0 for token in tokens):
        raise InputError(f"{where}: field 'tokens' must be a list of non-negative integer token ids")
    if len(tokens) < 2:
        raise InputError(f"{where}: field 'tokens' has fewer than 2 tokens; nothing to predict")
    return tuple(tokens)


def _record_id(record: dict, default: str, where: str) -> str:
    raw = record.get("id", default)
    if raw is None:
        raw = default
    if not isinstance(raw, (str, int)):
        raise InputError(f"{where}: field 'id' must be a string")
    return str(raw)


def _duplicate(where: str, example_id: str) -> InputError:
    return InputError(f"{where}: duplicate id '{example_id}'")


def read_training_jsonl(path: str | Path) -> list[TrainingExample]:
    """Read TRAIN.jsonl: one {"id": optional string, "text": string} (or "messages") per line."""
    path = _existing(path, "training data")
    return list(stream_training_jsonl(lambda: file_lines(path), str(path)))


def stream_training_jsonl(open_lines: Callable[[], Iterable[bytes]], source: str) -> Iterator[TrainingExample]:
    """TRAIN.jsonl's examples as its lines are read (`open_lines()`: its lines as bytes, e.g.
    `file_lines`), each validated on the way; errors name `source` and the line or record. Memory
    holds one line and 8 bytes per record (`unique_examples`); no lines at all is an InputError."""
    empty = True
    for example in unique_examples(lambda: jsonl_records(decoded_lines(open_lines(), source), source), source):
        empty = False
        yield example
    if empty:
        raise InputError(f"training data file is empty: {source}")


def training_examples(records: Sequence[dict], source: str) -> list[TrainingExample]:
    """Validate training records ({"id": optional, "text": string} or "messages"); ids default to
    the position; no line numbers (they were not read from a file)."""
    return list(unique_examples(lambda: ((None, record) for record in records), source))


def unique_examples(
    open_records: Callable[[], Iterable[tuple[int | None, dict]]], source: str
) -> Iterator[TrainingExample]:
    """Training examples of the (line or None, record) pairs `open_records()` gives, one at a
    time, each validated as it comes and keeping its line. Ids must be unique: each one's 64-bit
    digest is kept (8 bytes a record), a repeated digest is looked for after the last record, and
    only then are the records read again (a second `open_records()`) to name the repeated id and
    where it repeats."""
    digests = [array("Q") for _ in range(256)]  # by the digest's low byte: each set of them stays small
    for number, (line, record) in enumerate(open_records()):
        where = f"{source}: record {number + 1}"
        example_id = _record_id(record, str(number), where)
        if "messages" in record:
            example = TrainingExample(example_id, "", _messages(record, where, query=False), line=line)
        elif "tokens" in record:
            example = TrainingExample(example_id, "", tokens=_tokens(record, where), line=line)
        else:
            example = TrainingExample(example_id, _string_field(record, "text", where), line=line)
        digest = _id_digest(example.id)
        digests[digest & 0xFF].append(digest)
        yield example
    repeated = {digest for bucket in digests for digest in _repeats(bucket)}
    if repeated:  # a repeated id, or two ids with one digest (then no error)
        first: dict[str, int] = {}
        for number, (_, record) in enumerate(open_records()):
            example_id = _record_id(record, str(number), "")
            if _id_digest(example_id) in repeated:
                if example_id in first:
                    raise _duplicate(f"{source}: record {number + 1}", example_id)
                first[example_id] = number


def _id_digest(example_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(example_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def _repeats(values: array) -> set[int]:
    seen: set[int] = set()
    return {value for value in values if value in seen or seen.add(value)}


def read_queries_jsonl(path: str | Path) -> list[Query]:
    """Read QUERIES.jsonl: one {"id": optional, "prompt", "completion" (or "messages"), "group": optional} per line."""
    path = _existing(path, "queries")
    return query_records(parse_jsonl(decoded_lines(file_lines(path), str(path)), str(path), "queries"), str(path))


def query_records(records: Sequence[dict], source: str) -> list[Query]:
    """Validate query records; ids default to the position."""
    if not records:
        raise InputError(f"no queries in {source}")
    seen: set[str] = set()
    queries = []
    for number, record in enumerate(records):
        where = f"{source}: query {number + 1}"
        query_id = _record_id(record, str(number), where)
        if query_id in seen:
            raise _duplicate(where, query_id)
        seen.add(query_id)
        group = _string_field(record, "group", where) if record.get("group") is not None else ""
        if "messages" in record:
            queries.append(Query(query_id, "", "", group, _messages(record, where, query=True)))
            continue
        prompt = _string_field(record, "prompt", where, allow_empty=True)
        queries.append(Query(query_id, prompt, _string_field(record, "completion", where), group))
    return queries
