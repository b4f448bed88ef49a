"""What the client and the servers agree on about messages (no torch, no grpc imports here)."""

import hashlib

# Largest gRPC message either side sends or accepts. Artifacts larger than one message travel as
# chunked streams (FileChunk), never whole.
MAX_MESSAGE_BYTES = 512 * 2**20

# Default size of one FileChunk's data.
CHUNK_BYTES = 1 * 2**20

# Training sequences per data shard unless a request says otherwise. A shard is the unit of
# fan-out and retry, and each costs a few tasks (≈ 35 ms on the embedded system) plus, in a fit,
# one partial sum per tracked module through the store (for an LLM's MLP, ~0.5 GB per module and
# shard), so shards should hold minutes of work, not seconds.
DEFAULT_SHARD_SIZE = 1024


def dataset_id(content_sha256: str, model_path: str, max_length: int, shard_size: int) -> str:
    """The id of the dataset registered from JSONL bytes with this sha256, for this model directory
    and these settings. Content-addressed: registering the same data again reuses the dataset
    (the client asks for it before uploading; the server returns it without a new job)."""
    key = f"{content_sha256}\n{model_path}\n{max_length}\n{shard_size}"
    return "c" + hashlib.sha256(key.encode()).hexdigest()[:23]

# The tenant of every call on a server without --auth-tokens (and of records from before tenants):
# its artifacts and Redis keys keep the layout that predates tenants.
DEFAULT_TENANT = "default"
