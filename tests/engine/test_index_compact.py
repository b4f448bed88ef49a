"""The compact index (issue 24): int8 storage within its error bound, ranks chosen per sequence by
energy share and byte budget, format-1 svd blocks scored as before, the one block loop, and the
candidate sources of two-stage retrieval (the index's, BM25's) merged and rescored exactly."""

from __future__ import annotations

import pytest
import torch

from services.engine.fit import FitConfig, fit_factors
from services.engine.index import Indexer, IndexSpec, SvdFactors, block_bytes, pack_batch, select_ranks
from services.engine.index_scan import Cascade, score_block, score_index_shard
from services.engine.progress import Progress
from services.engine.quantize import LEVELS, loaded, row_bytes, stored
from services.engine.records import Query
from services.engine.score import ScoreConfig, compute_scores
from services.engine.two_stage import contributions, merged, recall, top_candidates, two_stage
from tests.support.numerics import assert_close
from tests.support.reference import IntTokenizer
from tests.support.tiny import random_examples, random_queries, tiny_model


def test_int8_rows_are_within_half_a_step_of_their_absmax():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(50, 37, generator=generator) * torch.logspace(-6, 3, 50).unsqueeze(1)
    values[3] = 0  # a zero row stores zeros
    values[7, 5] = 1e4  # an outlier sets its row's step
    part = stored("u", values, "int8")
    assert part["u"].dtype == torch.int8 and part["u.scale"].shape == (50,)
    restored = loaded(part, "u")
    scale = values.abs().amax(1, keepdim=True)
    error = (restored - values).abs()
    assert bool((error <= scale / (2 * LEVELS) * (1 + 1e-6)).all())  # elementwise: s / 254
    assert bool((error.norm(dim=1) <= values.shape[1] ** 0.5 * scale.squeeze(1) / (2 * LEVELS) * (1 + 1e-6)).all())
    assert bool((restored[3] == 0).all())
    assert row_bytes(37, "int8") == 37 + 4 and row_bytes(37, "bfloat16") == 74


def factors(batch: int, widths: list[tuple[int, int]], rank: int, seed: int = 0) -> dict[str, SvdFactors]:
    """Random SvdFactors whose σ decay at different rates per module."""
    generator = torch.Generator().manual_seed(seed)
    parts = {}
    for number, (d_out, d_in) in enumerate(widths):
        u = torch.linalg.qr(torch.randn(batch, d_out, rank, generator=generator))[0]
        sigma = torch.rand(batch, 1, generator=generator) * 0.5 ** (torch.arange(rank) * (number + 1) / 2)
        v = torch.linalg.qr(torch.randn(batch, d_in, rank, generator=generator))[0] * sigma.unsqueeze(1)
        energy = sigma.square().sum(1) * (1 + torch.rand(batch, generator=generator) * 0.1)  # the tail beyond R
        parts[f"m{number}"] = SvdFactors(u, v, energy)
    return parts


def test_ranks_keep_the_energy_asked_within_the_budget():
    parts = factors(6, [(12, 20), (12, 20), (30, 8)], rank=5)
    every = select_ranks(parts, IndexSpec("svd", rank=5, storage_dtype="int8"))
    assert all(bool((count == 5).all()) for count in every.values())
    total = sum(part.energy.double() for part in parts.values())
    for energy in (0.5, 0.8):
        counts = select_ranks(parts, IndexSpec("svd", rank=5, storage_dtype="int8", energy=energy))
        kept = sum(
            part.squared_singular_values.double()
            .cumsum(1)
            .gather(1, (counts[name] - 1).clamp_min(0).unsqueeze(1))[:, 0]
            * (counts[name] > 0)
            for name, part in parts.items()
        )
        reachable = sum(part.squared_singular_values.double().sum(1) for part in parts.values())
        assert bool((kept >= torch.minimum(energy * total, reachable) - 1e-12).all()), energy
        assert sum(int(c.sum()) for c in counts.values()) < sum(int(c.sum()) for c in every.values())
    budget = 3 * (row_bytes(12, "int8") + row_bytes(20, "int8"))
    spec = IndexSpec("svd", rank=5, storage_dtype="int8", budget=budget)
    counts = select_ranks(parts, spec)
    block = pack_batch(parts, spec)
    pair = {
        f"m{n}": row_bytes(parts[f"m{n}"].u.shape[1], "int8") + row_bytes(parts[f"m{n}"].v.shape[1], "int8")
        for n in range(3)
    }
    per_sequence = sum(counts[name] * pair[name] for name in parts) + 4 * len(parts)
    assert bool((per_sequence <= budget).all())
    assert block_bytes(block) == int(per_sequence.sum())  # pairs, their scales, and each module's int32 count


