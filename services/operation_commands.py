"""`influence operations --server HOST:PORT`: the jobs a deployed system keeps (newest first,
optionally of one --kind), or with --follow NAME one job followed to its end with progress bars.

    NAME  KIND  STATE  PHASE  DONE/TOTAL UNIT  TARGET  CREATED        one line per operation
    {"event": "operation", "name", "kind", "state", ...}                   the same with --json

Following ends with the job: exit 0 when it succeeded, else the job's error as any command's
error (one line, the exit code of its status).
"""

from __future__ import annotations

import datetime
import json

from .commands import _done, client_security, progress_for
from .errors import InputError
from .progress_bars import phase_of

CANCELLED = 1  # google.rpc.Code.CANCELLED


def _state(operation) -> str:
    if not operation.done:
        return "running"
    if not operation.HasField("error"):
        return "succeeded"
    return "cancelled" if operation.error.code == CANCELLED else "failed"


def describe(operation) -> dict:
    """What `influence operations` shows of an operation."""
    from .client import operation_metadata

    metadata = operation_metadata(operation)
    phase = phase_of(metadata)
    record = {
        "name": operation.name,
        "kind": metadata.kind,
        "state": _state(operation),
        "phase": phase.name,
        "done": phase.done,
        "total": phase.total,
        "unit": phase.unit,
        "target": metadata.target,
        "create_time": metadata.create_time.ToDatetime(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if operation.HasField("error"):
        record["error"] = operation.error.message
    return record


def _line(record: dict) -> str:
    progress = f"{record['done']}/{record['total']} {record['unit']}" if record["total"] else "-"
    error = f"  ({record['error']})" if record.get("error") else ""
    return (
        f"{record['name']:<32} {record['kind']:<24} {record['state']:<10} {record['phase'] or '-':<18} "
        f"{progress:<16} {record['target'] or '-':<30} {record['create_time']}{error}"
    )


def run_operations(args) -> int:
    from .client import InfluenceClient

    if not args.server:
        raise InputError("influence operations lists a deployed system's jobs: give --server HOST:PORT")
    with InfluenceClient(args.server, **client_security(args)) as client:
        if args.follow:
            name = args.follow if args.follow.startswith("operations/") else f"operations/{args.follow}"
            with progress_for(args) as bars:
                operation = client.wait(client.get_operation(name), bars)
            record = describe(operation)
            _done(args, f"{name}: {record['state']} -> {record['target']}", **record)
            return 0
        records = [describe(operation) for operation in client.list_operations(args.kind)]
    if args.json:
        for record in records:
            print(json.dumps({"event": "operation", **record}), flush=True)
    else:
        for record in records:
            print(_line(record))
    return 0
