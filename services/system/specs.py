"""Job specifications: what a job computes, as typed objects, stored once as JSON before its first
task runs (jobs/{id}/spec.json). Every task of a job parses the same spec once, so a redelivered
task recomputes exactly the same output.

Each service defines its jobs (a `Job` subclass per kind, beside its plan: factor_svc/jobs.py,
...); the runtime knows only this base and the generic encoding: the spec is the dataclass's fields
as JSON plus its "kind", and decoding follows the field types (nested dataclasses such as ModelRef
or FitConfig, lists of them such as the queries, optional values), ignoring keys the class does not
have, so a spec written before a field was removed still decodes.
"""

from __future__ import annotations

import dataclasses
import json
import time
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from ..engine.model_io import ModelRef
from ..errors import InputError


@dataclass
class Job:
    """Common to every job. `create_time` (submission) is the create_time of what the job
    publishes, so a retried task's manifest is byte-identical to the first one's."""

    kind: ClassVar[str] = ""  # the spec's "kind", and the kind of the plan that runs it
    model: ModelRef
    create_time: float = field(default_factory=time.time, kw_only=True)

    @property
    def num_shards(self) -> int:
        return 1

    @property
    def num_groups(self) -> int:
        """Module groups the job's per-group stages run over (plans.Stage.per_group)."""
        return 1


def encode_job(job: Job) -> bytes:
    return json.dumps({"kind": job.kind, **asdict(job)}, sort_keys=True).encode()


def decode_job(data: bytes, job_types: Mapping[str, type[Job]]) -> Job:
    """The typed job of a spec written by `encode_job`, its class chosen by its "kind" among
    `job_types` (InputError if it is not one)."""
    try:
        raw = json.loads(data)
        return _decode(job_types[raw.pop("kind")], raw)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(f"unreadable job spec ({type(error).__name__}: {error})") from None


def _decode(kind: Any, value: Any) -> Any:
    """`value` (parsed JSON) as the type `kind`: a dataclass from its fields (unknown keys
    ignored), a list (or a tuple[X, ...]) item by item, an optional as None or its type; anything else as it is."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [option for option in typing.get_args(kind) if option is not type(None)]
        return _decode(options[0], value) if len(options) == 1 else value
    if origin is list:
        (item,) = typing.get_args(kind)
        return [_decode(item, element) for element in value]
    if origin is tuple:  # tuple[X, ...]
        return tuple(_decode(typing.get_args(kind)[0], element) for element in value)
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(
            **{
                item.name: _decode(hints[item.name], value[item.name])
                for item in dataclasses.fields(kind)
                if item.init and item.name in value
            }
        )
    return value
