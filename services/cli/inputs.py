"""A command's inputs, checked here before anything starts (so an error names the user's file
and line) and named to the system: the model spec, the training data registered as a dataset, the
factor set (a local directory, registered or uploaded, or a server's name), and the index."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from ..engine.corpora import CorpusSpec, is_jsonl, is_jsonl_name, write_jsonl
from ..engine.records import file_lines, read_training_jsonl, stream_training_jsonl
from ..enums import enum_value
from ..errors import InputError, NotFoundError, PreconditionError
from ..gen.influence.v1 import common_pb2, gradient_service_pb2


def model_of(args) -> common_pb2.ModelSpec:
    """The model of --model, --device and --dtype; embedded, checked to load (a server checks its own)."""
    from ..engine.model_io import load_tokenizer, parse_device, parse_dtype

    parse_dtype(args.dtype)
    path, base = Path(args.model), args.base_model
    if not args.server:
        if args.device:  # none: the worker's device (cuda if this machine has one, else cpu)
            parse_device(args.device)
        if not path.is_dir():
            raise NotFoundError(f"model directory not found: {path}")
        base = str(Path(base).resolve()) if base else ""
        load_tokenizer(path, base)  # fail fast, before uploading anything, if the directory holds no model
        path = path.resolve()
    return common_pb2.ModelSpec(
        path=str(path),
        base_model=base,
        device=enum_value(common_pb2.Device, args.device, "--device"),
        dtype=enum_value(common_pb2.Dtype, args.dtype, "--dtype"),
    )


def data_source(args) -> tuple[str, CorpusSpec | None]:
    """The training data (--data, or --tokens where the command takes it) and how to read it: None
    for TRAIN.jsonl, else the corpus' spec (engine/corpora.py)."""
    tokens = getattr(args, "tokens", None)
    if tokens:
        if args.data:
            raise InputError("give --data or --tokens, not both")
        if not args.sequence_length:
            raise InputError("--tokens needs --sequence-length (tokens per training sequence)")
        spec = CorpusSpec(sequence_length=args.sequence_length, token_dtype=args.token_dtype)
        return tokens, spec.validate()
    if not args.data:
        raise InputError("give --data TRAIN.jsonl (or a corpus, or --tokens DIR)")
    spec = CorpusSpec(
        text_field=getattr(args, "text_field", CorpusSpec.text_field),  # index commands read JSONL only
        messages_field=getattr(args, "messages_field", CorpusSpec.messages_field),
    )
    if args.data.startswith("s3://"):
        return args.data, None if is_jsonl_name(args.data) else spec.validate()
    return args.data, None if is_jsonl(Path(args.data)) or not Path(args.data).exists() else spec.validate()


def _corpus_message(corpus: CorpusSpec | None) -> gradient_service_pb2.Corpus | None:
    if corpus is None:
        return None
    return gradient_service_pb2.Corpus(
        text_field=corpus.text_field,
        messages_field=corpus.messages_field,
        sequence_length=corpus.sequence_length,
        token_type=enum_value(gradient_service_pb2.TokenType, corpus.token_dtype, "--token-dtype"),
    )


def check_data(args) -> None:
    """Validate local training data before starting anything: a TRAIN.jsonl read through (errors
    name the file and line; a corpus is read when it is registered); an s3:// source is validated
    by the worker that reads it."""
    data, corpus = data_source(args)
    if data.startswith("s3://"):
        return
    if corpus is None:
        read_training_jsonl(data)
    elif not Path(data).exists():
        raise NotFoundError(f"training data not found: {data}")


def register(client, args, model, bars) -> str:
    """The training data registered as a dataset: the embedded system reads a local TRAIN.jsonl
    where it is; a server is sent its bytes; an s3:// source is read by the workers from the
    system's object store; a local corpus becomes TRAIN.jsonl lines first (streamed to a temporary
    file), registered as such."""
    data, corpus = data_source(args)
    settings = {"max_length": args.max_length, "shard_size": args.shard_size, "progress": bars}
    if data.startswith("s3://"):
        return client.register_dataset(model, data, corpus=_corpus_message(corpus), **settings).name
    if corpus is None:
        return client.register_dataset(model, Path(data), by_path=not args.server, **settings).name
    with tempfile.TemporaryDirectory(prefix="influence-corpus-") as directory:
        jsonl = Path(directory) / "train.jsonl"
        write_jsonl(Path(data), corpus, jsonl)
        for _ in stream_training_jsonl(lambda: file_lines(jsonl, data), data):  # validated as TRAIN.jsonl is
            pass
        return client.register_dataset(model, jsonl, by_path=not args.server, **settings).name


