"""The query side in module groups (engine/budget.py plan_score, Scorer(group=...)): scores,
per-module scores, damping-check overlaps and token scores the same numbers as one group, in memory
and as the service's steps (prepare per group, score per (shard, group), joined, merged); every
scoring pass under the budget's out-of-memory rule."""

from __future__ import annotations

import pytest
import torch

from services.engine.budget import (
    GIB,
    STATE_SHARE,
    USABLE_SHARE,
    WorkerBudget,
    module_groups,
    query_state_bytes,
)
from services.engine.capture import describe_all
from services.engine.fit import FitConfig, fit_factors
from services.engine.index import Indexer, IndexSpec
from services.engine.index import joined as joined_blocks
from services.engine.score import (
    PreparedQueries,
    ScoreConfig,
    Scorer,
    joined,
    mean_length,
    merge,
    plan_model_score,
    score_in_memory,
)
from services.errors import ResourceExhaustedError
from tests.support.memory import RunsOutOfMemory
from tests.support.reference import IntTokenizer
from tests.support.tiny import random_examples, random_queries, tiny_model

CONFIG = dict(batch_size=3, top_k=4, bottom_k=2, per_module=True, per_token=True, damping_check=True)


@pytest.fixture(scope="module")
def fitted():
    model, tokenizer = tiny_model("llama", n_layer=3), IntTokenizer()
    examples = random_examples(13, seed=4)
    factors = fit_factors(model, tokenizer, examples, FitConfig(modules="all", batch_size=4))
    return model, tokenizer, factors, examples, random_queries(3, seed=5)


def four_or_more_groups(scorer: Scorer, n_queries: int) -> list[list[str]]:
    """The groups of a budget whose groups hold two modules' score state at most."""
    tracked = describe_all(scorer.modules)
    state = query_state_bytes(n_queries * 3)  # --damping-check prepares three rows per query
    groups = module_groups(tracked, 2 * max(state(m) for m in tracked.values()), state)
    assert len(groups) >= 4 and [n for g in groups for n in g] == scorer.all_names
    return groups


def assert_same_result(grouped, whole):
    assert torch.equal(grouped.scores, whole.scores)
    assert torch.equal(grouped.per_module, whole.per_module)
    assert grouped.damping_overlap == whole.damping_overlap
    assert grouped.kernels == whole.kernels
    for mine, theirs in zip(grouped.ranked, whole.ranked, strict=True):
        assert [(e.index, e.score, e.per_module, e.token_scores) for e in mine] == [
            (e.index, e.score, e.per_module, e.token_scores) for e in theirs
        ]
        assert all(e.token_scores for e in mine)


def test_a_score_in_four_or_more_module_groups_equals_one_group_in_memory(fitted):
    model, tokenizer, factors, examples, queries = fitted
    scorer = Scorer(model, tokenizer, factors, ScoreConfig(**CONFIG))
    sequences = scorer.tokenize_training(examples)
    groups = four_or_more_groups(scorer, len(queries))
    whole = score_in_memory(scorer, queries, sequences)
    grouped = score_in_memory(scorer, queries, sequences, groups=groups)
    assert torch.equal(grouped.partial.scores, whole.partial.scores)
    assert torch.equal(grouped.partial.alternates, whole.partial.alternates)
    assert_same_result(grouped.result, whole.result)


def test_the_service_steps_in_module_groups_equal_one_group(fitted):
    """What the query service's stages run: prepare per group (through the store's tensors), score
    per (shard, group), each shard's groups joined, merged, token scores group after group."""
    model, tokenizer, factors, examples, queries = fitted
    scorer = Scorer(model, tokenizer, factors, ScoreConfig(**CONFIG))
    sequences = scorer.tokenize_training(examples)
    shards = [sequences[:5], sequences[5:9], sequences[9:]]
    mean_tokens = mean_length(sequences)

    def run(groups):
        scorers = [scorer.for_group(group) for group in groups]
        stored = [PreparedQueries.from_tensors(s.prepare(queries, mean_tokens).to_tensors(), s.names) for s in scorers]
        partials = [
            joined([s.score(p, shard) for s, p in zip(scorers, stored, strict=True)], True) for shard in shards
        ]
        result = merge(partials, scorer.all_names, scorer.config)
        for s, p in zip(scorers, stored, strict=True):
            s.attach_token_scores(p, result.ranked, sequences.__getitem__)
            result.kernels.update({name: p.modules[name].kernel for name in s.names})
        return result

    assert_same_result(run(four_or_more_groups(scorer, len(queries))), run([scorer.all_names]))


