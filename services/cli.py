"""The `influence` command line: fit, score, self, report, index, operations, wait, demo, serve, worker.

A public contract other tools drive: flags, output files and exit codes are stable.
Exit codes: 0 ok, 1 the system failed (internal error, or unreachable after retries), 2 bad
input (one-line message on stderr, no traceback), 3 the job was cancelled (by another caller),
130 interrupted (Ctrl-C or SIGTERM). Heavy imports (torch, transformers) happen inside the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from .options import RANK, SHARD_SIZE
from .wire import REQUEST_LIMITS


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local Hugging Face causal-LM directory")
    parser.add_argument(
        "--device", default="", help="cpu or cuda (default: the worker's: its pool's device, else cuda if available)"
    )
    parser.add_argument(
        "--dtype", default="float32", help="model dtype: float32, bfloat16, float16 or float64 (default: float32)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default: 8)")
    parser.add_argument("--max-length", type=int, default=512, help="truncate sequences to this many tokens")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_json_option(parser)
    parser.add_argument(
        "--server",
        default="",
        metavar="HOST:PORT",
        help="run through a deployed system (default: an embedded one started for this command)",
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="with --server: an interrupted command leaves its job running (default: the job is cancelled)",
    )
    _add_client_security_options(parser)
    parser.add_argument(
        "--shard-size",
        type=int,
        default=SHARD_SIZE.default,
        help=f"training sequences per data shard (default {SHARD_SIZE.default})",
    )


def _add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="machine-readable stdout: one JSON object per line (progress events, then the outcome or the error)",
    )


def _add_client_security_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token",
        default=None,
        help="with --server: the bearer token (default: env INFLUENCE_TOKEN, which `ps` does not show)",
    )
    parser.add_argument("--tls-ca", default=None, help="with --server: TLS, trusting this CA (env INFLUENCE_TLS_CA)")
    parser.add_argument(
        "--tls-cert", default=None, help="with --server: mutual TLS, this client certificate (env INFLUENCE_TLS_CERT)"
    )
    parser.add_argument("--tls-key", default=None, help="with --server: its private key (env INFLUENCE_TLS_KEY)")


def _add_server_security_options(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--auth-tokens",
        default=env("INFLUENCE_AUTH_TOKENS", ""),
        metavar="FILE",
        help="require a token on every call: 'TOKEN TENANT' per line, re-read when it changes "
        "(env INFLUENCE_AUTH_TOKENS; default: no authentication, one tenant)",
    )
    parser.add_argument(
        "--tls-cert",
        default=env("INFLUENCE_SERVE_TLS_CERT", ""),
        help="serve TLS with this PEM certificate (env INFLUENCE_SERVE_TLS_CERT)",
    )
    parser.add_argument(
        "--tls-key", default=env("INFLUENCE_SERVE_TLS_KEY", ""), help="and this PEM key (env INFLUENCE_SERVE_TLS_KEY)"
    )
    parser.add_argument(
        "--tls-client-ca",
        default=env("INFLUENCE_SERVE_TLS_CLIENT_CA", ""),
        help="mutual TLS: clients must present a certificate this CA signed (env INFLUENCE_SERVE_TLS_CLIENT_CA)",
    )
    parser.add_argument(
        "--max-queued-operations",
        type=int,
        default=int(env("INFLUENCE_MAX_QUEUED_OPERATIONS", "0")),
        help="per tenant: at most this many queued or running operations (0: no quota)",
    )


def _add_request_limits(parser: argparse.ArgumentParser) -> None:
    """--max-upload-bytes, --max-queries, ... (wire.REQUEST_LIMITS), each also from its env var. A
    string default is parsed by `type` only when `serve` runs, so a bad env value stops `serve`
    with exit 2 and never breaks the other commands."""
    for name, limit in REQUEST_LIMITS.items():
        parser.add_argument(
            limit.flag,
            dest=name,
            type=int,
            default=os.environ.get(limit.env, str(limit.default)),
            metavar="N",
            help=f"refuse a request over N {limit.counts} with RESOURCE_EXHAUSTED "
            f"(env {limit.env}; default {limit.default}; 0: no limit)",
        )


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url", default="", help="redis://host:port/db (env INFLUENCE_REDIS_URL; default: embedded)"
    )
    parser.add_argument(
        "--store-url",
        default="",
        help="s3://bucket?endpoint=host:port&secure=0 or a directory (env INFLUENCE_STORE_URL; default: --state-dir)",
    )
    parser.add_argument(
        "--state-dir", default="", help="embedded Redis and artifacts (default .cache/influence-server)"
    )
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=float(os.environ.get("INFLUENCE_LEASE_SECONDS", "60")),
        help="task lease, renewed while a task runs (env INFLUENCE_LEASE_SECONDS)",
    )
    parser.add_argument(
        "--max-deliveries",
        type=int,
        default=int(os.environ.get("INFLUENCE_MAX_DELIVERIES", "3")),
        help="deliveries before a task is dead-lettered (env INFLUENCE_MAX_DELIVERIES)",
    )
    parser.add_argument("--log-level", default=os.environ.get("INFLUENCE_LOG_LEVEL", "info"))
    parser.add_argument(
        "--log-format",
        default=os.environ.get("INFLUENCE_LOG_FORMAT", "text"),
        help="text or json: one JSON object per line (env INFLUENCE_LOG_FORMAT)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("INFLUENCE_METRICS_PORT", "0")),
        help="serve Prometheus metrics at http://HOST:PORT/metrics (env INFLUENCE_METRICS_PORT; 0: off)",
    )
    parser.add_argument(
        "--model-roots",
        default=os.environ.get("INFLUENCE_MODEL_ROOTS", ""),
        metavar="DIR[:DIR]",
        help="load models only from under these directories (env INFLUENCE_MODEL_ROOTS; "
        "default: any directory the process can read)",
    )
    parser.add_argument(
        "--allow-remote-code",
        action="store_true",
        default=os.environ.get("INFLUENCE_ALLOW_REMOTE_CODE", "") == "1",
        help="let model directories run their own Python code (trust_remote_code; default: never)",
    )
    parser.add_argument(
        "--cache-gib",
        type=float,
        default=None,
        help="memory each worker may keep of covariance passes for their correction passes "
        "(default: 1/4 of the memory limit, the container's if any)",
    )


def _add_damping_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--damping-factor", type=float, default=0.1, help="damping = F x mean eigenvalue per module (default 0.1)"
    )
    group.add_argument("--damping", type=float, default=None, help="absolute damping (overrides --damping-factor)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="influence",
        description="Which training sequences made the model say this? EK-FAC influence functions for causal LMs.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = commands.add_parser("fit", help="fit curvature factors (EK-FAC by default) on training data")
    _add_model_options(fit)
    fit.add_argument(
        "--data",
        required=True,
        help='TRAIN.jsonl ({"id": optional, "text": ...} per line); with --server also s3://BUCKET/KEY',
    )
    fit.add_argument("--out", required=True, help="output directory for the factors")
    fit.add_argument("--strategy", default="ekfac", choices=["identity", "diagonal", "kfac", "ekfac"])
    fit.add_argument("--fisher", default="sampled", choices=["sampled", "empirical"])
    fit.add_argument("--modules", default="mlp", help="mlp | attention | all | a regex over module names")
    fit.add_argument("--max-examples", type=int, default=None, help="fit on the first N training sequences")
    fit.add_argument("--seed", type=int, default=0, help="seed of the sampled labels")
    fit.add_argument(
        "--cache-gib",
        type=float,
        default=None,
        help="at most this much memory (GiB) kept of the covariance pass for the correction pass, within "
        "the worker's budget (default: the worker's budget, 1/4 of its memory limit; 0: recompute instead)",
    )

    score = commands.add_parser("score", help="score training sequences against queries")
    _add_model_options(score)
    score.add_argument("--factors", required=True, help="directory written by `influence fit`")
    score.add_argument("--data", default=None, help="TRAIN.jsonl (not with --index: the index holds its data)")
    score.add_argument("--queries", required=True, help='QUERIES.jsonl: {"id", "prompt", "completion"} per line')
    score.add_argument("--out", required=True, help="output directory: scores.safetensors, results.json")
    score.add_argument("--top-k", type=int, default=10)
    _add_damping_options(score)
    score.add_argument("--query-rank", type=int, default=None, help="low-rank query batching with rank R")
    score.add_argument("--per-module", action="store_true", help="layer-wise breakdown of every score")
    score.add_argument("--per-token", action="store_true", help="token-wise attribution of the top-k sequences")
    score.add_argument("--index", default=None, help="score against this index directory (influence index build)")
    score.add_argument(
        "--rescore", type=int, default=None, help="with --index: candidates per query rescored exactly (default 2%%)"
    )
    score.add_argument("--tfidf", type=int, default=0, help="score only each query's K nearest sequences by TF-IDF")
    score.add_argument("--report", default=None, metavar="REPORT.html", help="also write the HTML report here")

    report = commands.add_parser("report", help="an HTML report (the paper's views) of a scoring run's results")
    report.add_argument("--results", required=True, help="a result directory (written by `influence score`)")
    report.add_argument("--out", required=True, help="the HTML file to write (self-contained)")
    report.add_argument("--quiet", action="store_true")
    _add_json_option(report)

    operations = commands.add_parser("operations", help="list a server's jobs, or follow one to its end")
    operations.add_argument("--server", default="", metavar="HOST:PORT", help="the deployed system")
    operations.add_argument("--kind", default="", help="only jobs of this kind, e.g. compute_scores, fit_factors")
    operations.add_argument("--follow", default="", metavar="NAME", help="follow operations/ID to its end")
    operations.add_argument("--quiet", action="store_true", help="no progress bars while following")
    _add_json_option(operations)
    _add_client_security_options(operations)

    index = commands.add_parser("index", help="build or extend an index of compressed training gradients")
    index_commands = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    build = index_commands.add_parser("build", help="index a dataset's training gradients")
    _add_model_options(build)
    build.add_argument("--factors", required=True, help="directory written by `influence fit`")
    build.add_argument("--data", required=True, help="TRAIN.jsonl")
    build.add_argument("--out", required=True, help="the index directory to write")
    build.add_argument("--projection", default="svd", choices=["svd", "eigen", "random", "none"])
    build.add_argument("--rank", type=int, default=RANK.default, help="svd: rank kept per sequence and module")
    build.add_argument("--dim", type=int, default=32, help="eigen, random: dimensions kept per side")
    build.add_argument("--seed", type=int, default=0, help="random: the projections' seed")
    build.add_argument("--storage-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    _add_damping_options(build)
    append = index_commands.add_parser("append", help="add training sequences to an index")
    append.add_argument("--index", required=True, help="the index directory")
    append.add_argument("--data", required=True, help="MORE.jsonl (ids must not repeat the index's)")
    append.add_argument("--batch-size", type=int, default=8)
    append.add_argument("--max-length", type=int, default=512)
    append.add_argument("--shard-size", type=int, default=SHARD_SIZE.default)
    append.add_argument("--quiet", action="store_true")
    _add_json_option(append)
    append.add_argument("--server", default="", metavar="HOST:PORT")
    append.add_argument("--detach", action="store_true", help=argparse.SUPPRESS)
    _add_client_security_options(append)

    self_cmd = commands.add_parser("self", help="self-influence of every training sequence")
    _add_model_options(self_cmd)
    self_cmd.add_argument("--factors", required=True)
    self_cmd.add_argument("--data", required=True, help="TRAIN.jsonl")
    self_cmd.add_argument("--out", required=True, help="output directory: scores.safetensors, results.json")
    self_cmd.add_argument("--top-k", type=int, default=10)
    _add_damping_options(self_cmd)

    wait = commands.add_parser(
        "wait", help="reattach to a server job: wait for its operation, download its output into --out"
    )
    wait.add_argument("operation", help="operations/ID (printed when a command with --server starts a job)")
    wait.add_argument("--server", required=True, metavar="HOST:PORT")
    wait.add_argument("--out", default="", help="download the factor set, result or index into this directory")
    wait.add_argument("--cancel", action="store_true", help="cancel the operation instead of waiting")
    wait.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_client_security_options(wait)

    demo = commands.add_parser("demo", help="train a tiny model on planted facts, fit, score, print the answers")
    demo.add_argument("--work-dir", default=".cache/demo", help="where the demo's model and data are cached")
    demo.add_argument("--out", default="demo-out", help="where factors and scores are written")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--epochs", type=int, default=None, help="training epochs of the demo model (default: the recipe's, 20)"
    )
    demo.add_argument("--quiet", action="store_true")
    serve = commands.add_parser("serve", help="start the gRPC services (all roles in one process by default)")
    serve.add_argument("--role", default="factor,gradient,query", help="comma-separated: factor, gradient, query")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=int(os.environ.get("INFLUENCE_PORT", "50051")))
    serve.add_argument(
        "--workers", type=int, default=1, help="in-process workers (0: only separate `influence worker`s)"
    )
    _add_connection_options(serve)
    _add_server_security_options(serve)
    _add_request_limits(serve)

    worker = commands.add_parser("worker", help="run tasks from the Redis queues")
    worker.add_argument("--kinds", default="", help="comma-separated task kinds (default: all)")
    worker.add_argument("--name", default="", help="consumer name (default: worker-PID)")
    worker.add_argument(
        "--device",
        default=os.environ.get("INFLUENCE_DEVICE", ""),
        choices=["", "cpu", "cuda"],
        metavar="cpu|cuda",
        help="run models on cpu or cuda; a cpu worker leaves cuda tasks to others "
        "(env INFLUENCE_DEVICE; default: cuda if available, else cpu)",
    )
    worker.add_argument(
        "--until-done",
        default="",
        metavar="OPERATION",
        help="exit (0) once this operation has ended: a worker of a launched Job (default: run until stopped)",
    )
    _add_connection_options(worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .errors import DomainError, exit_code_of, message_of

    previous_handler = _interrupt_on_sigterm()
    try:
        if args.command == "index":
            from .index_commands import run_index

            return run_index(args)
        if args.command == "operations":
            from .operation_commands import run_operations

            return run_operations(args)
        from . import commands

        return getattr(commands, f"run_{args.command}")(args)
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


if __name__ == "__main__":
    sys.exit(main())