def _names_server_factors(args) -> bool:
    """--factors names a factor set on the server ("factorSets/{id}") rather than a local directory."""
    return args.factors.startswith("factorSets/") and not Path(args.factors).exists()


def check_factors(args) -> None:
    """A local --factors directory is loaded (and verified) before anything is started or uploaded,
    and, where the model directory is here too, checked to be for this model: its architecture
    (module names, its config built without weights), then its fingerprint (computed from the
    directory's config, shapes and sampled weights, as the worker computes it from the loaded
    model): factors of another model, even one of the same architecture, are refused before any
    upload, with the worker's message."""
    if not _names_server_factors(args):
        from ..catalog.factor_sets import load_factors
        from ..engine.model_io import directory_fingerprint, module_names
        from ..engine.score import require_fingerprint, require_modules

        factors = load_factors(args.factors)
        present = module_names(args.model) if Path(args.model).is_dir() else None
        if present is not None:
            require_modules(list(factors.modules), present)
            fingerprint = directory_fingerprint(args.model, list(factors.modules))
            if fingerprint is not None:
                require_fingerprint(factors, fingerprint)


def factor_set_name(client, args) -> str:
    """A server-side factor set name: given as one, or a local --factors directory, registered in
    place by the embedded system (nothing is copied) or uploaded to a server in resumable chunks
    (files the server already has are not sent again)."""
    if _names_server_factors(args):
        return args.factors
    if not args.server:
        return client.register_factors(args.factors).name
    return client.import_factors(args.factors).name


def score_config(args, **extra):
    """The scoring settings of the flags, checked (an engine ScoreConfig)."""
    from ..engine.score import ScoreConfig

    config = ScoreConfig(
        damping_factor=args.damping_factor,
        damping=args.damping,
        batch_size=args.batch_size,
        max_length=args.max_length,
        top_k=args.top_k,
        **extra,
    )
    config.validate()
    return config


SOURCE = "source.json"


def index_source(index_dir: Path) -> dict:
    try:
        return json.loads((index_dir / SOURCE).read_text())
    except (OSError, ValueError):
        raise NotFoundError(f"no index at {index_dir} (missing or unreadable {SOURCE})") from None


def index_name(client, args, index_dir: Path) -> str:
    """The system's name of the index in `index_dir`: registered in place (embedded), or the
    server index the directory was downloaded from (with --server)."""
    source = index_source(index_dir)
    if not args.server:
        return client.register_index(index_dir).name
    if source.get("server") != args.server or not source.get("index"):
        raise PreconditionError(
            f"{index_dir} was not built on {args.server}: build the index there (influence index build --server)"
        )
    return source["index"]


def record_inputs(results: Path, **paths: str | None) -> None:
    """Add "inputs" to a downloaded results.json: each named local input's path and sha256, so a
    result says what made it. A file: its bytes; a directory with a manifest.json (factors, an
    index): the manifest's bytes (which hold every file's sha256); any other directory (a model):
    every file's relative name and bytes, in name order (about a second per GB). An input that is
    not here (an s3:// object, a model on the server) is recorded by its name alone."""
    inputs = {}
    for name, value in paths.items():
        if value:
            path = Path(value)
            inputs[name] = {"path": str(path.resolve()) if path.exists() else value}
            if path.exists():
                inputs[name]["sha256"] = _sha256(path)
    report = json.loads(results.read_text())
    report["inputs"] = inputs
    results.write_text(json.dumps(report, indent=2, allow_nan=False))


def _sha256(path: Path) -> str:
    if path.is_dir() and (path / "manifest.json").is_file():
        path = path / "manifest.json"
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(f"{file.relative_to(path).as_posix()}\0".encode())
        with file.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
