"""Mixture-of-experts natively: every expert of a fused experts module tracked as its own linear
map, checked in float64 against an independent reference, the family's own eager forward with
real parameter gradients (tests/support/families.py MOE_FAMILIES: 4 experts, top-2).

- selection: the default `mlp` covers 100% of every MoE family's MLP parameters (routers, each
  expert's projections, shared experts); a module the code cannot track is refused by name;
- the per-expert forward is the model's forward;
- per-expert gradients: the captured s_bᵀ a_b of expert e equals autograd's gradient of the
  fused parameter's slice e, for every tracked module (routers included), on a padded batch;
- unrouted tokens contribute nothing: an expert's rows are its routed tokens only;
- per-expert EK-FAC: Λ = diag(Kᵀ F K) with F the exact per-sequence Fisher of expert e's weight;
- per-expert GGN: Σ_y p_y DW_y DW_yᵀ over every label y equals Jᵀ (diag p − p pᵀ) J from the
  full Jacobian of the logits w.r.t. expert e's weight (the output gradient carries the gate).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from services.engine.capture import capture
from services.engine.data import TokenizedSequence, collate, tokenize_training
from services.engine.fit import FitConfig, fit_factors, prepare_model
from services.engine.modules import ExpertLinear, coverage, describe, select_modules
from services.errors import InputError
from tests.support.families import EXPERTS, MOE_FAMILIES, TOP_K_EXPERTS, moe_config
from tests.support.numerics import assert_close
from tests.support.reference import IntTokenizer, kronecker_basis, sequence_log_likelihood, single_batch
from tests.support.tiny import random_examples

VOCAB = 19
# Most families compute the router's softmax in float32 even in a float64 model (transformers'
# choice), so gradients below a router carry float32 round-off from that branch; gpt-oss's does not.
TOLERANCE = {"gpt_oss": 1e-9}
ROUTER_FLOAT32 = 1e-6


def tolerance(family: str) -> float:
    return TOLERANCE.get(family, ROUTER_FLOAT32)


def float64_moe(family: str, seed: int = 0):
    """(model, reference): the same float64 tiny MoE twice; the reference keeps the family's own
    eager experts forward (never routed per expert by the engine)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        moe_config(family, VOCAB), attn_implementation="eager", dtype=torch.float64
    )
    with torch.no_grad():  # decisive routing, non-trivial biases
        for name, parameter in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and parameter.dim() == 2:
                parameter.normal_(0, 1.0)
            elif parameter.dim() == 1 and "norm" not in name:
                parameter.normal_(0, 0.1)
    model.eval()
    reference = copy.deepcopy(model)
    reference.config._experts_implementation = "eager"  # grouped_mm takes no float64
    return model, reference


def reference_gradient(reference: nn.Module, name: str, module: nn.Module) -> torch.Tensor:
    """The reference model's .grad for tracked module `name`, in the engine's [d_out, d_in(+1)] layout."""
    parameters = dict(reference.named_parameters())
    tracked = describe(name, module)
    if isinstance(module, ExpertLinear):
        weight = parameters[module.parameter_name].grad[module.index]
        bias = parameters[module.bias_name].grad[module.index] if module.bias_name else None
    else:
        weight = parameters[f"{name}.weight"].grad
        bias = parameters[f"{name}.bias"].grad if tracked.has_bias else None
    if tracked.transposed:
        weight = weight.T
    return torch.cat([weight, bias.unsqueeze(-1)], dim=-1) if bias is not None else weight.clone()


def reference_gradients(reference, modules, sequences) -> dict[str, torch.Tensor]:
    """Per-sequence gradients of Σ log p(true next token), one sequence at a time: {name: [M, d_out, d_in(+1)]}."""
    for parameter in reference.parameters():
        parameter.requires_grad_(True)
    rows = {name: [] for name in modules}
    for sequence in sequences:
        reference.zero_grad(set_to_none=True)
        sequence_log_likelihood(reference, single_batch(sequence)).backward()
        for name, module in modules.items():
            rows[name].append(reference_gradient(reference, name, module))
    return {name: torch.stack(values) for name, values in rows.items()}