def test_the_score_plan_follows_the_budget(fitted):
    model, tokenizer, factors, _, queries = fitted
    names, config = list(factors.modules), ScoreConfig(**CONFIG, max_length=16)
    roomy = plan_model_score(model, names, config, len(queries), WorkerBudget.of_gib(64))
    assert roomy.groups == [names] and roomy.batch_size == 3
    scorer = Scorer(model, tokenizer, factors, config)
    groups = four_or_more_groups(scorer, len(queries))
    tracked = describe_all(scorer.modules)
    state = query_state_bytes(len(queries) * 3)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    tight = WorkerBudget(int((2 * max(state(m) for m in tracked.values()) / STATE_SHARE + weights) / USABLE_SHARE) + 1)
    assert plan_model_score(model, names, config, len(queries), tight).groups == groups
    # more queries, more state per module: more groups under the same budget
    assert len(plan_model_score(model, names, config, 2 * len(queries), tight).groups) > len(groups)
    with pytest.raises(ResourceExhaustedError, match="weights"):
        plan_model_score(model, names, config, len(queries), WorkerBudget(64 * GIB, device=weights))


def test_out_of_memory_lowers_a_scores_batch_size_once_and_the_result_says_so(fitted):
    model, tokenizer, factors, examples, queries = fitted
    config = ScoreConfig(batch_size=4, top_k=3)
    reference = score_in_memory(
        Scorer(model, tokenizer, factors, ScoreConfig(batch_size=2, top_k=3)),
        queries,
        Scorer(model, tokenizer, factors, config).tokenize_training(examples),
    )
    oom = RunsOutOfMemory(most=2)
    handle = model.register_forward_pre_hook(oom, with_kwargs=True)
    try:
        scorer = Scorer(model, tokenizer, factors, config)
        sequences = scorer.tokenize_training(examples)
        lowered = score_in_memory(scorer, queries, sequences)
        self_scores = scorer.self_influence(sequences)
    finally:
        handle.remove()
    assert oom.batches[0] == 3 and oom.batches[1] == 2  # the query pass (3 queries) fails once, then halves
    assert max(oom.batches[2:]) == 2  # kept for the later passes: scores and self-influence start at 2
    assert lowered.result.batch_sizes == [2] and self_scores.batch_sizes == {2}
    assert torch.equal(lowered.partial.scores, reference.partial.scores)


def test_out_of_memory_twice_fails_a_score_without_a_third_try(fitted):
    model, tokenizer, factors, examples, _ = fitted
    oom = RunsOutOfMemory(most=0)
    handle = model.register_forward_pre_hook(oom, with_kwargs=True)
    try:
        scorer = Scorer(model, tokenizer, factors, ScoreConfig(batch_size=4))
        with pytest.raises(ResourceExhaustedError, match="self-influence pass ran out of memory at batch size 4"):
            scorer.self_influence(scorer.tokenize_training(examples))
    finally:
        handle.remove()
    assert oom.batches == [4, 2]


def test_out_of_memory_lowers_an_index_builds_batch_size_once(fitted):
    """The index build's pass under the same rule: its blocks written again from the first at the
    lower batch size, the same tensors as a build at that size."""
    model, tokenizer, factors, examples, _ = fitted
    reference = Indexer(model, tokenizer, factors, IndexSpec(), ScoreConfig(batch_size=2))
    sequences = reference.scorer.tokenize_training(examples)
    expected = joined_blocks(list(reference.blocks(sequences)))
    oom = RunsOutOfMemory(most=2)
    handle = model.register_forward_pre_hook(oom, with_kwargs=True)
    try:
        written = {}
        indexer = Indexer(model, tokenizer, factors, IndexSpec(), ScoreConfig(batch_size=4))
        used = indexer.write_blocks(sequences, written.__setitem__)
    finally:
        handle.remove()
    assert used == 2 and oom.batches[0] == 4 and set(oom.batches[1:]) <= {1, 2}
    actual = joined_blocks([written[number] for number in sorted(written)])
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key
