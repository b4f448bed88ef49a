"""Memory budgets of a worker, host and device, and what a fit or a score chooses from them: its
batch size and its module groups. One mechanism; every number below is decided here and nowhere else.

    budget = WorkerBudget.of_process(device)          # host: the container's limit; device: mem_get_info
    plan   = plan_fit(tracked, weight_bytes, budget, batch_size, max_length, vocab)
    plan   = plan_score(tracked, weight_bytes, budget, batch_size, max_length, vocab, n_queries)
    plan.groups        [[module names], ...]         model order, contiguous, each within the budget
    plan.batch_size    the largest ≤ requested whose captures fit beside the weights and a group's state
    result, used = within_memory(run, plan.batch_size, stage, device)   # a pass, OOM lowering its batch once

**What a module costs while a fit holds it** (`module_state_bytes`, d_in with the bias coordinate):
    covariance sums Σ a aᵀ, Σ s sᵀ       8 (d_in² + d_out²)   float64 (or float32 + its compensation)
    eigenbases Q_A, Q_S                   4 (d_in² + d_out²)   float32, placed once per correction task
    correction sums Σ (Q_Sᵀ DW Q_A)²      8 d_out d_in
A task holds the state of its group's modules on the device that computes (the sums accumulate
there) and, once per task, on the host (where they are written from, and where eigen reduces them
shard by shard). A group is a run of modules in model order whose state fits `STATE_SHARE` of the
smaller of the two budgets left after the model's weights (on the device; the host keeps no model
when a GPU computes). When a factor set's state exceeds that, the fit runs as tasks per (data shard,
module group): each group's captures, sums, eigenbases and Λ are computed, written and read on their
own. A module's numbers never depend on the other modules of its batch, so the factors are the
same bytes whatever the grouping (tests/engine/test_budget.py).

**What a module costs while a score holds it** (`query_state_bytes`, Q the queries as prepared:
times 3 with --damping-check):
    preconditioner Q_A, Q_S, Λ + λ        4 (d_in² + d_out² + d_out d_in)   float32
    query gradients G̃ and P̃               2 · 4 Q d_out d_in               float32, both held while preparing
When every module's exceeds the budget, the score runs per module group too (prepare per group,
score per (data shard, group)): a module's per-module scores are computed alone, so they are the
same numbers in any grouping, and the merge sums them over modules as it always did.

**A batch's captures** (`batch_bytes`): per token position, a and s of every tracked module of the
group (d_in + d_out floats, float32) kept for the contraction, as much again held by autograd, and
the logits' three [V] float32 rows (logits, probabilities, their gradient). The batch size is the
largest ≤ the requested one whose captures fit what is left of the device after the weights and
the group's state; deterministic for a given budget. The estimate ignores the model's own
activations beyond the tracked modules' inputs and outputs, so it can be wrong: an out-of-memory
error inside a task lowers the batch size once (`lower_batch_size`: halved) and the task records
the size it ran with (the factor set's provenance says which sizes the fit used, results.json's
settings which sizes the score used); a second one fails the task (RESOURCE_EXHAUSTED, naming the
budget), never three identical retries. Every pass that runs a model goes through `within_memory`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..errors import ResourceExhaustedError
from .device import release_device_memory
from .modules import TrackedModule
from .resources import memory_limit_bytes

T = TypeVar("T")

GIB = 2**30
# Of a budget, what a fit plans to use: the rest is the process's own (Python, torch, the CUDA
# context, allocator slack and fragmentation).
USABLE_SHARE = 0.8
# Of what is usable after the weights, the share a group's state may take; the rest is the batch's.
STATE_SHARE = 0.5


@dataclass(frozen=True)
class WorkerBudget:
    """Bytes a worker may use: `host` (the container's limit, or physical memory) and `device`
    (the GPU's memory when it computes on one; None on the CPU, where the host budget is both)."""

    host: int
    device: int | None = None
    sharing: int = 1  # workers whose models share the GPU `device` is this worker's share of

    @classmethod
    def of_process(cls, device: torch.device | str = "cpu") -> WorkerBudget:
        """This process's budget: `INFLUENCE_WORKER_HOST_GIB` / `INFLUENCE_WORKER_DEVICE_GIB` when set
        (an API server planning for its workers, whose pods are not its own), else the container's
        memory limit and, on a GPU, its total memory (`torch.cuda.mem_get_info`; none known when
        this process sees no GPU) divided among the `INFLUENCE_WORKERS_PER_GPU` workers that load
        a model each on it (`influence serve --workers N` on a GPU sets it: N copies must fit).
        Device "": the machine's (cuda when there is one)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        host = _gib_from_env("INFLUENCE_WORKER_HOST_GIB") or memory_limit_bytes()
        device_bytes = _gib_from_env("INFLUENCE_WORKER_DEVICE_GIB")
        sharing = 1
        if device_bytes is None and torch.device(device).type == "cuda" and torch.cuda.is_available():
            _, total = torch.cuda.mem_get_info(torch.device(device))
            sharing = max(1, int(os.environ.get("INFLUENCE_WORKERS_PER_GPU", "1") or 1))
            device_bytes = total // sharing
        return cls(host, device_bytes, sharing)

    @classmethod
    def of_gib(cls, host_gib: float, device_gib: float | None = None) -> WorkerBudget:
        return cls(int(host_gib * GIB), None if device_gib is None else int(device_gib * GIB))

    @property
    def computing(self) -> int:
        """The budget of the memory the passes compute in: the device's, else the host's."""
        return self.device if self.device is not None else self.host

    def describe(self) -> str:
        host = f"host {self.host / GIB:.1f} GiB"
        shared = f", 1/{self.sharing} of a GPU its {self.sharing} workers share" if self.sharing > 1 else ""
        return host + (f", device {self.device / GIB:.1f} GiB{shared}" if self.device is not None else "")

    def fix(self) -> str:
        """What gives a worker more memory, in words for an error message."""
        if self.sharing > 1:
            return f"serve fewer workers per GPU (--workers {self.sharing} loads {self.sharing} models on one)"
        return "give the workers more memory (INFLUENCE_WORKER_HOST_GIB/_DEVICE_GIB: the pool's)"


def _gib_from_env(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    try:
        return int(float(text) * GIB) if text else None
    except ValueError:
        return None


def module_state_bytes(module: TrackedModule) -> int:
    """Bytes a fit holds for one module: its sums, eigenbases and correction sums (module docstring)."""
    d_in, d_out = module.d_in_full, module.d_out
    return 12 * (d_in * d_in + d_out * d_out) + 8 * d_out * d_in


def query_state_bytes(n_queries: int) -> Callable[[TrackedModule], int]:
    """Bytes a score holds for one module with `n_queries` prepared queries (module docstring)."""

    def state(module: TrackedModule) -> int:
        d_in, d_out = module.d_in_full, module.d_out
        return 4 * (d_in * d_in + d_out * d_out + d_out * d_in) + 8 * n_queries * d_out * d_in

    return state


def token_bytes(modules: Sequence[TrackedModule], vocab: int) -> int:
    """Device bytes per token position of a batch: the captures, as much again for autograd, and
    the logits' three float32 rows."""
    return 2 * 4 * sum(m.d_in_full + m.d_out for m in modules) + 3 * 4 * vocab


@dataclass(frozen=True)
class MemoryPlan:
    """What a fit or a score runs with under a budget: its module groups (model order) and its batch size."""

    groups: list[list[str]]
    batch_size: int
    budget: WorkerBudget

    def to_provenance(self) -> dict:
        return {
            "module_groups": len(self.groups),
            "planned_batch_size": self.batch_size,
            "memory_budget": self.budget.describe(),
        }


def module_groups(
    modules: dict[str, TrackedModule], state_budget: int, state: Callable[[TrackedModule], int] = module_state_bytes
) -> list[list[str]]:
    """Runs of modules in model order, each holding at most `state_budget` bytes of `state` (a fit's
    by default; a module larger than that alone is a group of its own)."""
    groups: list[list[str]] = []
    held = 0
    for name, module in modules.items():
        size = state(module)
        if not groups or held + size > state_budget:
            groups.append([])
            held = 0
        groups[-1].append(name)
        held += size
    return groups


def plan_fit(
    modules: dict[str, TrackedModule],
    weight_bytes: int,
    budget: WorkerBudget,
    batch_size: int,
    max_length: int,
    vocab: int,
    state: Callable[[TrackedModule], int] = module_state_bytes,
) -> MemoryPlan:
    """The groups and batch size of a fit of `modules` (a model of `weight_bytes`) under `budget`,
    a module holding `state` bytes (a fit's by default; plan_score's: a score's).
    ResourceExhaustedError when not even one sequence of one group fits beside the weights."""
    usable = int(budget.computing * USABLE_SHARE) - weight_bytes
    host_usable = int(budget.host * USABLE_SHARE) - (weight_bytes if budget.device is None else 0)
    if min(usable, host_usable) <= 0:
        raise ResourceExhaustedError(
            f"the model's weights ({weight_bytes / GIB:.1f} GiB) leave nothing of the worker's memory "
            f"({budget.describe()}) for a fit or a score: {budget.fix()}"
        )
    groups = module_groups(modules, int(min(usable, host_usable) * STATE_SHARE), state)
    largest_state = max((sum(state(modules[n]) for n in group) for group in groups), default=0)
    per_sequence = max_length * max(
        (token_bytes([modules[n] for n in group], vocab) for group in groups), default=token_bytes([], vocab)
    )
    fitting = (usable - min(largest_state, usable)) // max(per_sequence, 1)
    if fitting < 1:
        raise ResourceExhaustedError(
            f"one sequence of {max_length} tokens does not fit the worker's memory ({budget.describe()}) "
            f"beside the model and one module group's state: lower --max-length, or {budget.fix()}"
        )
    return MemoryPlan(groups, int(min(batch_size, fitting)), budget)


def plan_score(
    modules: dict[str, TrackedModule],
    weight_bytes: int,
    budget: WorkerBudget,
    batch_size: int,
    max_length: int,
    vocab: int,
    n_queries: int,
) -> MemoryPlan:
    """The groups and batch size of a score of `n_queries` prepared queries (times 3 with
    --damping-check) against the factors of `modules`: plan_fit with a score's module state."""
    return plan_fit(modules, weight_bytes, budget, batch_size, max_length, vocab, query_state_bytes(n_queries))


def within_memory(
    run: Callable[[int], T],
    batch_size: int,
    stage: str,
    device: torch.device | str,
    on_retry: Callable[[], None] | None = None,
) -> tuple[T, int]:
    """`run(batch_size)` and the batch size it ran at: on an out-of-memory error, once more at
    `lower_batch_size(batch_size)` (after `on_retry`, e.g. dropping what the failed attempt kept,
    and the device's cached blocks released); a second one is ResourceExhaustedError (a failure of
    the caller's settings: a redelivery would fail alike). The one rule every pass follows."""
    try:
        return run(batch_size), batch_size
    except Exception as error:
        if not is_out_of_memory(error):
            raise
    if on_retry is not None:
        on_retry()
    release_device_memory(device)
    lowered = lower_batch_size(batch_size)
    try:
        return run(lowered), lowered
    except Exception as error:
        if not is_out_of_memory(error):
            raise
    release_device_memory(device)
    raise ResourceExhaustedError(
        f"the {stage} pass ran out of memory at batch size {batch_size} and again at {lowered}: "
        "lower --batch-size or --max-length, or give the workers more memory"
    )


def lower_batch_size(batch_size: int) -> int:
    """The batch size a task retries with after running out of memory: half (at least 1)."""
    return max(1, batch_size // 2)


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocation failure of torch: CUDA's OutOfMemoryError, or the CPU allocator's."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
