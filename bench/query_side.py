"""The fixed query side of a 16-query batch at SmolLM2-135M's MLP widths, per module: the path
before issue 24 against the per-token one, on the same inputs (engine level, float32, CPU).

    .venv/bin/python bench/query_side.py [--queries 16] [--tokens 36] [--modules 3] [--repeats 2]

Inputs per module (576 x 1536 and 1536 x 576, as SmolLM2's gate/up and down projections): an
orthonormal eigenbasis pair, positive Λ + λ, and each query's per-token factors s [T, d_out],
a [T, d_in] (what the query pass captures; the pass itself is the same on both paths and not timed).

    before: ∇ = sᵀ a materialised; the index query: rotate ∇ whole (2 GEMMs), whiten, rank-16
            truncation by a float64 eigh of the 576 x 576 Gram per query; the rescoring query:
            precondition ∇ (rotate whole, divide, rotate back).
    after:  G̃ = (s Q_S)ᵀ (a Q_A) per query, rotated in the cheapest order (rotation.py); the index
            query: whiten, rank-16 randomized SVD in float32 (the build's); the rescoring query:
            P̃ = G̃ ⊘ (Λ + λ), kept in the eigenbasis (two_stage settles it for its candidates).

Prints CPU seconds per module for each path (process time, one thread by default: on a shared
host wall time measures the neighbours), the whole-model figure (x 90 modules), and the relative
error of the exact parts (after vs before).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.engine.capture import ModuleCapture  # noqa: E402
from services.engine.index import IndexSpec, randomized_svd  # noqa: E402
from services.engine.precondition import Preconditioner, divided, low_rank, precondition  # noqa: E402
from services.engine.rotation import rotate  # noqa: E402
from services.engine.score import QueryFactors  # noqa: E402


def orthonormal(size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))[0].float()


def inputs(d_out: int, d_in: int, queries: int, tokens: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    q_s, q_a = orthonormal(d_out, generator), orthonormal(d_in, generator)
    eigenvalues = torch.rand(d_out, d_in, generator=generator, dtype=torch.float64) ** 4
    curvature = Preconditioner(eigenvalues + 0.1 * eigenvalues.mean(), q_s, q_a, damping=0.1)
    s = torch.randn(queries, tokens, d_out, generator=generator)
    a = torch.randn(queries, tokens, d_in, generator=generator)
    capture = ModuleCapture(a, s, torch.ones(queries, tokens, dtype=torch.bool), 1)
    return curvature, capture


def before(curvature: Preconditioner, capture: ModuleCapture, rank: int):
    gradients = capture.per_sequence_gradients()  # [Q, d_out, d_in]
    rotated = rotate(gradients, curvature.gradient_basis, curvature.activation_basis)
    whitened = rotated / curvature.denominator.sqrt().float()
    index_query = low_rank(whitened, rank)
    prepared = precondition(gradients, curvature, torch.float32)
    return index_query, prepared


def after(curvature: Preconditioner, capture: ModuleCapture, rank: int, test_matrix: torch.Tensor):
    factors = QueryFactors(capture.a.shape[0], [(torch.arange(capture.a.shape[0]), capture)])
    rotated = factors.rotated(curvature.gradient_basis, curvature.activation_basis)
    whitened = rotated / curvature.denominator.sqrt().float()
    index_query = randomized_svd(whitened, rank, test_matrix)
    prepared = divided(rotated, curvature, torch.float32)  # P̃, in the eigenbasis
    return index_query, prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=36)
    parser.add_argument("--modules", type=int, default=3, help="how many modules to time (alternating shapes)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model-modules", type=int, default=90, help="SmolLM2-135M's tracked MLP modules")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rank = IndexSpec().query_rank
    shapes = [(1536, 576), (1536, 576), (576, 1536)]
    timings = {"before": [], "after": []}
    errors = []
    for module in range(args.modules):
        d_out, d_in = shapes[module % 3]
        curvature, capture = inputs(d_out, d_in, args.queries, args.tokens, module)
        test_matrix = torch.randn(d_in, rank + 8, generator=torch.Generator().manual_seed(module))
        for _ in range(args.repeats):
            started = time.process_time()
            old_query, old_prepared = before(curvature, capture, rank)
            timings["before"].append(time.process_time() - started)
            started = time.process_time()
            new_query, new_prepared = after(curvature, capture, rank, test_matrix)
            timings["after"].append(time.process_time() - started)
        back = rotate(new_prepared, curvature.gradient_basis.T, curvature.activation_basis.T)
        gradients = capture.per_sequence_gradients()
        whitened = rotate(gradients, curvature.gradient_basis, curvature.activation_basis)
        whitened = whitened / curvature.denominator.sqrt().float()
        optimal = (whitened - old_query[0] @ old_query[1].transpose(1, 2)).norm(dim=(1, 2))
        randomized = (whitened - new_query[0] @ new_query[1].transpose(1, 2)).norm(dim=(1, 2))
        errors.append(
            {
                "prepared_relative_error": float((back - old_prepared).norm() / old_prepared.norm()),
                # Frobenius error of the randomized rank-16 query against the optimal one's, per query
                "low_rank_error_over_optimal_max": float((randomized / optimal).max()),
                "low_rank_error_over_optimal_mean": float((randomized / optimal).mean()),
                "optimal_low_rank_relative_error": float((optimal / whitened.norm(dim=(1, 2))).mean()),
            }
        )
    per_module = {key: min(values) for key, values in timings.items()}
    report = {
        "date": time.strftime("%F %T"),
        "threads": torch.get_num_threads(),
        "queries": args.queries,
        "tokens": args.tokens,
        "cpu_seconds_per_module": {key: round(value, 3) for key, value in per_module.items()},
        "cpu_seconds_whole_model": {key: round(value * args.model_modules, 1) for key, value in per_module.items()},
        "speedup": round(per_module["before"] / per_module["after"], 1),
        "exact_parts": errors,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
