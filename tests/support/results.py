"""Result directories made without a model (results.json and scores.safetensors in the format
query_svc/reports.py writes), for the report's tests at sizes no test could score: a thousand
queries x top-100 with token-wise and layer-wise influence, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

WORDS = ["the", "a", "river", "ruled", "from", "city", "north", "old", "king", "wrote", "sea", "stone"]


def write_result(
    directory: Path,
    *,
    queries: int,
    top_k: int,
    train: int,
    layers: int = 12,
    tokens: int = 40,
    groups: int = 0,
    approximate: bool = False,
    seed: int = 0,
    bottom_k: int = 0,
    lines: bool = False,
    bottom_tensors: bool = True,
) -> Path:
    """A pairwise result of `queries` x `train` heavy-tailed scores (both signs), each query's top_k
    with `tokens` token scores per sequence (0: no --per-token) and a layer-wise breakdown over
    `layers` layers of two modules each; queries in `groups` groups of two (0: none); with `bottom_k`,
    each query's bottom_k most negative as its "bottom" (schema version 3); with `lines`, each
    entry's "line" (training index + 1; schema version 4). With bottom_k, scores.safetensors holds
    "bottom_index" and "bottom_per_module" unless `bottom_tensors` is False (as results before them)."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=tokens or 30)) for _ in range(train)]
    scores = rng.pareto(2.5, size=(queries, train)) * rng.choice([-1, 1], size=(queries, train), p=[0.3, 0.7])
    scores = scores.astype(np.float32)
    modules = [f"model.layers.{layer}.mlp.{part}" for layer in range(layers) for part in ("up_proj", "down_proj")]
    top_index = np.argsort(-scores, axis=1)[:, :top_k]
    bottom_index = np.argsort(scores, axis=1)[:, :bottom_k]

    def entries(indices) -> list[dict]:
        listed = []
        for rank, index in enumerate(indices, start=1):
            entry = {"rank": rank, "id": f"train-{index}", "score": float(scores[q, index]), "text": texts[index]}
            if lines:
                entry["line"] = int(index) + 1
            if tokens:
                words = texts[index].split()
                entry["tokens"] = [
                    {"token": ("Ġ" if i else "") + word, "score": float(rng.normal() * 1e-3)}
                    for i, word in enumerate(words)
                ]
            if approximate:
                entry["approximate"] = True
            listed.append(entry)
        return listed

    report_queries = []
    for q in range(queries):
        top = entries(top_index[q])
        query = {"id": f"q{q}", "prompt": f"question {q}: what did the king", "completion": " rule", "top": top}
        if bottom_k:
            query["bottom"] = entries(bottom_index[q])
        if groups and q < 2 * groups:
            query["group"] = f"g{q // 2}"
        report_queries.append(query)
    per_module = (rng.normal(size=(len(modules), queries, top_k)) * 1e-2).astype(np.float32)
    report = {
        "schema_version": 4 if lines else 3 if bottom_k else 2,
        "kind": "pairwise",
        "sign": "positive = up-weighting the training sequence makes the completion more likely",
        "strategy": "ekfac",
        "damping": "0.1 x mean eigenvalue",
        "query_rank": None,
        "modules": modules,
        "queries": report_queries,
        "settings": {
            "model": "synthetic",
            "factor_set": "factorSets/synthetic",
            "top_k": top_k,
            **({"bottom_k": bottom_k} if bottom_k else {}),
            "fisher": "sampled",
        },
    }
    tensors = {"scores": scores, "top_index": top_index.astype(np.int64), "top_per_module": per_module}
    if bottom_k and bottom_tensors:
        tensors["bottom_index"] = bottom_index.astype(np.int64)
        tensors["bottom_per_module"] = (rng.normal(size=(len(modules), queries, bottom_k)) * 1e-2).astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps(report))
    save_file(tensors, str(directory / "scores.safetensors"))
    return directory
