"""A deployed system's jobs. `influence operations --server HOST:PORT`: the jobs it keeps (newest
first, optionally of one --kind), or with --follow NAME one job followed to its end with progress
bars. `influence wait operations/ID --server HOST:PORT`: reattach to one, download what it made.

    NAME  KIND  STATE  PHASE  DONE/TOTAL UNIT  TARGET  CREATED        one line per operation
    {"event": "operation", "name", "kind", "state", ...}                   the same with --json

Following ends with the job: exit 0 when it succeeded, else the job's error as any command's
error (one line, the exit code of its status).
"""

from __future__ import annotations

import datetime
import json
import sys

from ..client import InfluenceClient, operation_metadata
from ..errors import InputError
from ..gen.influence.v1 import factor_service_pb2, gradient_service_pb2, query_service_pb2
from .flags import CLIENT_CONNECTION, DEPLOYED, JSON, QUIET, Flag, add
from .progress import StageBars, phase_of
from .running import client_options, done, log, out_dir, progress_for

CANCELLED = 1  # google.rpc.Code.CANCELLED


def _state(operation) -> str:
    if not operation.done:
        return "running"
    if not operation.HasField("error"):
        return "succeeded"
    return "cancelled" if operation.error.code == CANCELLED else "failed"


def describe(operation) -> dict:
    """What `influence operations` shows of an operation."""
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


def add_operations_flags(parser) -> None:
    add(
        parser,
        DEPLOYED,
        Flag("--kind", default="", help="only jobs of this kind, e.g. compute_scores, fit_factors"),
        Flag("--follow", default="", metavar="NAME", help="follow operations/ID to its end"),
        QUIET,
        JSON,
        *CLIENT_CONNECTION,
    )


def run_operations(args) -> int:
    if not args.server:
        raise InputError("influence operations lists a deployed system's jobs: give --server HOST:PORT")
    with InfluenceClient(**client_options(args)) as client:
        if args.follow:
            name = args.follow if args.follow.startswith("operations/") else f"operations/{args.follow}"
            with progress_for(args) as bars:
                operation = client.wait(client.get_operation(name), bars)
            record = describe(operation)
            done(args, f"{name}: {record['state']} -> {record['target']}", **record)
            return 0
        records = [describe(operation) for operation in client.list_operations(args.kind)]
    if args.json:
        for record in records:
            print(json.dumps({"event": "operation", **record}), flush=True)
    else:
        for record in records:
            print(_line(record))
    return 0


def add_wait_flags(parser) -> None:
    add(
        parser,
        Flag("operation", help="operations/ID (printed when a command with --server starts a job)"),
        DEPLOYED.replace(required=True),
        Flag("--out", default="", help="download the factor set, result or index into this directory"),
        Flag("--cancel", action="store_true", help="cancel the operation instead of waiting"),
        QUIET,
        *CLIENT_CONNECTION,
    )


def run_wait(args) -> int:
    """Reattach to a server operation: wait for it with progress bars, then download what it made
    into --out (a factor set, a result or an index); print the resource's name. Interrupting only
    stops watching: the operation goes on (cancel it with --cancel)."""
    if not args.operation.startswith("operations/"):
        raise InputError(f"expected an operation name 'operations/ID', got {args.operation!r}")
    out = out_dir(args.out, args) if args.out else None
    with InfluenceClient(**client_options(args)) as client:
        if args.cancel:
            client.cancel(args.operation)
            log(args, f"influence: cancelled {args.operation}")
            return 0
        try:
            with StageBars(not args.quiet) as bars:
                operation = client.wait_for(args.operation, bars)
        except KeyboardInterrupt:
            print(f"influence: {args.operation} goes on on the server", file=sys.stderr)
            raise
        downloads = {
            "FactorSet": (factor_service_pb2.FactorSet, client.download_factors),
            "ScoreResult": (query_service_pb2.ScoreResult, client.download_result),
            "Index": (gradient_service_pb2.Index, client.download_index),
            "Dataset": (gradient_service_pb2.Dataset, None),
        }
        kind = operation.response.type_url.rpartition(".")[2]
        if kind not in downloads:
            print(args.operation)
            return 0
        message_type, download = downloads[kind]
        resource = client.unpack(operation, message_type)
        if out is not None and download is not None:
            download(resource.name, out)
        print(resource.name)
        log(args, f"{args.operation} done: {resource.name}" + (f" -> {out}" if out is not None and download else ""))
    return 0
