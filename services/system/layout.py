"""Where every artifact lives in the object store (DESIGN section 5). One function per key.

An artifact is a prefix holding files and a manifest.json written last (services/storage);
`*_prefix` name artifacts, `shard_*` files inside a dataset artifact, `job_*` a job's private
intermediates (plain objects, rewritten identically by a retried task).
"""

from __future__ import annotations

from ..wire import DEFAULT_TENANT


def tenant_prefix(tenant: str) -> str:
    """Where a tenant's keys live: the default tenant (no authentication) keeps the layout that
    predates tenants, at the root; every other tenant is under tenants/{tenant}/. The default
    tenant's resource names cannot reach there: every key below starts with a fixed collection
    ("datasets/", "jobs/", ...) and resource ids hold no '/'."""
    return "" if tenant == DEFAULT_TENANT else f"tenants/{tenant}/"


def dataset_prefix(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/"


def shard_tokens(shard: int) -> str:
    """In a dataset artifact: packed token ids of one shard (safetensors; engine.data.pack_sequences)."""
    return f"shards/{shard:05d}.safetensors"


def shard_records(shard: int) -> str:
    """In a dataset artifact: ids and texts of one shard's sequences (JSON list of {"id", "text"})."""
    return f"shards/{shard:05d}.json"


def factors_prefix(factor_set_id: str) -> str:
    return f"factors/{factor_set_id}/"


def result_prefix(result_id: str) -> str:
    return f"results/{result_id}/"


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def job_spec(job_id: str) -> str:
    return f"jobs/{job_id}/spec.json"


def job_upload(job_id: str) -> str:
    return f"jobs/{job_id}/upload.jsonl"


def job_partial(job_id: str, stage: str, shard: int) -> str:
    """A shard task's output (safetensors), e.g. the covariance sums of shard 3."""
    return f"jobs/{job_id}/{stage}/{shard:05d}.safetensors"


def job_output(job_id: str, name: str) -> str:
    """A whole-job intermediate, e.g. the eigenbases or the prepared queries."""
    return f"jobs/{job_id}/{name}.safetensors"


def job_block(job_id: str, block: int) -> str:
    """StreamBlocks: block i of a blocks job (a serialised GradientBlock; gradient_svc/blocks.py)."""
    return f"jobs/{job_id}/blocks/{block:05d}.pb"


def job_block_count(job_id: str) -> str:
    """StreamBlocks: written after a blocks job's last block, {"blocks": n}."""
    return f"jobs/{job_id}/blocks/count.json"


def index_prefix(index_id: str) -> str:
    return f"indexes/{index_id}/"


def index_block(part: int, shard: int, block: int) -> str:
    """In an index artifact: one block of compressed gradients (safetensors; engine/index.py)."""
    return f"p{part:03d}-s{shard:05d}-b{block:04d}.safetensors"


def job_entries(job_id: str, stage: str, shard: int) -> str:
    """A shard task's list of the artifact files it wrote ({name: {sha256, size}}, JSON)."""
    return f"jobs/{job_id}/{stage}/{shard:05d}.json"