def test_format_1_svd_blocks_score_as_their_format_2_form():
    parts = factors(4, [(12, 20)], rank=3)
    spec = IndexSpec("svd", rank=3, storage_dtype="float32")
    block = pack_batch(parts, spec)
    old = {"m0/u": parts["m0"].u.float(), "m0/v": parts["m0"].v.float(), "index": torch.arange(4)}
    generator = torch.Generator().manual_seed(1)
    queries = {"m0": {"u": torch.randn(2, 12, 2, generator=generator), "v": torch.randn(2, 20, 2, generator=generator)}}
    assert_close(score_block(queries, old), score_block(queries, block), 1e-6, "format 1 vs 2")
    full = {"m0": {"w": torch.randn(2, 12, 20, generator=generator)}}
    assert_close(score_block(full, old), score_block(full, block), 1e-6, "format 1 vs 2, full-rank queries")


@pytest.fixture(scope="module")
def fitted():
    model = tiny_model("gpt2", d_model=16)
    examples, queries = random_examples(30, seed=60), random_queries(4, seed=61)
    factors = fit_factors(model, IntTokenizer(), examples, FitConfig(batch_size=8))
    return model, examples, queries, factors


def index(fitted, spec: IndexSpec):
    model, examples, queries, factors = fitted
    indexer = Indexer(model, IntTokenizer(), factors, spec, ScoreConfig(batch_size=4))
    sequences = indexer.scorer.tokenize_training(examples)
    blocks = list(indexer.blocks(sequences, block_sequences=8))
    return indexer, sequences, blocks, indexer.queries(queries)


@pytest.mark.slow
def test_the_shard_loop_scores_each_block_in_order_and_reports_progress(fitted):
    _, _, blocks, queries = index(fitted, IndexSpec("svd", rank=4, energy=0.9))
    seen = []

    class Counting(Progress):
        def advance(self, units=1, tokens=0):
            seen.append(units)

    shard = score_index_shard(queries, iter(blocks), Counting())
    assert seen == [1] * len(blocks) and shard.index.tolist() == torch.cat([b["index"] for b in blocks]).tolist()
    assert torch.equal(shard.scores, torch.cat([score_block(queries, b) for b in blocks], 1).double())


@pytest.mark.slow
def test_the_cascade_rescans_each_querys_best_at_full_quality(fitted):
    _, _, blocks, queries = index(fitted, IndexSpec("svd", rank=4, energy=0.95))
    full = score_index_shard(queries, blocks).scores  # [Q, 30]
    keeping_all = Cascade(pairs=1, query_rank=1, keep=1.0)
    assert torch.equal(score_index_shard(queries, blocks, cascade=keeping_all).scores, full)
    for bottom in (False, True):
        cascade = Cascade(pairs=1, query_rank=2, keep=0.25, minimum=0, bottom=bottom)  # 2 of each 8-sequence block
        scores = score_index_shard(queries, blocks, cascade=cascade).scores
        rescanned = ~torch.isclose(scores, full, rtol=0, atol=0)  # where the coarse score stands
        exact_positions = torch.isclose(scores, full, rtol=1e-5, atol=1e-6 * float(full.abs().max()))
        per_block = [2 * (1 + bottom) if b["index"].numel() > 2 * (1 + bottom) else b["index"].numel() for b in blocks]
        assert int(exact_positions.sum(1).min()) >= sum(per_block)  # each query's rescanned: full quality
        assert bool(rescanned.any())  # and the rest coarse
    # each query's best by the full scan is found when it is also its block's best by the coarse one
    truth = [torch.topk(row, 3).indices.tolist() for row in full]
    found = [torch.topk(row, 3).indices.tolist() for row in score_index_shard(queries, blocks, cascade=cascade).scores]
    assert recall(found, truth) >= 0.5


@pytest.mark.slow
def test_int8_and_chosen_ranks_stay_close_to_the_float32_index(fitted):
    exact_spec = IndexSpec("svd", rank=16, storage_dtype="float32", query_rank=None)
    _, _, blocks, queries = index(fitted, exact_spec)
    reference = score_index_shard(queries, blocks).scores
    _, _, blocks8, _ = index(fitted, IndexSpec("svd", rank=16, storage_dtype="int8", query_rank=None))
    assert_close(score_index_shard(queries, blocks8).scores, reference, 2e-2, "int8")  # 127 levels per row
    _, _, chosen, _ = index(fitted, IndexSpec("svd", rank=16, storage_dtype="int8", query_rank=None, energy=0.95))
    assert sum(block_bytes(b) for b in chosen) < sum(block_bytes(b) for b in blocks8)
    assert_close(score_index_shard(queries, chosen).scores, reference, 0.25, "energy 0.95")


