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

from .engine.fit import FitConfig
from .engine.model_io import load_tokenizer, parse_device, parse_dtype
from .engine.records import read_queries_jsonl, read_training_jsonl
from .engine.score import ScoreConfig
from .errors import InputError, NotFoundError, PreconditionError
from .factor_svc.artifacts import load_factors
from .gen.influence.v1 import common_pb2
from .progress_bars import StageBars

T = TypeVar("T")


def _log(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def _out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def through_system(args, body: Callable[..., T]) -> T:
    """body(client) against --server, or against an embedded system started for this command
    (whose worker runs on this thread while body waits on a helper thread: see embedded.py)."""
    from .client import InfluenceClient

    if args.server:
        with InfluenceClient(args.server) as client:
            try:
                return body(client)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the job goes with the command, unless detached
                if client.waiting_on:
                    if args.detach:
                        print(f"influence: {client.waiting_on} goes on on the server (--detach)", file=sys.stderr)
                    else:
                        client.cancel(client.waiting_on)
                        print(f"influence: cancelled {client.waiting_on}", file=sys.stderr)
                raise
    from .embedded import EmbeddedSystem

    with EmbeddedSystem(foreground=True) as system:
        return system.run(body)


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
    return common_pb2.ModelSpec(path=str(path), device=args.device, dtype=args.dtype)


def _register(client, args, model, bars) -> str:
    data = Path(args.data)
    read_training_jsonl(data)  # validate locally: errors name the file and line
    # the embedded system reads the file where it is; a server is sent its bytes
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
    read_training_jsonl(args.data)  # validate locally, before starting anything: errors name the file and line
    out = _out_dir(args.out)
    model = _model(args)
    started = time.perf_counter()
    with StageBars(not args.quiet) as bars:

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
    _log(
        args,
        f"fitted {factor_set.strategy} factors for {len(factor_set.modules)} modules on {factor_set.num_sequences} "
        f"sequences ({factor_set.num_tokens} tokens) in {time.perf_counter() - started:.1f}s"
        + (f" ({steps})" if steps else "")
        + f" -> {out}",
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
        read_training_jsonl(args.data)
    if args.rescore is not None and (args.rescore < 0 or not args.index):
        raise InputError("--rescore takes a count >= 0, with --index")
    _check_factors(args)
    out = _out_dir(args.out)
    model = _model(args)
    started = time.perf_counter()
    with StageBars(not args.quiet) as bars:

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
    _log(
        args,
        f"scored {result.num_queries} queries x {result.num_train} sequences "
        f"in {time.perf_counter() - started:.1f}s -> {out}",
    )
    return 0


def run_self(args) -> int:
    config = _score_config(args)
    read_training_jsonl(args.data)
    _check_factors(args)
    out = _out_dir(args.out)
    model = _model(args)
    with StageBars(not args.quiet) as bars:

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
    _log(args, f"self-influence of {result.num_train} sequences -> {out}")
    return 0


def run_demo(args) -> int:
    from .demo import run_demo as demo

    return demo(args)


def _connect(args):
    from .assembly import connect

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
    from .system.runner import Worker, threads_per_worker

    configure_logging(args.log_level, args.log_format)
    roles = tuple(role.strip() for role in args.role.split(",") if role.strip())
    unknown = set(roles) - set(ROLES)
    if unknown or not roles:
        raise InputError(f"--role takes factor, gradient and/or query, got {args.role!r}")
    with _connect(args) as system, _metrics(args, system, shared_state=True):
        cores_each = threads_per_worker(args.workers)
        workers = [
            Worker(system, consumer=f"serve-{n}", context=_worker_context(args, system), torch_threads=cores_each)
            for n in range(args.workers)
        ]
        threads = [threading.Thread(target=w.run_forever, daemon=True) for w in workers]
        for thread in threads:
            thread.start()
        try:
            asyncio.run(serve(system, args.host, args.port, roles))
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
