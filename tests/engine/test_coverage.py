"""Coverage stated: what a fit tracks (modules, share of the model's parameters and of its MLP
parameters), recorded in the factor set's provenance, and a dense model's default fit tracking
all of its MLP. (Mixture-of-experts coverage and refusals: test_moe.py.)"""

from __future__ import annotations

import json

import pytest

from services.engine.fit import FitConfig, FitModel, FittedModel, fit_factors
from services.engine.modules import coverage, select_modules
from tests.support.reference import IntTokenizer
from tests.support.tiny import random_examples, tiny_model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_dense_default_fit_tracks_all_of_its_mlp_and_says_so(arch):
    model = tiny_model(arch)
    factors = fit_factors(model, IntTokenizer(), random_examples(4, seed=1), FitConfig(batch_size=4))
    recorded = factors.metadata["coverage"]
    parameters = sum(p.numel() for p in model.parameters())
    assert recorded["mlp_share"] == 1.0 and recorded["mlp_left_out"] == [] and not recorded["explicit"]
    assert recorded["modules"] == len(factors.modules) and recorded["experts"] == 0
    assert recorded["model_parameters"] == parameters
    assert recorded["tracked_parameters"] == sum(m.d_out * m.d_in_full for m in factors.modules.values())
    assert recorded["summary"].startswith(f"tracks {len(factors.modules)} modules: ")
    assert "100.0% of its MLP parameters" in recorded["summary"]


def test_a_regex_subset_is_stated_as_one():
    model = tiny_model("llama")
    chosen = select_modules(model, r"layers\.0\.mlp\.down_proj")
    stated = coverage(model, chosen, r"layers\.0\.mlp\.down_proj")
    assert stated.explicit and stated.modules == 1 and 0 < stated.mlp_share < 1
    assert "model.layers.*.mlp.gate_proj.weight" in stated.mlp_left_out
    assert "leaves out" in stated.summary()


def test_the_fitted_model_carries_coverage_to_the_model_free_steps_and_reads_older_records():
    fit = FitModel(tiny_model("gpt2"), IntTokenizer(), FitConfig(modules="all"))
    fitted = FittedModel.from_json(fit.fitted.to_json())
    assert fitted.coverage == fit.coverage.to_dict() and fitted.coverage["selection"] == "all"
    older = json.loads(fit.fitted.to_json())
    del older["coverage"]  # a job stored before coverage was recorded
    assert FittedModel.from_json(json.dumps(older).encode()).coverage == {}
