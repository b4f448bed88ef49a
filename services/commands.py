"""What each CLI command does. Argument parsing lives in cli.py.

`fit`, `score` and `self` run through the service system: an embedded one started for the
command (embedded Redis, local artifacts, in-process workers), or a deployed one with
`--server HOST:PORT`. Inputs are read and validated locally first, so an error names the
user's file and line; then the data is uploaded, the job runs as an operation with progress
bars, and the outputs are downloaded into --out.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .catalog.factor_sets import load_factors
from .engine.fit import FitConfig
from .engine.model_io import load_tokenizer, parse_device, parse_dtype
from .engine.records import read_queries_jsonl, read_training_jsonl
from .engine.score import ScoreConfig
from .enums import enum_value, enum_word
from .errors import InputError, NotFoundError, PreconditionError
from .gen.influence.v1 import common_pb2, factor_service_pb2
from .progress_bars import JsonProgress, StageBars
from .wire import REQUEST_LIMITS

T = TypeVar("T")


def _log(args, message: str) -> None:
    if not getattr(args, "quiet", False) and not getattr(args, "json", False):
        print(message, file=sys.stderr)


def progress_for(args):
    """Progress of the command's operations: bars on stderr, or with --json JSON lines on stdout
    (none with --quiet)."""
    if getattr(args, "json", False):
        return JsonProgress(not args.quiet)
    return StageBars(not args.quiet)


def _done(args, message: str, **fields) -> None:
    """The command's outcome: `message` on stderr, or with --json one JSON line on stdout,
    {"event": "done", "command": ..., **fields} (printed even with --quiet)."""
    if getattr(args, "json", False):
        print(json.dumps({"event": "done", "command": args.command, **fields}), flush=True)
    else:
        _log(args, message)


def _out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def client_security(args) -> dict:
    """InfluenceClient's token and TLS options from the command's flags (None: the environment's)."""
    return {name: getattr(args, name, None) for name in ("token", "tls_ca", "tls_cert", "tls_key")}

def through_system(args, body: Callable[..., T]) -> T:
    """body(client) against --server, or against an embedded system started for this command
    (whose worker runs on this thread while body waits on a helper thread: see embedded.py)."""
    from .client import InfluenceClient

    if args.server:
        with InfluenceClient(args.server, **client_security(args)) as client:
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
    from .embedded import EmbeddedSystem

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


def run_wait(args) -> int:
    """Reattach to a server operation: wait for it with progress bars, then download what it made
    into --out (a factor set, a result or an index); print the resource's name. Interrupting only
    stops watching: the operation goes on (cancel it with --cancel)."""
    from .client import InfluenceClient
    from .gen.influence.v1 import factor_service_pb2, gradient_service_pb2, query_service_pb2

    if not args.operation.startswith("operations/"):
        raise InputError(f"expected an operation name 'operations/ID', got {args.operation!r}")
    out = _out_dir(args.out) if args.out else None
    with InfluenceClient(args.server, **client_security(args)) as client:
        if args.cancel:
            client.cancel(args.operation)
            _log(args, f"influence: cancelled {args.operation}")
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
        _log(args, f"{args.operation} done: {resource.name}" + (f" -> {out}" if out is not None and download else ""))
    return 0


def _model(args) -> common_pb2.ModelSpec:
    parse_dtype(args.dtype)
    path = Path(args.model)
    if not args.server:
        if args.device:  # none: the worker's device (cuda if this machine has one, else cpu)
            parse_device(args.device)
        if not path.is_dir():
            raise NotFoundError(f"model directory not found: {path}")
        load_tokenizer(path)  # fail fast, before uploading anything, if the directory holds no model
        path = path.resolve()
    return common_pb2.ModelSpec(
        path=str(path),
        device=enum_value(common_pb2.Device, args.device, "--device"),
        dtype=enum_value(common_pb2.Dtype, args.dtype, "--dtype"),
    )


def _check_data(data: str) -> None:
    """Validate a local TRAIN.jsonl before starting anything (errors name the file and line); an
    s3:// object is validated by the worker that reads it."""
    if not data.startswith("s3://"):
        read_training_jsonl(data)


def _register(client, args, model, bars) -> str:
    _check_data(args.data)
    # the embedded system reads a local file where it is; a server is sent its bytes; an s3:// URI
    # is read by the workers from the system's object store
    data = args.data if args.data.startswith("s3://") else Path(args.data)
    dataset = client.register_dataset(
        model, data, max_length=args.max_length, shard_size=args.shard_size, progress=bars, by_path=not args.server
    )
    return dataset.name


def run_fit(args) -> int:
    config = FitConfig(
        strategy=args.strategy,
        fisher=args.fisher,
        modules=args.modules,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_examples=args.max_examples,
        seed=args.seed,
        cache_gib=args.cache_gib,
    )
    config.validate()
    _check_data(args.data)
    out = _out_dir(args.out)
    model = _model(args)
    started = time.perf_counter()
    with progress_for(args) as bars:

        def fit(client):
            dataset = _register(client, args, model, bars)
            factor_set = client.fit_factors(
                model,
                dataset,
                progress=bars,
                strategy=config.strategy,
                fisher=config.fisher,
                modules=config.modules,
                batch_size=config.batch_size,
                max_examples=config.max_examples or 0,
                seed=config.seed,
                cache_gib=config.cache_gib,
            )
            client.download_factors(factor_set.name, out)
            return factor_set

        factor_set = through_system(args, fit)
    timings = json.loads((out / "manifest.json").read_text())["metadata"].get("provenance", {}).get("timings") or {}
    steps = ", ".join(f"{step} {seconds:.1f}s" for step, seconds in timings.items())
    strategy = enum_word(factor_service_pb2.Strategy, factor_set.strategy)
    seconds = time.perf_counter() - started
    _done(
        args,
        f"fitted {strategy} factors for {len(factor_set.modules)} modules on {factor_set.num_sequences} "
        f"sequences ({factor_set.num_tokens} tokens) in {seconds:.1f}s"
        + (f" ({steps})" if steps else "")
        + f" -> {out}",
        factor_set=factor_set.name,
        strategy=strategy,
        modules=len(factor_set.modules),
        sequences=factor_set.num_sequences,
        tokens=factor_set.num_tokens,
        seconds=round(seconds, 3),
        out=str(out),
    )
    return 0


def _names_server_factors(args) -> bool:
    """--factors names a factor set on the server ("factorSets/{id}") rather than a local directory."""
    return args.factors.startswith("factorSets/") and not Path(args.factors).exists()


def _check_factors(args) -> None:
    """A local --factors directory is loaded (and verified) before anything is started or uploaded."""
    if not _names_server_factors(args):
        load_factors(args.factors)


def _factor_set(client, args) -> str:
    """A server-side factor set name: given as one, or a local --factors directory, registered in
    place by the embedded system (nothing is copied) or uploaded to a server in resumable chunks
    (files the server already has are not sent again)."""
    if _names_server_factors(args):
        return args.factors
    if not args.server:
        return client.register_factors(args.factors).name
    return client.import_factors(args.factors).name


def _score_config(args, **extra) -> ScoreConfig:
    config = ScoreConfig(
        damping_factor=args.damping_factor,
        damping=args.damping,
        batch_size=args.batch_size,
        max_length=args.max_length,
        top_k=args.top_k,
        **extra,
    )
    config.validate()
    _ = config.damping_policy  # validates the damping values
    return config


SOURCE = "source.json"


def _source(index_dir: Path) -> dict:
    try:
        return json.loads((index_dir / SOURCE).read_text())
    except (OSError, ValueError):
        raise NotFoundError(f"no index at {index_dir} (missing or unreadable {SOURCE})") from None


def index_name(client, args, index_dir: Path) -> str:
    """The system's name of the index in `index_dir`: registered in place (embedded), or the
    server index the directory was downloaded from (with --server)."""
    source = _source(index_dir)
    if not args.server:
        return client.register_index(index_dir).name
    if source.get("server") != args.server or not source.get("index"):
        raise PreconditionError(
            f"{index_dir} was not built on {args.server}: build the index there (influence index build --server)"
        )
    return source["index"]


def run_score(args) -> int:
    config = _score_config(
        args, query_rank=args.query_rank, per_module=args.per_module, per_token=args.per_token, tfidf=args.tfidf
    )
    queries = read_queries_jsonl(args.queries)
    if args.index:
        if args.data or args.tfidf:
            raise InputError("--index holds its own data: give neither --data nor --tfidf with it")
        if not (Path(args.index) / "manifest.json").is_file():
            raise NotFoundError(f"no index at {args.index} (missing manifest.json)")
    elif not args.data:
        raise InputError("give --data TRAIN.jsonl (or --index INDEX_DIR)")
    else:
        _check_data(args.data)
    if args.rescore is not None and (args.rescore < 0 or not args.index):
        raise InputError("--rescore takes a count >= 0, with --index")
    if args.report and Path(args.report).is_dir():
        raise InputError(f"--report {args.report} is a directory; give a file name such as report.html")
    _check_factors(args)
    out = _out_dir(args.out)
    model = _model(args)
    started = time.perf_counter()
    with progress_for(args) as bars:

        def score(client):
            factor_set = _factor_set(client, args)
            options = {}
            if args.index:
                dataset = ""
                options = {"index": index_name(client, args, Path(args.index)), "rescore": args.rescore}
            else:
                dataset = _register(client, args, model, bars)
                options = {"tfidf": config.tfidf}
            result = client.compute_scores(
                model,
                factor_set,
                dataset,
                queries,
                progress=bars,
                damping=config.damping,
                damping_factor=config.damping_factor,
                query_rank=config.query_rank or 0,
                top_k=config.top_k,
                per_module=config.per_module,
                per_token=config.per_token,
                batch_size=config.batch_size,
                **options,
            )
            client.download_result(result.name, out)
            return result

        result = through_system(args, score)
    seconds = time.perf_counter() - started
    report = _write_report(args, out, Path(args.report)) if args.report else None
    _done(
        args,
        f"scored {result.num_queries} queries x {result.num_train} sequences in {seconds:.1f}s -> {out}"
        + (f"; report -> {report}" if report else ""),
        result=result.name,
        queries=result.num_queries,
        sequences=result.num_train,
        seconds=round(seconds, 3),
        out=str(out),
        report=str(report) if report else None,
    )
    return 0


def _write_report(args, results: Path, path: Path) -> Path:
    from .query_svc.report_html import build_report

    if path.is_dir():
        raise InputError(f"--report {path} is a directory; give a file name such as report.html")
    page = build_report(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def run_report(args) -> int:
    """`influence report`: the HTML report of a result directory (results.json + scores.safetensors)."""
    path = _write_report(args, Path(args.results), Path(args.out))
    _done(args, f"report -> {path}", report=str(path), bytes=path.stat().st_size)
    return 0


def run_self(args) -> int:
    config = _score_config(args)
    _check_data(args.data)
    _check_factors(args)
    out = _out_dir(args.out)
    model = _model(args)
    with progress_for(args) as bars:

        def self_influence(client):
            factor_set = _factor_set(client, args)
            dataset = _register(client, args, model, bars)
            result = client.compute_self_influence(
                model,
                factor_set,
                dataset,
                progress=bars,
                damping=config.damping,
                damping_factor=config.damping_factor,
                top_k=config.top_k,
                batch_size=config.batch_size,
            )
            client.download_result(result.name, out)
            return result

        result = through_system(args, self_influence)
    _done(
        args,
        f"self-influence of {result.num_train} sequences -> {out}",
        result=result.name,
        sequences=result.num_train,
        out=str(out),
    )
    return 0


def run_demo(args) -> int:
    from .demo import run_demo as demo

    return demo(args)


def _connect(args):
    from .assembly import connect
    from .engine.model_io import ModelAccess, set_model_access

    # the operator's model policy holds for this whole process: servicers and workers alike
    set_model_access(ModelAccess.parse(args.model_roots, args.allow_remote_code))

    return connect(args.redis_url, args.store_url, args.state_dir, args.lease_seconds, args.max_deliveries)


def _worker_context(args, system):
    from .engine.resources import gib_to_bytes
    from .system.context import WorkerContext

    return WorkerContext(system.store, cache_bytes=gib_to_bytes(args.cache_gib), device=getattr(args, "device", ""))


@contextlib.contextmanager
def _metrics(args, system, shared_state: bool):
    """Prometheus metrics on --metrics-port while the block runs (nothing when it is 0)."""
    if not args.metrics_port:
        yield
        return
    from .system.metrics import MetricsServer

    server = MetricsServer(args.metrics_port, system=system if shared_state else None)
    try:
        yield
    finally:
        server.close()


def run_serve(args) -> int:
    import asyncio
    import threading

    from .assembly import ROLES, serve
    from .logs import configure_logging
    from .rpc.auth import token_file_from_env
    from .rpc.common import Limits
    from .rpc.server import server_credentials
    from .system.runner import Worker, threads_per_worker

    tokens = token_file_from_env(args.auth_tokens)  # a bad file fails here, before anything starts
    credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    if args.max_queued_operations < 0:
        raise InputError(f"--max-queued-operations must be >= 0, got {args.max_queued_operations}")
    limits = Limits(**{name: getattr(args, name) for name in REQUEST_LIMITS})
    roles = tuple(role.strip() for role in args.role.split(",") if role.strip())
    unknown = set(roles) - set(ROLES)
    if unknown or not roles:
        raise InputError(f"--role takes factor, gradient and/or query, got {args.role!r}")
    configure_logging(args.log_level, args.log_format)  # after every check: a refused serve changes nothing
    with _connect(args) as system, _metrics(args, system, shared_state=True):
        system.max_queued_operations = args.max_queued_operations
        cores_each = threads_per_worker(args.workers)
        workers = [
            Worker(system, consumer=f"serve-{n}", context=_worker_context(args, system), torch_threads=cores_each)
            for n in range(args.workers)
        ]
        threads = [threading.Thread(target=w.run_forever, daemon=True) for w in workers]
        for thread in threads:
            thread.start()
        try:
            asyncio.run(
                serve(system, args.host, args.port, roles, limits=limits, tokens=tokens, credentials=credentials)
            )
        finally:
            for worker in workers:
                worker.stop.set()
            for thread in threads:
                thread.join(60)
    return 0


def run_worker(args) -> int:
    import signal

    from .assembly import STAGE_TABLE
    from .logs import configure_logging
    from .system.runner import Worker

    configure_logging(args.log_level, args.log_format)
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()] if args.kinds else STAGE_TABLE.kinds
    STAGE_TABLE.check_kinds(kinds)
    with _connect(args) as system, _metrics(args, system, shared_state=False):
        worker = Worker(
            system,
            kinds=kinds,
            consumer=args.name or f"worker-{Path('/proc/self').resolve().name}",
            context=_worker_context(args, system),
        )
        signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())
        if args.until_done:
            _stop_when_ended(system, args.until_done.removeprefix("operations/"), worker.stop)
        print(f"influence: worker {worker.consumer} taking {','.join(kinds)}", flush=True)
        worker.run_forever()
    return 0


def _stop_when_ended(system, operation: str, stop, every: float = 2.0) -> None:
    """Set `stop` once `operation` has ended (or does not exist): a launched worker's exit."""
    import threading

    from .jobs.operations import TERMINAL

    def watch() -> None:
        while not stop.wait(every):
            try:
                record = system.operations.get(operation)
            except Exception:  # Redis away for a moment: ask again
                continue
            if record is None or record["state"] in TERMINAL:
                stop.set()

    threading.Thread(target=watch, name="until-done", daemon=True).start()