def slow_but(*quick: str) -> list:
    """Every MoE family as a parameter, marked slow but for `quick` (the quick run keeps one)."""
    return [family if family in quick else pytest.param(family, marks=pytest.mark.slow) for family in MOE_FAMILIES]


def sequences_of(count: int, seed: int):
    return tokenize_training(IntTokenizer(), random_examples(count, vocab=VOCAB, seed=seed, max_len=9), 64)


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_the_default_selection_tracks_every_expert_and_all_mlp_parameters(family):
    model, _ = float64_moe(family)
    modules = select_modules(model, "mlp")
    covered = coverage(model, modules, "mlp")
    moe_layers = 1 if family == "deepseek_v3" else 2  # DeepSeek-V3's first layer is dense
    assert covered.mlp_share == 1.0 and covered.mlp_left_out == () and not covered.explicit
    assert covered.experts == moe_layers * EXPERTS * 2
    assert 0 < covered.model_share < 1
    experts = [name for name, module in modules.items() if isinstance(module, ExpertLinear)]
    assert experts[:2] == [f"{experts[0].rsplit('.', 2)[0]}.0.{p}" for p in ("gate_up_proj", "down_proj")]
    # a regex may choose a subset on purpose: the coverage says what it leaves out
    subset = select_modules(model, r"experts\.0\.")
    partial = coverage(model, subset, r"experts\.0\.")
    assert partial.explicit and partial.experts == moe_layers * 2 and 0 < partial.mlp_share < 1
    assert any("experts" in name for name in partial.mlp_left_out)


def test_a_keyword_selection_refuses_mlp_matrices_it_cannot_track():
    """An MLP weight of an unknown kind (here a bare 3-D parameter) is named, never silently left out."""
    model, _ = float64_moe("mixtral")
    model.model.layers[1].mlp.register_parameter("mystery", nn.Parameter(torch.zeros(2, 3, 4, dtype=torch.float64)))
    with pytest.raises(InputError, match=r"model\.layers\.\*\.mlp\.mystery.*MixtralSparseMoeBlock"):
        coverage(model, select_modules(model, "mlp"), "mlp")
    on_purpose = select_modules(model, "experts")
    assert "model.layers.*.mlp.mystery" in coverage(model, on_purpose, "experts").mlp_left_out


@pytest.mark.parametrize("family", slow_but("mixtral"))
def test_per_expert_gradients_equal_autograd_and_unrouted_tokens_count_nothing(family):
    model, reference = float64_moe(family)
    sequences = sequences_of(4, seed=1)
    batch = collate(sequences, 0)  # padded: lengths differ
    modules, _ = prepare_model(model, "mlp")
    with torch.no_grad():
        expected_logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert_close(logits, expected_logits, 1e-12, f"{family} per-expert forward")

    captures = capture(model, modules, batch, "true")
    expected = reference_gradients(reference, modules, sequences)
    for name in modules:
        assert_close(captures[name].per_sequence_gradients(), expected[name], tolerance(family), f"{family} {name}")

    real_tokens = int(batch.attention_mask.sum())
    for layer in {name.split(".experts.")[0] for name in modules if ".experts." in name}:
        masks = [captures[f"{layer}.experts.{e}.down_proj"].token_mask for e in range(EXPERTS)]
        assert int(sum(mask.sum() for mask in masks)) == TOP_K_EXPERTS * real_tokens, layer
        for e, mask in enumerate(masks):
            expert = captures[f"{layer}.experts.{e}.down_proj"]
            assert bool((expert.a[~mask] == 0).all()) and bool((expert.s[~mask] == 0).all())


