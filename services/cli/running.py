"""How a command runs: through a deployed system (--server) or an embedded one started for it,
with progress on stderr (or JSON lines on stdout with --json), its outcome as one line (or one
JSON object), its outputs in --out. An interrupted job goes with its command unless --detach."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..errors import InputError
from .progress import JsonProgress, StageBars

T = TypeVar("T")


def log(args, message: str) -> None:
    if not getattr(args, "quiet", False) and not getattr(args, "json", False):
        print(message, file=sys.stderr)


def progress_for(args):
    """Progress of the command's operations: bars on stderr, or with --json JSON lines on stdout
    (none with --quiet)."""
    if getattr(args, "json", False):
        return JsonProgress(not args.quiet)
    return StageBars(not args.quiet)


def done(args, message: str, **fields) -> None:
    """The command's outcome: `message` on stderr, or with --json one JSON line on stdout,
    {"event": "done", "command": ..., **fields} (printed even with --quiet)."""
    if getattr(args, "json", False):
        print(json.dumps({"event": "done", "command": args.command, **fields}), flush=True)
    else:
        log(args, message)


def out_dir(path: str, args) -> Path:
    """--out as a directory, made if missing; missing parents are made too, and said so on stderr
    (unless --quiet or --json), so a typo in a path does not pass unnoticed."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    missing = [parent for parent in out.parents if not parent.exists()]
    out.mkdir(parents=True, exist_ok=True)
    if missing and not (getattr(args, "quiet", False) or getattr(args, "json", False)):
        print(
            f"influence: created --out {out} and the directories above it that were missing: {missing[-1]}",
            file=sys.stderr,
        )
    return out


def out_file(path: str, flag: str) -> Path:
    """An output file's path (--report, report's --out): neither a directory nor in a directory that
    does not exist (nothing is created on the way)."""
    out = Path(path)
    if out.is_dir():
        raise InputError(f"{flag} {out} is a directory; give a file name such as {out / 'report.html'}")
    if not out.parent.is_dir():
        raise InputError(f"{flag} {out}: the directory {out.parent} does not exist (create it first)")
    return out


def client_options(args) -> dict:
    """InfluenceClient's targets (--server, and each service's own in split mode) and its token and
    TLS options (None: the environment's) from the command's flags."""
    targets = {f"{role}_target": getattr(args, f"{role}_server", "") for role in ("factor", "gradient", "query")}
    security = {name: getattr(args, name, None) for name in ("token", "tls_ca", "tls_cert", "tls_key")}
    return {"target": args.server, **targets, **security}


def through_system(args, body: Callable[..., T]) -> T:
    """body(client) against --server, or against an embedded system started for this command
    (whose worker runs on this thread while body waits on a helper thread: see services/embedded.py)."""
    from ..client import InfluenceClient

    if args.server:
        with InfluenceClient(**client_options(args)) as client:
            client.on_operation = lambda name: _started(args, name)
            try:
                return body(client)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the job goes with the command, unless detached
                if client.waiting_on:
                    if args.detach:
                        print(
                            f"influence: {client.waiting_on} goes on on the server (--detach); "
                            + f"reattach with: {_reattach_command(args, client.waiting_on)}",
                            file=sys.stderr,
                        )
                    else:
                        client.cancel(client.waiting_on)
                        print(f"influence: cancelled {client.waiting_on}", file=sys.stderr)
                raise
    from ..embedded import EmbeddedSystem

    with EmbeddedSystem(foreground=True) as system:
        return system.run(body)


def _started(args, name: str) -> None:
    """Name a server job as it starts: a line on stderr, or with --json a JSON line on stdout,
    {"event": "started", "operation": ..., "reattach": ...}."""
    if getattr(args, "json", False):
        event = {"event": "started", "operation": name, "reattach": _reattach_command(args, name)}
        print(json.dumps(event), flush=True)
    else:
        print(f"influence: {name} started; reattach with: {_reattach_command(args, name)}", file=sys.stderr, flush=True)


def _reattach_command(args, name: str) -> str:
    """The command that reattaches to a server job, for a user whose command died."""
    out = f" --out {args.out}" if getattr(args, "out", None) else ""
    return f"influence wait {name} --server {args.server}{out}"
