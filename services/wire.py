"""What the client and the servers agree on about messages (no torch, no grpc imports here)."""

import hashlib
from typing import NamedTuple

# Largest gRPC message a server sends and a client accepts (a score result, a gradient block).
# What a server accepts is far smaller (REQUEST_LIMITS["max_message_bytes"]): data larger than one
# message travels as chunked streams (FileChunk, UploadDatasetRequest), never whole.
MAX_MESSAGE_BYTES = 512 * 2**20

# Size of one chunk's data, both ways (an upload's chunks, a download's by default).
CHUNK_BYTES = 1 * 2**20

# The smallest message limit a server may set: one chunk and its framing must fit.
MIN_MESSAGE_BYTES = 2 * CHUNK_BYTES


class RequestLimit(NamedTuple):
    default: int
    flag: str  # of `influence serve`
    env: str  # the flag's default, if set
    counts: str  # what the limit counts, for --help


# What one request (or one caller, at once) may ask of a server, each a field of rpc.common.Limits
# that the operator sets with its `influence serve` flag or env variable (the chart's `limits`
# block); 0: no limit. A request over one is refused with RESOURCE_EXHAUSTED naming the limit and its
# flag (rpc/validation.within_limit; a message over max_message_bytes by gRPC itself, which the
# client turns into the same message).
REQUEST_LIMITS = {
    "max_message_bytes": RequestLimit(
        4 * 2**20,
        "--max-message-bytes",
        "INFLUENCE_MAX_MESSAGE_BYTES",
        f"bytes of one message a caller sends: a request, or one chunk of an upload (at least {MIN_MESSAGE_BYTES})",
    ),
    "max_streams_per_tenant": RequestLimit(
        128,
        "--max-streams-per-tenant",
        "INFLUENCE_MAX_STREAMS_PER_TENANT",
        "calls of one tenant in flight at once (without --auth-tokens: of all callers)",
    ),
    "max_unauthenticated_streams": RequestLimit(
        32,
        "--max-unauthenticated-streams",
        "INFLUENCE_MAX_UNAUTHENTICATED_STREAMS",
        "calls in flight at once that carry no token: health checks and reflection",
    ),
    "max_upload_bytes": RequestLimit(
        256 * 2**20,
        "--max-upload-bytes",
        "INFLUENCE_MAX_UPLOAD_BYTES",
        "bytes of JSONL uploaded to register one dataset (more: by uri)",
    ),
    "max_queries": RequestLimit(4096, "--max-queries", "INFLUENCE_MAX_QUERIES", "queries in one ComputeScores request"),
    "max_query_chars": RequestLimit(
        100_000, "--max-query-chars", "INFLUENCE_MAX_QUERY_CHARS", "characters of one query (prompt plus completion)"
    ),
    "max_top_k": RequestLimit(
        10_000, "--max-top-k", "INFLUENCE_MAX_TOP_K", "top_k of one ComputeScores or ComputeSelfInfluence request"
    ),
    # Sized for a large fine-tuning corpus (billions of tokens); the register task reads a dataset
    # line by line (its memory follows the longest line, not the file: docs/reliability.md).
    "max_dataset_sequences": RequestLimit(
        10_000_000,
        "--max-dataset-sequences",
        "INFLUENCE_MAX_DATASET_SEQUENCES",
        "training sequences in one registered dataset (uploaded, file:// or s3://)",
    ),
}


def dataset_id(content_sha256: str, model_path: str, max_length: int, shard_size: int, base_model: str = "") -> str:
    """The id of the dataset registered from JSONL bytes with this sha256, for this model directory
    (and an adapter's base model directory, when given) and these settings. Content-addressed:
    registering the same data again reuses the dataset (the client asks for it before uploading;
    the server returns it without a new job)."""
    key = f"{content_sha256}\n{model_path}\n{max_length}\n{shard_size}" + (f"\n{base_model}" if base_model else "")
    return "c" + hashlib.sha256(key.encode()).hexdigest()[:23]


# The id in a resource name ("datasets/{id}", "operations/{id}", ...): what every collection's
# parse function accepts (services/catalog, rpc/validation.operation_id).
RESOURCE_ID = r"[A-Za-z0-9_-]{1,64}"

# The tenant of every call on a server without --auth-tokens (and of records from before tenants):
# its artifacts and Redis keys keep the layout that predates tenants.
DEFAULT_TENANT = "default"
