"""Tiny float64 models and random data for the engine's tests (built in-process, no downloads)."""

from __future__ import annotations

import torch

from services.engine.records import Query, TrainingExample
from services.toy.models import build_tiny_model
from tests.support.reference import ids_text

VOCAB = 23


def tiny_model(arch: str, *, vocab: int = VOCAB, seed: int = 0, n_layer: int = 2, d_model: int = 8):
    """A float64 model small enough that dense per-module Fisher matrices are cheap (≤ ~300 params)."""
    return build_tiny_model(
        arch,
        vocab,
        n_layer=n_layer,
        d_model=d_model,
        n_head=2,
        d_ff=12,
        max_positions=64,
        seed=seed,
        dtype=torch.float64,
    )


def random_examples(count: int, *, vocab: int = VOCAB, seed: int = 0, min_len: int = 3, max_len: int = 12):
    """Training sequences of varied length (so batches are padded); token 0 (pad) never appears."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(count):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
        ids = torch.randint(1, vocab, (length,), generator=generator)
        examples.append(TrainingExample(f"train-{index}", ids_text(ids)))
    return examples


def random_queries(count: int, *, vocab: int = VOCAB, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    queries = []
    for index in range(count):
        prompt = torch.randint(1, vocab, (int(torch.randint(2, 7, (1,), generator=generator)),), generator=generator)
        completion = torch.randint(
            1, vocab, (int(torch.randint(1, 4, (1,), generator=generator)),), generator=generator
        )
        queries.append(Query(f"query-{index}", ids_text(prompt), ids_text(completion)))
    return queries
