"""The `influence` command line: fit, score, self, report, index, operations, wait, demo, serve, worker.

A public contract other tools drive: flags, output files and exit codes are stable.
Exit codes: 0 ok, 1 the system failed (internal error, or unreachable after retries), 2 bad
input (one-line message on stderr, no traceback), 3 the job was cancelled (by another caller),
130 interrupted (Ctrl-C or SIGTERM). Heavy imports (torch, transformers) happen inside the commands.

    COMMANDS       each command: its help, its flags (flags.py), the function that runs it
    jobs.py        fit, score, self, report           index.py     index build, index append
    operations.py  operations, wait                   servers.py   serve, worker
    demo.py        demo                               inputs.py, running.py, progress.py: what they share
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from .. import version
from ..errors import DomainError, exit_code_of, message_of
from . import demo, index, jobs, operations, servers
from .flags import Command, add_commands

COMMANDS = {
    "fit": Command("fit curvature factors (EK-FAC by default) on training data", jobs.add_fit_flags, jobs.run_fit),
    "score": Command("score training sequences against queries", jobs.add_score_flags, jobs.run_score),
    "report": Command(
        "an HTML report (the paper's views) of a scoring run's results", jobs.add_report_flags, jobs.run_report
    ),
    "operations": Command(
        "list a server's jobs, or follow one to its end", operations.add_operations_flags, operations.run_operations
    ),
    "index": Command(
        "build or extend an index of compressed training gradients", index.add_index_flags, index.run_index
    ),
    "self": Command("self-influence of every training sequence", jobs.add_self_flags, jobs.run_self),
    "wait": Command(
        "reattach to a server job: wait for its operation, download its output into --out",
        operations.add_wait_flags,
        operations.run_wait,
    ),
    "demo": Command(
        "train a tiny model on planted facts, fit, score, print the answers", demo.add_demo_flags, demo.run_demo
    ),
    "serve": Command(
        "start the gRPC services (all roles in one process by default)", servers.add_serve_flags, servers.run_serve
    ),
    "worker": Command("run tasks from the Redis queues", servers.add_worker_flags, servers.run_worker),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influence",
        description="Which training sequences made the model say this? EK-FAC influence functions for causal LMs.",
    )
    parser.add_argument("--version", action="version", version=f"influence {version()}")
    add_commands(parser, COMMANDS, dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    previous_handler = _interrupt_on_sigterm()
    try:
        return COMMANDS[args.command].run(args)
    except DomainError as error:
        print(f"influence {args.command}: error: {message_of(error)}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"event": "error", "message": message_of(error), "exit_code": exit_code_of(error)}))
        return exit_code_of(error)
    except KeyboardInterrupt:
        print("influence: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # an internal bug: say so in one line unless debugging
        if os.environ.get("INFLUENCE_DEBUG"):
            raise
        print(
            f"influence {args.command}: internal error: {type(error).__name__}: {error} "
            "(set INFLUENCE_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _interrupt_on_sigterm():
    """SIGTERM ends a command the way Ctrl-C does (KeyboardInterrupt on the main thread), so its
    cleanup runs: the embedded Redis and temporary directories go, a server job is cancelled.
    Returns the previous handler (None when not on the main thread, where no handler can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)
