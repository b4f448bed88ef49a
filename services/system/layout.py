"""Where a job's own objects live in the object store, and a tenant's part of it. One function per key.

`job_*` are a job's private intermediates (plain objects, rewritten identically by a retried
task). The published artifacts (datasets, factor sets, indexes, results) and the files in them
are the catalog's (services/catalog): each key has exactly one home.
"""

from __future__ import annotations

from ..wire import DEFAULT_TENANT


def tenant_prefix(tenant: str) -> str:
    """Where a tenant's keys live: the default tenant (no authentication) keeps the layout that
    predates tenants, at the root; every other tenant is under tenants/{tenant}/. The default
    tenant's resource names cannot reach there: every key below starts with a fixed collection
    ("datasets/", "jobs/", ...) and resource ids hold no '/'."""
    return "" if tenant == DEFAULT_TENANT else f"tenants/{tenant}/"


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


def job_model(job_id: str) -> str:
    """A fit's model as its pass tasks describe it for the stages that do not load it (JSON:
    tracked modules, dtype, fingerprint, how the passes computed; engine/fit.py FittedModel)."""
    return f"jobs/{job_id}/model.json"


def job_modules(job_id: str) -> str:
    """A score job's module order (JSON list: the rows of its per-module scores, the model's order),
    written by prepare for merge, which loads no model."""
    return f"jobs/{job_id}/modules.json"


def job_block(job_id: str, block: int) -> str:
    """StreamBlocks: block i of a blocks job (a serialised GradientBlock; gradient_svc/blocks.py)."""
    return f"jobs/{job_id}/blocks/{block:05d}.pb"


def job_block_count(job_id: str) -> str:
    """StreamBlocks: written after a blocks job's last block, {"blocks": n}."""
    return f"jobs/{job_id}/blocks/count.json"


def job_entries(job_id: str, stage: str, shard: int) -> str:
    """A shard task's list of the artifact files it wrote ({name: {sha256, size}}, JSON)."""
    return f"jobs/{job_id}/{stage}/{shard:05d}.json"