@pytest.mark.slow
# gpt-oss left out here: with the float64 test weights its routers never choose some experts on
# these sequences, which the fit refuses (their curvature is unknown); its per-expert gradients
# and GGN are checked above and below.
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_per_expert_ekfac_eigenvalues_are_the_exact_fisher_diagonal(family):
    model, reference = float64_moe(family)
    examples = random_examples(10, vocab=VOCAB, seed=2, max_len=9)
    config = FitConfig(strategy="ekfac", fisher="empirical", modules="mlp", batch_size=4)
    factors = fit_factors(model, IntTokenizer(), examples, config)
    modules, _ = prepare_model(model, "mlp")
    gradients = reference_gradients(reference, modules, tokenize_training(IntTokenizer(), examples, 64))
    for name in [n for n in modules if ".experts." in n] + [next(iter(modules))]:
        flat = gradients[name].reshape(len(examples), -1)
        fisher = flat.T @ flat / len(examples)
        basis = kronecker_basis(factors.factors[name])
        assert_close(
            factors.factors[name].diagonal().reshape(-1),
            torch.diagonal(basis.T @ fisher @ basis),
            tolerance(family),
            name,
        )


def logits_jacobian(reference, module: ExpertLinear, input_ids: torch.Tensor) -> torch.Tensor:
    """d logits[0, 0, :] / d W_e for expert `module.index`'s weight, by functional substitution in
    the reference model: [V, d_out·d_in] in the engine's layout (rows = outputs)."""
    fused = dict(reference.named_parameters())[module.parameter_name].detach()

    def logits_of(flat):
        weight = flat.reshape(fused.shape[1:])
        substituted = fused.index_put((torch.tensor([module.index]),), weight.unsqueeze(0))
        out = torch.func.functional_call(reference, {module.parameter_name: substituted}, (input_ids,))
        return out.logits[0, 0]

    jacobian = torch.autograd.functional.jacobian(logits_of, fused[module.index].reshape(-1))
    if module.transposed:
        jacobian = jacobian.reshape(-1, *fused.shape[1:]).transpose(1, 2).reshape(jacobian.shape[0], -1)
    return jacobian


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_per_expert_ggn_is_exact_and_carries_the_gate(family):
    """One prediction (sequences [x, y]): the label-weighted second moment of the captured
    per-expert gradients is the exact GGN of that expert's weight; an expert x is not routed to
    has a zero GGN and zero captures."""
    model, reference = float64_moe(family)
    modules, _ = prepare_model(model, r"layers\.1\.mlp\.experts\.\d+\.down_proj")
    x = 5
    sequences = [TokenizedSequence(y, torch.tensor([x, y]), torch.tensor([False, True])) for y in range(VOCAB)]
    captures = capture(model, modules, collate(sequences, 0), "true")
    with torch.no_grad():
        p = torch.softmax(reference(input_ids=torch.tensor([[x]])).logits[0, 0], -1)
    routed = 0
    for name, module in modules.items():
        gradients = captures[name].per_sequence_gradients().reshape(VOCAB, -1)  # [V, P]
        engine_ggn = gradients.T @ (p.unsqueeze(-1) * gradients)
        jacobian = logits_jacobian(reference, module, torch.tensor([[x]]))
        exact = jacobian.T @ (torch.diag(p) - torch.outer(p, p)) @ jacobian
        if float(exact.abs().max()) == 0:
            assert float(engine_ggn.abs().max()) == 0, name
            continue
        routed += 1
        assert_close(engine_ggn, exact, tolerance(family), f"{family} {name} GGN")
    assert routed == TOP_K_EXPERTS


def test_a_fit_no_token_reached_an_expert_of_is_refused_naming_it():
    """An expert the fit data never reached has no curvature to speak of: refused, not scored as zero."""
    model, _ = float64_moe("mixtral")
    with torch.no_grad():  # a zero router: every token goes to the same two experts (of 4, in 2 layers)
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()
    with pytest.raises(InputError, match=r"no token of the fit data reached 8 of the 18 modules \(model\.layers\.0\."):
        fit_factors(model, IntTokenizer(), random_examples(4, vocab=VOCAB, seed=2), FitConfig(batch_size=4))