@pytest.mark.slow
def test_candidates_from_two_sources_are_merged_and_rescored_exactly(fitted):
    model, examples, queries, factors = fitted
    indexer, sequences, blocks, index_queries = index(fitted, IndexSpec("svd", rank=2, energy=0.8))
    shard = score_index_shard(index_queries, blocks)
    scores = torch.zeros(len(queries), len(examples), dtype=torch.float64)
    scores[:, shard.index] = shard.scores
    assert merged([[3, 1], [2]], [[1, 5], [7, 2]]) == [[3, 1, 5], [2, 7]]
    from_index = top_candidates(scores, 3)
    lexical = [[query, query + 10] for query in range(len(queries))]  # another source's candidates
    candidates = merged(from_index, lexical)
    _, prepared = indexer.query_side(queries, 8.0)
    result, rescored = two_stage(indexer.scorer, prepared, scores, candidates, sequences.__getitem__)
    exact = compute_scores(model, IntTokenizer(), factors, examples, queries, ScoreConfig(batch_size=4)).scores
    assert rescored == len(set().union(*map(set, candidates)))
    for query, chosen in enumerate(candidates):
        assert_close(result.scores[query, chosen], exact[query, chosen], 1e-5, "rescored")
        best = max(chosen, key=lambda index: float(exact[query, index]))
        assert result.top[query][0].index == best
    truth = [torch.topk(exact[query], 3).indices.tolist() for query in range(len(queries))]
    assert recall(candidates, truth) >= recall(from_index, truth)
    assert recall([[1, 2]], [[2, 9]]) == 0.5


def test_a_sequence_only_bm25_finds_reaches_the_top_k_when_it_scores_best(fitted):
    model, examples, _, factors = fitted
    own = [2, 5, 11, 17]  # each query is one training sequence's text, split into prompt and completion
    queries = []
    for index in own:
        words = examples[index].text.split()
        queries.append(Query(f"q{index}", " ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2 :])))
    exact = compute_scores(model, IntTokenizer(), factors, examples, queries, ScoreConfig(batch_size=4)).scores
    assert exact.argmax(1).tolist() == own  # its own sequence scores best, exactly
    indexer = Indexer(model, IntTokenizer(), factors, IndexSpec("svd", rank=1), ScoreConfig(batch_size=4))
    sequences = indexer.scorer.tokenize_training(examples)
    index_queries, prepared = indexer.query_side(queries, 8.0)
    shard = score_index_shard(index_queries, indexer.blocks(sequences, block_sequences=8))
    scores = torch.zeros(len(queries), len(examples), dtype=torch.float64)
    scores[:, shard.index] = shard.scores
    scores[range(len(own)), own] = scores.min() - 1  # an index that ranks it last: only BM25 finds it
    from_index = top_candidates(scores, 3)
    lexical = indexer.scorer.lexical_candidates("bm25", queries, sequences, 3)
    assert all(index not in found for index, found in zip(own, from_index, strict=True))
    assert all(index in found for index, found in zip(own, lexical, strict=True))

    alone, _ = two_stage(indexer.scorer, prepared, scores, from_index, sequences.__getitem__)
    assert all(top[0].index != index for top, index in zip(alone.top, own, strict=True))
    candidates = merged(from_index, lexical)
    result, rescored = two_stage(indexer.scorer, prepared, scores, candidates, sequences.__getitem__)
    assert rescored == len(set().union(*map(set, candidates)))
    for query, chosen in enumerate(candidates):  # every merged candidate rescored exactly
        assert_close(result.scores[query, chosen], exact[query, chosen], 1e-5, "rescored")
        assert result.top[query][0].index == own[query]
        assert result.top[query][0].score == pytest.approx(float(exact[query, own[query]]), rel=1e-5)
        ranked = sorted(chosen, key=lambda index: -float(exact[query, index]))[: len(result.top[query])]
        assert [entry.index for entry in result.top[query]] == ranked

    shares = contributions({"index": from_index, "lexical": lexical, "union": candidates}, result.top)
    final = [[entry.index for entry in entries] for entries in result.top]
    for name, source in (("index", from_index), ("lexical", lexical), ("union", candidates)):
        assert shares[name]["candidates"] == sum(map(len, source))
        assert shares[name]["in_top_k"] == sum(len(set(a) & set(b)) for a, b in zip(source, final, strict=True))
        assert shares[name]["recall"] == pytest.approx(recall(source, final))
    assert shares["union"]["recall"] == 1.0 and shares["union"]["in_top_k"] == sum(map(len, final))
    assert shares["lexical"]["in_top_k"] >= len(own)  # each query's best came from BM25 alone


def test_contributions_count_each_sources_share_of_the_final_top_k():
    class Entry:
        def __init__(self, index):
            self.index = index

    top = [[Entry(4), Entry(1)], [Entry(7)]]
    shares = contributions({"a": [[1, 2, 3], [7]], "b": [[4], [8, 9]]}, top)
    assert shares == {
        "a": {"candidates": 4, "in_top_k": 2, "recall": 0.75},
        "b": {"candidates": 3, "in_top_k": 1, "recall": 0.25},
    }
