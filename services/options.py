"""The settings a job takes, each defined once: its default, its valid range and its help.

One name per setting: the field of the engine's config (FitConfig, ScoreConfig, IndexSpec), the
field of the request (FitFactorsRequest.batch_size, ...) and, dashed, the flag of the command line
(--batch-size). The CLI builds its flags from these (services/cli/flags.py), the engine's configs
take their defaults and their lower bounds from them (`Option.check`), and the servicers their
defaults for unset request fields and the largest value a request may ask
(`validation.positive(request.batch_size, "batch_size", BATCH_SIZE.default, BATCH_SIZE.maximum)`).

No torch, no grpc: the client and the engine both import this.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class Option:
    """A setting. `minimum` is the smallest valid value (the engine's configs check it, so the CLI
    refuses a bad flag before starting anything); `maximum` the largest one request may ask (the
    servicers check it; a request's 0 means "the default"). None for either: unbounded."""

    name: str
    default: object
    help: str
    type: type = int
    minimum: float | None = None
    maximum: int | None = None
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value) -> None:
        """InputError naming the flag when `value` is under the minimum (None: not given, valid)."""
        if value is not None and self.minimum is not None and value < self.minimum:
            raise InputError(f"{self.flag} must be >= {self.minimum:g}, got {value}")


# -- data ------------------------------------------------------------------------------------------

BATCH_SIZE = Option("batch_size", 8, "sequences per batch", minimum=1, maximum=65536)
MAX_LENGTH = Option("max_length", 512, "truncate sequences to this many tokens", minimum=2, maximum=1_000_000)
# A shard is the unit of fan-out and retry, and each costs a few tasks (≈ 35 ms on the embedded
# system) plus, in a fit, one partial sum per tracked module through the store (for an LLM's MLP,
# ~0.5 GB per module and shard), so shards should hold minutes of work, not seconds.
SHARD_SIZE = Option("shard_size", 1024, "training sequences per data shard", minimum=1, maximum=1_000_000)
BLOCK_SIZE = Option("block_size", 8, "training sequences per streamed gradient block", minimum=1, maximum=1024)

# -- the fit ---------------------------------------------------------------------------------------

STRATEGY = Option(
    "strategy", "ekfac", "curvature approximation", type=str, choices=("identity", "diagonal", "kfac", "ekfac")
)
FISHER = Option(
    "fisher", "sampled", "the Fisher's labels: the model's samples or the data's", str, choices=("sampled", "empirical")
)
MODULES = Option("modules", "mlp", "mlp | attention | all | adapter (an adapter model's default) | a regex", type=str)
MAX_EXAMPLES = Option("max_examples", None, "fit on the first N training sequences", minimum=1)
SEED = Option("seed", 0, "seed of the sampled labels (fit) or of the random projections (index build)")

# -- scoring ---------------------------------------------------------------------------------------

TOP_K = Option("top_k", 10, "training sequences kept per query, best first", minimum=1)
BOTTOM_K = Option(
    "bottom_k", 0, "also keep each query's N most negative training sequences, most negative first (0: none)", minimum=0
)
DAMPING_FACTOR = Option("damping_factor", 0.1, "damping = F x mean eigenvalue per module", float, minimum=0)
DAMPING = Option("damping", None, "absolute damping (overrides --damping-factor)", float, minimum=0)
# Named settings for the two questions users ask, chosen by bench/lds (BENCHMARKS.md, "Low lexical
# overlap" and "all 50 retrained halves"): damping 0.1 x mean eigenvalue finds the sequences that
# state a fact best (recall@10 0.667 against 0.438 at 0.001 on the low-overlap benchmark), damping
# 0.001 x predicts retraining best (LDS +0.067 [+0.034, +0.102] over 0.1 on the demo).
PRESETS: dict[str, dict[str, float]] = {
    "sources": {"damping_factor": 0.1},
    "generalisation": {"damping_factor": 0.001},
}
QUERY_RANK = Option("query_rank", None, "low-rank query batching with rank R", minimum=1)
TFIDF = Option(
    "tfidf", 0, "score only each query's K nearest sequences by TF-IDF; 0: every sequence", minimum=0, maximum=10**9
)
BM25 = Option(
    "bm25", 0, "score only each query's K best sequences by BM25; 0: every sequence", minimum=0, maximum=10**9
)

# -- the index -------------------------------------------------------------------------------------

PROJECTION = Option(
    "projection", "svd", "how each sequence's gradient is compressed", str, choices=("svd", "eigen", "random", "none")
)
# Measured (BENCHMARKS.md, "The index"): rank 8 keeps Spearman >= 0.95 against exact EK-FAC on
# small models but 0.86 on SmolLM2-135M; rank 16 keeps >= 0.93 on all three. Since the compact
# index (issue 24), rank is the most pairs a sequence keeps per module: --energy chooses how many
# (per sequence and module, from its whitened singular values; 1: all of them) and int8 stores them.
RANK = Option("rank", 16, "svd: the most factor pairs kept per sequence and module", minimum=1, maximum=4096)
DIM = Option("dim", 32, "eigen, random: dimensions kept per side", minimum=1, maximum=4096)
STORAGE_DTYPE = Option(
    "storage_dtype",
    "int8",
    "dtype of the stored gradients (int8: one absmax scale per row)",
    str,
    choices=("int8", "bfloat16", "float16", "float32"),
)
# int8 storage is the default (the measurement: it lost nothing against bfloat16 at any
# rank). Energy 0.95 is the frontier's knee (BENCHMARKS.md, issue 24): on the toy Llama / GPT-2 at
# 10^4 sequences 20.8x / 26.2x under exact with 0.986 / 1.000 of the exact top-10 in the top 1%
# (energy 1: 12.5x / 19.0x), and with its default rescoring the LDS of exact EK-FAC on both LDS
# models (within +-0.004). Indexes of format 1 keep energy 1 (catalog/indexes.py FORMAT_1_SPEC).
ENERGY = Option(
    "energy",
    0.95,
    "svd: keep per sequence the fewest factor pairs, across modules, carrying this share of its whitened energy "
    "(1: all --rank pairs of every module)",
    float,
    minimum=0,
)
BUDGET = Option("budget", 0, "svd: at most this many stored bytes per sequence (0: no limit)", minimum=0)
RESCORE = Option(
    "rescore", 100, "with --index: candidates per query rescored exactly (0: the index's own ranking)", minimum=0
)
LEXICAL = Option(
    "lexical",
    0,
    "with --index: also rescore each query's K best sequences by BM25 over the index's training text, merged with "
    "the index's --rescore candidates (0: the index's candidates alone)",
    minimum=0,
    maximum=10**9,
)
