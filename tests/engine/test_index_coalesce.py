"""Coalesced index scans (issue 24): several query batches scored over one stream of blocks
(`score_index_shards`, what a worker runs for one tenant's concurrent requests) give each batch
exactly, bit for bit, what it gets alone, whatever the other batches are (their sizes, their query
ranks); a batch cancelled mid-scan is dropped and the others go on; each block is read once."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.engine.fit import FitConfig, fit_factors
from services.engine.index import Indexer, IndexSpec
from services.engine.index_scan import score_index_shard, score_index_shards
from services.engine.progress import Progress
from services.engine.score import ScoreConfig
from services.errors import CancelledError, InputError
from tests.support.reference import IntTokenizer
from tests.support.tiny import random_examples, random_queries, tiny_model

pytestmark = pytest.mark.slow  # index builds of three specs: ~10 s on a loaded 2-core machine

@pytest.fixture(scope="module")
def fitted():
    model = tiny_model("gpt2")  # float64
    examples = random_examples(23, seed=60)
    factors = fit_factors(model, IntTokenizer(), examples, FitConfig(strategy="ekfac"))
    return model, examples, factors


SPECS = [
    IndexSpec("none", storage_dtype="float32"),
    IndexSpec("svd", rank=8, energy=0.9),  # int8, ranks chosen per sequence (the default's kind)
    IndexSpec("svd", rank=8, storage_dtype="bfloat16", energy=1.0),
]


def blocks_and_queries(fitted, spec: IndexSpec):
    """The index blocks of `spec` and three query batches for them: 3 and 2 queries at the spec's
    query rank, 1 query at full rank (another shape in the same scan)."""
    model, examples, factors = fitted
    indexer = Indexer(model, IntTokenizer(), factors, spec, ScoreConfig(batch_size=4))
    sequences = indexer.scorer.tokenize_training(examples)
    blocks = list(indexer.blocks(sequences, block_sequences=5))
    full_rank = Indexer(model, IntTokenizer(), factors, dataclasses.replace(spec, query_rank=None), ScoreConfig())
    batches = [
        indexer.queries(random_queries(3, seed=61)),
        indexer.queries(random_queries(2, seed=62)),
        full_rank.queries(random_queries(1, seed=63)),
    ]
    return blocks, batches


class Reading:
    """A stream of blocks that counts how many were read."""

    def __init__(self, blocks):
        self.blocks, self.read = blocks, 0

    def __iter__(self):
        for block in self.blocks:
            self.read += 1
            yield block


@pytest.mark.parametrize("spec", SPECS, ids=["none", "svd-int8-energy", "svd-bf16"])
def test_each_coalesced_batch_scores_bit_for_bit_as_alone_and_the_blocks_are_read_once(fitted, spec):
    blocks, batches = blocks_and_queries(fitted, spec)
    alone = [score_index_shard(queries, blocks) for queries in batches]
    stream = Reading(blocks)
    together = score_index_shards([(queries, None) for queries in batches], stream)
    assert stream.read == len(blocks)
    for single, coalesced in zip(alone, together, strict=True):
        assert coalesced.scores.dtype == torch.float64
        assert torch.equal(coalesced.scores, single.scores) and torch.equal(coalesced.index, single.index)


class CancelledAfter(Progress):
    """Says it is cancelled once `blocks` blocks were scored for it; counts its advances."""

    def __init__(self, blocks: int | None):
        self.blocks, self.advanced = blocks, 0

    def advance(self, units=1, tokens=0):
        self.advanced += units

    def cancelled(self) -> bool:
        return self.blocks is not None and self.advanced >= self.blocks


def test_a_batch_cancelled_mid_scan_is_dropped_and_the_others_are_untouched(fitted):
    blocks, batches = blocks_and_queries(fitted, SPECS[1])
    assert len(blocks) >= 3
    progresses = [CancelledAfter(None), CancelledAfter(2), CancelledAfter(None)]
    outcomes = score_index_shards(list(zip(batches, progresses, strict=True)), blocks)
    assert isinstance(outcomes[1], CancelledError) and progresses[1].advanced == 2
    for member in (0, 2):
        assert torch.equal(outcomes[member].scores, score_index_shard(batches[member], blocks).scores)
        assert progresses[member].advanced == len(blocks)
    # every batch cancelled: the scan stops; one batch alone raises as before
    everyone = score_index_shards([(queries, CancelledAfter(0)) for queries in batches], Reading(blocks))
    assert all(isinstance(outcome, CancelledError) for outcome in everyone)
    with pytest.raises(CancelledError):
        score_index_shard(batches[0], blocks, CancelledAfter(1))
    with pytest.raises(InputError, match="no index blocks"):
        score_index_shards([(batches[0], None)], [])
