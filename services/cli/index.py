"""`influence index build|append`: an index of a dataset's compressed training gradients.

An index directory (INDEX_DIR) is the index artifact's files (manifest.json, the block files) plus
its datasets under INDEX_DIR/datasets/{id}, and source.json, which says where it was built:
    {"model": MODEL_DIR, "factors": FACTORS_DIR}            embedded (the directory is the index)
    {"server": HOST:PORT, "index": "indexes/{id}", ...}      built on a server (a local copy)
Embedded, the directory is registered in place (an append adds its blocks there); with --server
the server's index is used by name and the directory refreshed after an append (inputs.index_name:
how `influence score --index` names it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..engine.records import read_training_jsonl
from ..errors import InputError
from ..gen.influence.v1 import common_pb2
from ..options import (
    BATCH_SIZE,
    BUDGET,
    DIM,
    ENERGY,
    MAX_LENGTH,
    PROJECTION,
    RANK,
    SEED,
    SHARD_SIZE,
    STORAGE_DTYPE,
)
from .flags import (
    CLIENT_CONNECTION,
    DATA,
    DETACH,
    FACTORS,
    JSON,
    QUIET,
    SERVER,
    Command,
    Flag,
    add,
    add_commands,
    add_damping_flags,
    add_model_job_flags,
)
from .inputs import SOURCE, factor_set_name, index_name, index_source, model_of, register
from .running import done, out_dir, progress_for, through_system


def add_build_flags(parser) -> None:
    add_model_job_flags(parser)
    add(
        parser,
        FACTORS,
        DATA,
        Flag("--out", required=True, help="the index directory to write"),
        PROJECTION,
        RANK,
        DIM,
        SEED,
        STORAGE_DTYPE,
        ENERGY,
        BUDGET,
    )
    add_damping_flags(parser)


def add_append_flags(parser) -> None:
    add(
        parser,
        Flag("--index", required=True, help="the index directory"),
        Flag("--data", required=True, help="MORE.jsonl (ids must not repeat the index's)"),
        BATCH_SIZE,
        MAX_LENGTH,
        SHARD_SIZE,
        QUIET,
        JSON,
        SERVER,
        DETACH,
        *CLIENT_CONNECTION,
    )


def run_build(args) -> int:
    from ..engine.index import IndexSpec

    spec = IndexSpec(
        args.projection, args.rank, args.dim, args.seed, args.storage_dtype, energy=args.energy, budget=args.budget
    )
    spec.validate()
    out = out_dir(args.out, args)
    model = model_of(args)
    started = time.perf_counter()
    with progress_for(args) as bars:

        def build(client):
            factor_set = factor_set_name(client, args)
            dataset = register(client, args, model, bars)
            options = {"projection": spec.projection, "rank": spec.rank, "dim": spec.dim, "seed": spec.seed}
            options.update(storage_dtype=spec.storage_dtype, energy=spec.energy, budget=spec.budget)
            options["batch_size"] = args.batch_size
            if args.damping is not None:
                options["damping"] = args.damping
            else:
                options["damping_factor"] = args.damping_factor
            index = client.build_index(model, factor_set, dataset, progress=bars, **options)
            client.download_index(index.name, out)
            return index

        index = through_system(args, build)
    source = {"model": str(Path(args.model).resolve()) if not args.server else args.model, "factors": args.factors}
    if args.server:
        source.update(server=args.server, index=index.name)
    else:
        source["factors"] = str(Path(args.factors).resolve())
    (out / SOURCE).write_text(json.dumps(source, indent=2) + "\n")
    done(
        args,
        f"indexed {index.num_examples} sequences ({spec.projection}, {index.bytes_per_sequence:,} bytes each) "
        f"in {time.perf_counter() - started:.1f}s -> {out}",
        index=index.name,
        sequences=index.num_examples,
        out=str(out),
    )
    return 0


def run_append(args) -> int:
    index_dir = Path(args.index)
    source = index_source(index_dir)
    read_training_jsonl(args.data)
    args.model, args.factors = source["model"], source["factors"]
    model = common_pb2.ModelSpec(path=source["model"])
    started = time.perf_counter()
    with progress_for(args) as bars:

        def append(client):
            if not args.server:
                client.register_factors(source["factors"])
            name = index_name(client, args, index_dir)
            dataset = register(client, args, model, bars)
            index = client.append_index(name, dataset, progress=bars, batch_size=args.batch_size)
            # embedded, the directory is the index (its blocks were written there): fetch the new dataset
            client.download_index(index.name, index_dir, index_files=bool(args.server))
            return index

        if args.server and source.get("server") != args.server:
            raise InputError(
                f"{index_dir} was built on {source.get('server') or 'an embedded system'}, not {args.server}"
            )
        index = through_system(args, append)
    done(
        args,
        f"index now holds {index.num_examples} sequences ({time.perf_counter() - started:.1f}s) -> {index_dir}",
        index=index.name,
        sequences=index.num_examples,
        out=str(index_dir),
    )
    return 0


ACTIONS = {
    "build": Command("index a dataset's training gradients", add_build_flags, run_build),
    "append": Command("add training sequences to an index", add_append_flags, run_append),
}


def add_index_flags(parser) -> None:
    add_commands(parser, ACTIONS, dest="index_command", metavar="ACTION")


def run_index(args) -> int:
    return ACTIONS[args.index_command].run(args)
