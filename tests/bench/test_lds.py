"""bench/lds: the LDS and fact-tracing measures on cases with a known answer, and (slow) the whole
pipeline on a tiny demo: ground truth from retrained subsets, EK-FAC scores, evaluate.py.

The known answer: a "model" whose output on a training subset is exactly linear in the subset
(output_q(S) = Σ_{m ∈ S} w[q, m]), so the ideal attribution is w itself and its LDS is 1; any
strictly increasing transform of the predictions keeps it 1 (Spearman), a sign flip makes it -1,
and scores unrelated to w give an LDS near 0 whose bootstrap CI covers 0."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.support.bench_scripts import load_lds_script

metrics = load_lds_script("metrics")
evaluate = load_lds_script("evaluate")


def linear_world(n_train=60, n_queries=8, n_subsets=40, seed=0):
    generator = np.random.default_rng(seed)
    weights = generator.normal(size=(n_queries, n_train))  # the exact attribution
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for row in masks:
        row[generator.choice(n_train, n_train // 2, replace=False)] = True
    measured = masks.astype(float) @ weights.T  # [S, Q]: exactly linear in the subset
    return weights, masks, measured


def test_spearman_with_ties_matches_the_definition():
    assert metrics.average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 20.0, 20.0, 40.0])
    ra, rb = np.array([0, 1, 2, 3.0]), np.array([0, 1.5, 1.5, 3.0])
    expected = np.corrcoef(ra, rb)[0, 1]
    assert metrics.spearman(a, b) == pytest.approx(expected)
    assert metrics.spearman(a, np.ones(4)) == 0.0  # a constant side has no ranking
    assert metrics.spearman(np.stack([a, -a]), np.stack([a, a])).tolist() == pytest.approx([1.0, -1.0])


def test_the_exact_attribution_of_a_linear_model_has_lds_one():
    weights, masks, measured = linear_world()
    assert metrics.lds_per_query(weights, masks, measured) == pytest.approx(np.ones(8))
    assert metrics.lds_per_query(-weights, masks, measured) == pytest.approx(-np.ones(8))
    assert metrics.lds_per_query(3 * weights + 7, masks, measured) == pytest.approx(np.ones(8))
    noise = np.random.default_rng(1).normal(size=weights.shape)
    unrelated = metrics.lds_per_query(noise, masks, measured).mean()
    draws = metrics.bootstrap_lds([noise], masks, measured, draws=300)[0]
    ci = metrics.interval(unrelated, draws)
    assert abs(unrelated) < 0.2 and ci.low < 0 < ci.high
    # a noisy version of the truth lies between, and the paired difference from the truth excludes 0
    noisy = weights + 1.5 * noise
    exact_draws, noisy_draws = metrics.bootstrap_lds([weights, noisy], masks, measured, draws=300)
    assert (exact_draws == 1).all() or np.allclose(exact_draws, 1)
    value = metrics.lds_per_query(noisy, masks, measured).mean()
    difference = metrics.interval(value - 1, noisy_draws - exact_draws)
    assert 0 < value < 1 and difference.high < 0


def test_fact_tracing_recall_and_mrr_by_hand():
    scores = np.array([[0.9, 0.1, 0.8, 0.3, 0.3], [0.0, 0.2, 0.1, 0.5, 0.4]])
    expected = [[2, 3], [0]]  # query 0: ranks 2 and 3 (the tie 3/4 goes to column 3); query 1: last
    assert metrics.fact_tracing(scores, expected, k=2) == pytest.approx(
        {"recall@2": (0.5 + 0) / 2, "mrr": (1 / 2 + 1 / 5) / 2}
    )
    assert metrics.fact_tracing(scores, expected, k=3) == pytest.approx({"recall@3": (1.0 + 0) / 2, "mrr": 0.35})
    assert metrics.fact_tracing(scores, [[2], []], k=1)["recall@1"] == 0.0  # queries without facts are left out


def write_truth(directory, masks, measured, training_ids, query_ids):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(json.dumps({"training_ids": training_ids, "query_ids": query_ids}))
    for subset, (mask, outputs) in enumerate(zip(masks, measured, strict=True)):
        record = {"keep": np.flatnonzero(mask).tolist(), "query_logprobs": outputs.tolist()}
        (directory / f"subset-{subset:03d}.json").write_text(json.dumps(record))


def test_a_filtered_file_ranks_its_unscored_sequences_last_for_fact_tracing(tmp_path):
    """A lexical filter's scores hold 0 where a query scored nothing; the file's `scored` mask puts
    those after every scored sequence, negative ones included, as `influence score` ranks them."""
    scores = np.array([[0.0, -0.5, 0.0, 2.0]], dtype=np.float32)
    scored = np.array([[False, True, False, True]])
    save_file({"scores": scores, "scored": scored}, str(tmp_path / "filtered.safetensors"))
    _, read, _, mask = evaluate.read_scores(tmp_path / "filtered.safetensors")
    ranked = evaluate.ranked_scores(read, mask)
    assert metrics.fact_tracing_per_query(ranked, [[1]], k=2)["rr"].tolist() == [0.5]
    assert metrics.fact_tracing_per_query(read, [[1]], k=2)["rr"].tolist() == [0.25]  # without the mask


def test_evaluate_reads_files_and_tells_the_exact_attribution_from_noise(tmp_path):
    weights, masks, measured = linear_world()
    training_ids = [f"t{m}" for m in range(weights.shape[1])]
    query_ids = [f"q{q}" for q in range(weights.shape[0])]
    write_truth(tmp_path / "truth", masks, measured, training_ids, query_ids)
    expected = {query: [training_ids[int(np.argmax(weights[q]))]] for q, query in enumerate(query_ids)}
    (tmp_path / "EXPECTED.json").write_text(json.dumps(expected))
    noise = np.random.default_rng(2).normal(size=weights.shape)
    save_file({"scores": weights.astype(np.float32)}, str(tmp_path / "exact.safetensors"), metadata={"seconds": "1.5"})
    save_file({"scores": noise.astype(np.float32)}, str(tmp_path / "noise.safetensors"))
    summary = evaluate.evaluate(
        [tmp_path / "exact.safetensors", tmp_path / "noise.safetensors"],
        tmp_path / "truth",
        tmp_path / "EXPECTED.json",
        200,
    )
    exact, noisy = summary["rows"]
    assert exact["lds"].value == pytest.approx(1.0) and exact["seconds"] == 1.5
    assert exact["recall@10"].value == 1.0 and exact["mrr"].value == 1.0
    assert noisy["lds_diff"].high < 0 and noisy["mrr_diff"].high < 0
    with pytest.raises(SystemExit, match="shape"):
        save_file({"scores": weights[:, :5].astype(np.float32)}, str(tmp_path / "short.safetensors"))
        evaluate.evaluate([tmp_path / "short.safetensors"], tmp_path / "truth", None, 10)


@pytest.mark.slow  # three retrainings of a tiny demo in child processes, a fit, a score: ~1 min idle, more when busy
def test_the_pipeline_on_a_tiny_demo_builds_resumable_ground_truth_and_evaluates(tmp_path):
    ground_truth = load_lds_script("ground_truth")
    from services.engine.fit import FitConfig, fit_factors
    from services.engine.model_io import load_model_and_tokenizer
    from services.engine.records import read_queries_jsonl, read_training_jsonl
    from services.engine.score import ScoreConfig, compute_scores
    from services.toy.recipe import DemoSettings

    tiny = asdict(
        DemoSettings(
            num_entities=6,
            num_queries=3,
            num_filler_sequences=5,
            n_layer=1,
            d_model=16,
            n_head=2,
            epochs=2,
            batch_size=8,
        )
    )
    out = tmp_path / "truth"
    out.mkdir()
    ground_truth.build(out, subsets=3, workers=1, seed=0, settings=tiny, fraction=0.5)
    files = sorted(out.glob("subset-*.json"))
    assert len(files) == 3
    written = [path.stat().st_mtime_ns for path in files]
    ground_truth.build(out, subsets=3, workers=1, seed=0, settings=tiny, fraction=0.5)  # resumed: nothing to train
    assert [path.stat().st_mtime_ns for path in files] == written
    truth = metrics.load_ground_truth(out)
    n_train = len(truth.training_ids)
    assert truth.masks.shape == (3, n_train) and (truth.masks.sum(1) == round(n_train / 2)).all()
    assert np.isfinite(truth.measured).all() and (truth.measured < 0).all()
    assert truth.masks[0].tolist() != truth.masks[1].tolist()

    demo = out / "demo"
    model, tokenizer = load_model_and_tokenizer(demo / "model")
    examples, queries = read_training_jsonl(demo / "TRAIN.jsonl"), read_queries_jsonl(demo / "QUERIES.jsonl")
    factors = fit_factors(model, tokenizer, examples, FitConfig(batch_size=8))
    result = compute_scores(model, tokenizer, factors, examples, queries, ScoreConfig(batch_size=8))
    save_file({"scores": result.scores.numpy()}, str(tmp_path / "ekfac.safetensors"))
    summary = evaluate.evaluate([tmp_path / "ekfac.safetensors"], out, demo / "EXPECTED.json", 50)
    row = summary["rows"][0]
    assert summary["subsets"] == 3 and -1 <= row["lds"].low <= row["lds"].value <= row["lds"].high <= 1
    assert 0 <= row["recall@10"].value <= 1 and 0 < row["mrr"].value <= 1


def test_evaluate_without_retrained_subsets_measures_fact_tracing_only(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "demo").mkdir(parents=True)
    (corpus / "demo" / "TRAIN.jsonl").write_text(
        "".join(json.dumps({"id": f"t{m}", "text": "x"}) + "\n" for m in range(4))
    )
    (corpus / "demo" / "QUERIES.jsonl").write_text(json.dumps({"id": "q0", "prompt": "a", "completion": "b"}) + "\n")
    (corpus / "demo" / "EXPECTED.json").write_text(json.dumps({"q0": ["t2"]}))
    save_file({"scores": np.array([[0.1, 0.3, 0.2, 0.0]], dtype=np.float32)}, str(tmp_path / "s.safetensors"))
    summary = evaluate.evaluate([tmp_path / "s.safetensors"], corpus, corpus / "demo" / "EXPECTED.json", 20)
    assert summary["subsets"] == 0 and "lds" not in summary["rows"][0]
    assert summary["rows"][0]["mrr"].value == 0.5


def test_a_ground_truth_manifest_written_before_the_recipe_fields_still_describes_its_corpus():
    """The cached demo ground truth's manifest predates DemoSettings.architecture/d_ff: it still
    resumes (the fields take their defaults), and the toy Llama's settings are another corpus."""
    ground_truth = load_lds_script("ground_truth")
    from services.toy.recipe import RECIPES

    wanted = {"model": "demo", "seed": 0, "settings": asdict(RECIPES["demo"]), "fraction": 0.5, "training_ids": ["t0"]}
    old = {**wanted, "settings": {k: v for k, v in wanted["settings"].items() if k not in ("architecture", "d_ff")}}
    assert ground_truth.same_corpus(old, wanted)
    assert not ground_truth.same_corpus(old, {**wanted, "settings": asdict(RECIPES["toy-llama"])})
    assert not ground_truth.same_corpus({**old, "seed": 1}, wanted)
    assert not ground_truth.same_corpus({**old, "settings": {"unknown": 1}}, wanted)
