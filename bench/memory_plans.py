"""The memory a fit and a score need, on paper, and what the budget (services/engine/budget.py)
chooses for it: the size table of docs/deploy.md ("Sizing") and BENCHMARKS.md's plans.

    python bench/memory_plans.py            # the size table and the plans as Markdown
    python bench/memory_plans.py --json     # the same numbers as JSON

No model is built: a Llama's tracked modules follow from its shapes (hidden h, MLP i, layers L,
heads, KV heads, vocabulary V). Sizes per row, for the tracked modules of the selection (MLP: the
default; all: attention too):
    weights            every parameter, in the model's dtype (bf16 for 7B+, float32 for 135M)
    sums               covariance sums Σ a aᵀ, Σ s sᵀ in float64: 8 Σ (d_in² + d_out²)
    bases              Q_A, Q_S in float32: 4 Σ (d_in² + d_out²)
    Λ                  float32 [d_out, d_in] per module: 4 Σ d_out d_in
    query gradient     one query's DQ (and its preconditioned P_q) in float32: 4 Σ d_out d_in each
    captures / token   a and s of every tracked module in float32: 4 Σ (d_in + d_out); a batch holds
                       B × T of them (the table gives B = 8, T = 2048)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.engine.budget import GIB, MemoryPlan, WorkerBudget, plan_fit  # noqa: E402
from services.engine.modules import TrackedModule  # noqa: E402
from services.errors import ResourceExhaustedError  # noqa: E402


@dataclass(frozen=True)
class Llama:
    name: str
    hidden: int
    mlp: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    dtype_bytes: int

    @property
    def parameters(self) -> int:
        head = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head
        per_layer = attention + 3 * self.hidden * self.mlp + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * per_layer + embeddings + self.hidden


MODELS = [
    Llama("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, True, 4),
    Llama("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000, False, 2),
    Llama("Llama-3-8B", 4096, 14336, 32, 32, 8, 128256, False, 2),
    Llama("Llama-3-70B", 8192, 28672, 80, 64, 8, 128256, False, 2),
]


def llama_modules(hidden: int, mlp: int, layers: int, heads: int, kv_heads: int, attention: bool = False):
    """The tracked modules of a Llama (MLP projections; with `attention` the attention ones too),
    model order, as engine.modules describes them."""
    head = hidden // heads
    shapes = [("mlp.gate_proj", hidden, mlp), ("mlp.up_proj", hidden, mlp), ("mlp.down_proj", mlp, hidden)]
    if attention:
        shapes = [
            ("self_attn.q_proj", hidden, hidden),
            ("self_attn.k_proj", hidden, kv_heads * head),
            ("self_attn.v_proj", hidden, kv_heads * head),
            ("self_attn.o_proj", hidden, hidden),
            *shapes,
        ]
    return {
        f"model.layers.{layer}.{name}": TrackedModule(f"model.layers.{layer}.{name}", d_in, d_out, False, False)
        for layer in range(layers)
        for name, d_in, d_out in shapes
    }


def plan_for(modules, weight_bytes: float, budget: WorkerBudget, max_length: int, vocab: int, batch: int = 8):
    return plan_fit(modules, int(weight_bytes), budget, batch, max_length, vocab)


def sizes(model: Llama, attention: bool = False, batch: int = 8, tokens: int = 2048) -> dict[str, float]:
    """GiB of each row of the table (module docstring)."""
    modules = llama_modules(model.hidden, model.mlp, model.layers, model.heads, model.kv_heads, attention)
    square = sum(m.d_in_full**2 + m.d_out**2 for m in modules.values())
    product = sum(m.d_in_full * m.d_out for m in modules.values())
    width = sum(m.d_in_full + m.d_out for m in modules.values())
    return {
        "weights": model.parameters * model.dtype_bytes / GIB,
        "sums_float64": 8 * square / GIB,
        "bases_float32": 4 * square / GIB,
        "lambda_float32": 4 * product / GIB,
        "query_gradient_float32": 4 * product / GIB,
        "captures_per_batch": 4 * width * batch * tokens / GIB,
    }


GPU_WORKER = WorkerBudget.of_gib(64, 80)  # the chart's GPU pool: a 64 GiB pod with one 80 GB GPU


def plans(budget: WorkerBudget = GPU_WORKER, max_length: int = 2048) -> dict[str, MemoryPlan | str]:
    """Each model's plan under `budget`, or why there is none (the refusal's words)."""
    chosen: dict[str, MemoryPlan | str] = {}
    for model in MODELS:
        for selection in ("mlp", "all"):
            modules = llama_modules(
                model.hidden, model.mlp, model.layers, model.heads, model.kv_heads, selection == "all"
            )
            try:
                chosen[f"{model.name} {selection}"] = plan_for(
                    modules, model.parameters * model.dtype_bytes, budget, max_length, model.vocab
                )
            except ResourceExhaustedError as refused:
                chosen[f"{model.name} {selection}"] = str(refused)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    table = {f"{m.name} {s}": sizes(m, s == "all") for m in MODELS for s in ("mlp", "all")}
    chosen = {}
    for name, plan in plans().items():
        chosen[name] = (
            {"groups": len(plan.groups), "batch_size": plan.batch_size} if isinstance(plan, MemoryPlan) else plan
        )
    if args.json:
        print(json.dumps({"sizes_gib": table, "plans": chosen, "budget": GPU_WORKER.describe()}, indent=1))
        return
    print("| model, tracked | weights | sums (f64) | bases (f32) | Λ (f32) | query gradient | captures B=8 T=2048 |")
    print("|---|---|---|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{value:,.1f}" for value in row.values()) + " |")
    print(f"\nPlans under {GPU_WORKER.describe()}, T = 2048, requested batch 8:\n")
    print("| model, tracked | module groups | batch size |")
    print("|---|---|---|")
    for name, plan in chosen.items():
        if isinstance(plan, str):
            print(f"| {name} | refused: {plan} | |")
        else:
            print(f"| {name} | {plan['groups']} | {plan['batch_size']} |")


if __name__ == "__main__":
    main()
