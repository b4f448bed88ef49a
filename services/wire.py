"""What the client and the servers agree on about messages (no torch, no grpc imports here)."""

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

# The tenant of every call on a server without --auth-tokens (and of records from before tenants):
# its artifacts and Redis keys keep the layout that predates tenants.
DEFAULT_TENANT = "default"
