"""The parser's building blocks: a command (its help, the flags it takes, what runs it), and every
flag defined once. A job setting's flag comes from its `Option` (services/options.py: the same
default, range and help as the engine's configs and the servicers); a flag of the command line
alone is a `Flag` here, or in the module of the only command that takes it."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..options import BATCH_SIZE, DAMPING, DAMPING_FACTOR, MAX_LENGTH, PRESETS, SHARD_SIZE, Option


@dataclass(frozen=True)
class Command:
    help: str
    add_flags: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def add_commands(parser: argparse.ArgumentParser, commands: dict[str, Command], dest: str, metavar: str) -> None:
    """One subparser per entry of `commands`; the chosen name lands in `args.<dest>`."""
    subparsers = parser.add_subparsers(dest=dest, required=True, metavar=metavar)
    for name, command in commands.items():
        command.add_flags(subparsers.add_parser(name, help=command.help))


class Flag:
    """A flag of the command line alone: argparse's arguments, given once. A callable `default`
    is called when a parser is built (a default from the environment is read then)."""

    def __init__(self, *names: str, **settings):
        self.names, self.settings = names, settings

    def replace(self, **settings) -> Flag:
        """The same flag with some settings changed (e.g. required in one command)."""
        return Flag(*self.names, **{**self.settings, **settings})

    def add_to(self, parser) -> None:
        settings = dict(self.settings)
        if callable(settings.get("default")):
            settings["default"] = settings["default"]()
        parser.add_argument(*self.names, **settings)


def from_env(name: str, default: str) -> Callable[[], str]:
    """A default read from the environment when the parser is built. A string: argparse applies
    the flag's `type` to it only when the command runs, so a bad value stops only that command
    (exit 2, naming the flag)."""
    return lambda: os.environ.get(name, default)


def add(parser, *flags: Option | Flag) -> None:
    for flag in flags:
        if isinstance(flag, Flag):
            flag.add_to(parser)
            continue
        shown = flag.default is not None and flag.default != ""
        settings = {"type": flag.type, "default": flag.default}
        settings["help"] = f"{flag.help} (default: {flag.default})" if shown else flag.help
        if flag.choices:
            settings["choices"] = flag.choices
        parser.add_argument(flag.flag, **settings)


# -- flags of several commands ---------------------------------------------------------------------

MODEL = Flag("--model", required=True, help="local Hugging Face causal-LM directory")
DEVICE = Flag(
    "--device", default="", help="cpu or cuda (default: the worker's: its pool's device, else cuda if available)"
)
DTYPE = Flag("--dtype", default="float32", help="model dtype: float32, bfloat16, float16 or float64 (default: float32)")
DATA = Flag(
    "--data",
    required=True,
    help='TRAIN.jsonl ({"id": optional, "text": ...} or {"id", "messages": [...]} per line), a Parquet file or '
    "directory, or a `datasets` save_to_disk directory; with --server also s3://BUCKET/KEY (or a prefix/)",
)
# the training data as a corpus (engine/corpora.py): token shards instead of --data, a table's columns
CORPUS = (
    Flag(
        "--tokens",
        default=None,
        metavar="DIR",
        help="pre-tokenized token shards (.npy, or raw .bin) instead of --data, cut into --sequence-length tokens; "
        "with --server also s3://BUCKET/PREFIX/",
    ),
    Flag("--sequence-length", type=int, default=None, help="with --tokens: tokens per training sequence"),
    Flag("--token-dtype", default="uint16", choices=("uint16", "uint32"), help="with --tokens: raw shards' ids"),
    Flag("--text-field", default="text", help="a Parquet or datasets table's text column (default: text)"),
    Flag(
        "--messages-field",
        default="messages",
        help="its chat column, read when there is no text column (default: messages)",
    ),
)
FACTORS = Flag("--factors", required=True, help="directory written by `influence fit` (or a server's factorSets/ID)")
QUIET = Flag("--quiet", action="store_true", help="no progress bars")
JSON = Flag(
    "--json",
    action="store_true",
    help="machine-readable stdout: one JSON object per line (progress events, then the outcome or the error)",
)
SERVER = Flag(
    "--server",
    default="",
    metavar="HOST:PORT",
    help="run through a deployed system (default: an embedded one started for this command)",
)
DEPLOYED = Flag("--server", default="", metavar="HOST:PORT", help="the deployed system")
DETACH = Flag(
    "--detach",
    action="store_true",
    help="with --server: an interrupted command leaves its job running (default: the job is cancelled)",
)
TOKEN = Flag(
    "--token",
    default=None,
    help="with --server: the bearer token (default: env INFLUENCE_TOKEN, which `ps` does not show)",
)
TLS_CA = Flag("--tls-ca", default=None, help="with --server: TLS, trusting this CA (env INFLUENCE_TLS_CA)")
TLS_CERT = Flag(
    "--tls-cert", default=None, help="with --server: mutual TLS, this client certificate (env INFLUENCE_TLS_CERT)"
)
TLS_KEY = Flag("--tls-key", default=None, help="with --server: its private key (env INFLUENCE_TLS_KEY)")
# split mode (the chart's per-role services): a service's own address, instead of --server's for it
SERVICE_TARGETS = tuple(
    Flag(
        f"--{role}-server",
        default="",
        metavar="HOST:PORT",
        help=f"with --server: the {role} service's own address when the services are deployed apart "
        "(default: --server)",
    )
    for role in ("factor", "gradient", "query")
)
CLIENT_CONNECTION = (TOKEN, TLS_CA, TLS_CERT, TLS_KEY, *SERVICE_TARGETS)
# a job through the system: where it runs, how its data is read, what it shows
THROUGH_SYSTEM = (BATCH_SIZE, MAX_LENGTH, QUIET, JSON, SERVER, DETACH, *CLIENT_CONNECTION, SHARD_SIZE)


BASE_MODEL = Flag(
    "--base-model",
    default="",
    metavar="DIR",
    help="with a PEFT adapter directory as --model: its base model's directory (default: the one its "
    "adapter_config.json names)",
)


def add_model_job_flags(parser) -> None:
    """The flags of a job that loads the model (fit, score, self, index build)."""
    add(parser, MODEL, BASE_MODEL, DEVICE, DTYPE, *THROUGH_SYSTEM)


class _Preset(argparse.Action):
    """--preset NAME: the settings of PRESETS[NAME] (services/options.py) set on the namespace."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, value)
        for name, setting in PRESETS[value].items():
            setattr(namespace, name, setting)


PRESET = Flag(
    "--preset",
    choices=tuple(PRESETS),
    action=_Preset,
    help="sources: damping 0.1 x mean eigenvalue, the sequences that state what the query says (the default); "
    "generalisation: damping 0.001 x, the sequences whose removal would change the query's log-probability "
    "most (README, 'Which damping')",
)


def add_damping_flags(parser) -> None:
    """--damping-factor F, --damping X or --preset NAME, one of them."""
    add(parser.add_mutually_exclusive_group(), DAMPING_FACTOR, DAMPING, PRESET)
