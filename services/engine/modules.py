"""Which modules of a causal LM are tracked, how their weights are laid out, and what share of
the model a selection covers.

A tracked module is a linear map W ∈ R^{d_out × d_in} acting as out = W a (+ b), one of:
- an `nn.Linear` (or subclass), or a transformers GPT-2 `Conv1D` (which stores Wᵀ);
- a mixture-of-experts router (`*TopKRouter`: a [E, d] weight whose forward returns the logits
  F.linear(x, W) first), tracked like a linear whose output is the router logits;
- one expert's projection inside a fused experts module (transformers 5 stores every sparse-MoE
  family's experts as 3-D parameters, `gate_up_proj` [E, 2·ff, d] and `down_proj` [E, d, ff], or
  transposed): `ExpertLinear`, named `{experts}.{e}.{projection}` (e.g.
  `model.layers.0.mlp.experts.3.down_proj`). Selecting modules replaces each experts module's
  forward by a per-expert loop (`route_per_expert`) that calls these views on the tokens routed
  to each expert; the math is the model's own, the views make each expert's input and output
  visible to the capture hooks. An expert's output is taken before the router weight scales it,
  so the gradient with respect to it already carries the gate; tokens not routed to an expert
  are not among its inputs.
With a bias the input gets a homogeneous coordinate: a = [x, 1] ∈ R^{d_in + 1}, and the bias is
the last column of W.

Selection keywords:
- `mlp`: the feed-forward linear maps of every transformer block (the paper's default): dense
  MLPs, routers, every expert of every fused experts module, shared experts,
- `attention`: the attention projections of every block,
- `all`: both,
- `adapter`: the LoRA matrices (lora_A, lora_B) of a PEFT adapter model, and the default there:
  an adapter model asked for the default (`mlp`) tracks its adapter (what fine-tuning changed),
- anything else: a regular expression searched in the module's full name (a subset on purpose).
A keyword selection that would leave out a weight matrix of the kind it names (one this code
cannot track, e.g. an experts module of an unknown layout) is refused, naming what is left out:
never a silent subset (`Coverage`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional

from ..errors import InputError

_BLOCK = re.compile(r"\.(\d+)\.")
_ROUTER_CLASS = re.compile(r"Top[Kk]Router$")
_KEYWORDS = {"mlp": ("mlp",), "attention": ("attention",), "all": ("mlp", "attention")}
_MLP_WORDS = re.compile(r"(^|\.)(mlp|feed_forward|ffn|ff|fc1|fc2|dense_h_to_4h|dense_4h_to_h)(\.|$)")
_ATTENTION_WORDS = re.compile(r"(^|\.)(attn|attention|self_attn|self_attention|cross_attn)(\.|$)")
_LORA = re.compile(r"\.lora_[AB]\.[^.]+$")  # peft's LoRA matrices: ….q_proj.lora_A.default
KEYWORDS = (*_KEYWORDS, "adapter")  # every selection word; the rest are regular expressions


@dataclass(frozen=True)
class TrackedModule:
    """A tracked linear map out = W a, W ∈ R^{d_out × d_in}; `d_in` excludes the bias coordinate."""

    name: str
    d_in: int
    d_out: int
    has_bias: bool
    transposed: bool  # True for GPT-2 Conv1D (weight stored as [d_in, d_out])

    @property
    def d_in_full(self) -> int:
        """Input width including the homogeneous coordinate for the bias."""
        return self.d_in + int(self.has_bias)


class ExpertLinear(nn.Module):
    """Expert `index`'s projection of a fused experts module as a module a hook sees:
    out = x W_eᵀ (+ b_e) with W_e = fused[index] [d_out, d_in] (stored [d_in, d_out] when the
    family's experts are transposed, as gpt-oss's). Not a child of the model: `route_per_expert`
    calls it with the routed tokens' inputs x [T_e, d_in], their rows among the block's
    `n_tokens` token rows (`token_index` [T_e]), and the capture scatters them back to those rows.

    `parameter_name` / `bias_name`: the fused parameters' full names in the model."""

    def __init__(self, fused: nn.Parameter, bias: nn.Parameter | None, index: int, transposed: bool, names):
        super().__init__()
        self.fused = fused
        self.fused_bias = bias
        self.index, self.transposed = index, transposed
        self.parameter_name, self.bias_name = names

    @property
    def weight(self) -> torch.Tensor:
        return self.fused[self.index]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.fused_bias is None else self.fused_bias[self.index]

    def forward(self, x: torch.Tensor, token_index: torch.Tensor, n_tokens: int) -> torch.Tensor:
        out = x @ self.weight if self.transposed else functional.linear(x, self.weight)
        return out if self.fused_bias is None else out + self.bias


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_router(module: nn.Module) -> bool:
    """A transformers MoE router whose forward returns (F.linear(x, weight[, bias]), scores, indices)."""
    weight = getattr(module, "weight", None)
    return bool(_ROUTER_CLASS.search(type(module).__name__)) and isinstance(weight, nn.Parameter) and weight.dim() == 2


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module (`use_experts_implementation`): 3-D expert parameters and
    the layout flags its per-expert forward needs."""
    down = getattr(module, "down_proj", None)
    return (
        isinstance(down, nn.Parameter)
        and down.dim() == 3
        and all(hasattr(module, flag) for flag in ("has_gate", "has_bias", "is_transposed", "num_experts"))
    )


def is_trackable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, ExpertLinear)) or is_conv1d(module) or is_router(module)


def describe(name: str, module: nn.Module) -> TrackedModule:
    has_bias = getattr(module, "bias", None) is not None
    if is_conv1d(module) or (isinstance(module, ExpertLinear) and module.transposed):
        d_in, d_out = module.weight.shape
        return TrackedModule(name, int(d_in), int(d_out), has_bias, True)
    d_out, d_in = module.weight.shape
    return TrackedModule(name, int(d_in), int(d_out), has_bias, False)


def weight_parameter_name(name: str, parameter_names) -> str:
    """The model parameter holding tracked module `name`'s weight: `{name}.weight`, or for an
    expert's projection `{experts}.{e}.{projection}` the fused `{experts}.{projection}`."""
    if f"{name}.weight" in parameter_names:
        return f"{name}.weight"
    prefix, _, projection = name.rpartition(".")
    return f"{prefix.rpartition('.')[0]}.{projection}"


def trained_parameter(module: nn.Module) -> nn.Parameter:
    """The leaf parameter holding a tracked module's weight (an expert's: the fused parameter)."""
    return module.fused if isinstance(module, ExpertLinear) else module.weight


def route_per_expert(experts: nn.Module, prefix: str) -> list[tuple[str, ExpertLinear]]:
    """Make `experts` (a fused experts module named `prefix`) run expert by expert through
    `ExpertLinear` views, and return the views (named `{prefix}.{e}.{projection}`, expert by
    expert, in the order each expert applies them). Idempotent: the views are kept on the module.

    The forward is the model's own eager computation (transformers' reference loop): for each
    expert e hit by the routing, its tokens' rows x, h = gate(first_e(x)) (or act(up_e(x))),
    y = down_e(h) (then the family's post-expert norm), y scaled by the tokens' router weights
    and added to their rows. Cost: the experts' FLOPs are those of the fused forward (each token
    meets its top-k experts only), in E small matmul pairs per layer instead of one grouped one."""
    views = getattr(experts, "_influence_views", None)
    if views is not None:
        return views
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    views, pairs = [], []
    for index in range(experts.num_experts):
        pair = []
        for projection in (first, "down_proj"):
            bias = getattr(experts, f"{projection}_bias", None) if experts.has_bias else None
            names = (f"{prefix}.{projection}", f"{prefix}.{projection}_bias" if bias is not None else None)
            view = ExpertLinear(getattr(experts, projection), bias, index, experts.is_transposed, names)
            views.append((f"{prefix}.{index}.{projection}", view))
            pair.append(view)
        pairs.append(pair)
    experts.forward = _per_expert_forward(experts, pairs)
    experts._influence_views = views
    return views


def _per_expert_forward(experts: nn.Module, pairs: list[list[ExpertLinear]]) -> Callable:
    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, d], top_k_index [T, k], top_k_weights [T, k] -> [T, d]."""
        final = torch.zeros_like(hidden_states)
        n_tokens = hidden_states.shape[0]
        for expert in top_k_index.unique().tolist():
            if not 0 <= expert < len(pairs):  # expert-parallel sentinels: not this rank's
                continue
            token_index, slot = torch.where(top_k_index == expert)
            first, down = pairs[expert]
            hidden = first(hidden_states[token_index], token_index, n_tokens)
            hidden = experts._apply_gate(hidden) if experts.has_gate else experts.act_fn(hidden)
            out = down(hidden, token_index, n_tokens)
            if getattr(experts, "has_post_expert_norm", False):
                out = experts.post_expert_norm(out)
            out = out * top_k_weights[token_index, slot, None]
            final.index_add_(0, token_index, out.to(final.dtype))
        return final

    return forward


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module that can be tracked, in model order, experts expanded per expert (their
    experts modules routed per expert from now on: `route_per_expert`)."""
    candidates = []
    for name, module in model.named_modules():
        if is_fused_experts(module):
            candidates.extend(route_per_expert(module, name))
        elif is_trackable(module):
            candidates.append((name, module))
    return candidates


def module_names(model: nn.Module) -> set[str]:
    """The names a factor set's modules may have in `model`: its modules' and each expert's
    projection (`{experts}.{e}.{projection}`, candidate_modules)."""
    return {name for name, _ in model.named_modules()} | {name for name, _ in candidate_modules(model)}


def _kind(name: str) -> str | None:
    """'mlp', 'attention' or None for a linear module inside a numbered transformer block."""
    if not _BLOCK.search(f".{name}."):
        return None
    if _MLP_WORDS.search(name):
        return "mlp"
    if _ATTENTION_WORDS.search(name):
        return "attention"
    return None


def check_selection(selection: str) -> None:
    """Raise InputError for an invalid --modules regular expression (keywords are always valid)."""
    if selection in KEYWORDS:
        return
    try:
        re.compile(selection)
    except re.error as error:
        raise InputError(f"invalid --modules regular expression '{selection}': {error}") from None


def select_modules(model: nn.Module, selection: str = "mlp") -> dict[str, nn.Module]:
    """Tracked modules in model order, keyed by full name.

    Raises InputError when the selection matches nothing or the regex is invalid.
    """
    candidates = candidate_modules(model)
    selection = resolved_selection(model, selection)
    if selection == "adapter":
        chosen = [(n, m) for n, m in candidates if _LORA.search(n)]
    elif selection in _KEYWORDS:
        chosen = [(n, m) for n, m in candidates if _kind(n) in _KEYWORDS[selection]]
    else:
        check_selection(selection)
        pattern = re.compile(selection)
        chosen = [(n, m) for n, m in candidates if pattern.search(n)]
    if not chosen:
        names = ", ".join(n for n, _ in candidates[:6]) or "none"
        raise InputError(
            f"--modules '{selection}' matches no linear module of this model (linear modules: {names}"
            f"{', ...' if len(candidates) > 6 else ''})"
        )
    return dict(chosen)


def is_adapter_model(model: nn.Module) -> bool:
    """A base model with a PEFT adapter applied (engine/model_io.py loads adapter directories so)."""
    return bool(getattr(model, "peft_config", None))


def resolved_selection(model: nn.Module, selection: str) -> str:
    """`selection` as applied to `model`: the default (`mlp`) of an adapter model is `adapter`."""
    return "adapter" if selection == "mlp" and is_adapter_model(model) else selection


def weight_gradient_layout(tracked: TrackedModule, gradient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a [.., d_out, d_in_full] gradient into weight-shaped and bias parts as PyTorch stores them.

    Returns (weight_grad, bias_grad): weight_grad is [.., d_out, d_in] for Linear and
    [.., d_in, d_out] for Conv1D; bias_grad is [.., d_out] or None.
    """
    weight = gradient[..., : tracked.d_in]
    bias = gradient[..., tracked.d_in] if tracked.has_bias else None
    if tracked.transposed:
        weight = weight.transpose(-1, -2)
    return weight, bias


def freeze_except(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Only tracked weights require grad, so autograd builds the graph through them and no
    other parameter gradient is ever computed."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in modules.values():
        trained_parameter(module).requires_grad_(True)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass(frozen=True)
class Coverage:
    """What a selection tracks: its modules (experts counted one by one), their parameters (weights
    and biases) against the model's and against its MLP parameters (every parameter inside a
    block's feed-forward part: dense MLPs, routers, experts, shared experts, their norms), and the
    weight matrices of an MLP left out (by an explicit regex only: a keyword refuses them)."""

    selection: str
    explicit: bool  # a regular expression chose the modules (a subset on purpose)
    modules: int
    experts: int  # of `modules`, projections of single experts
    tracked_parameters: int
    model_parameters: int
    tracked_mlp_parameters: int
    mlp_parameters: int
    mlp_left_out: tuple[str, ...]  # MLP weight matrices not tracked, layer numbers as '*'

    @property
    def model_share(self) -> float:
        return self.tracked_parameters / self.model_parameters if self.model_parameters else 0.0

    @property
    def mlp_share(self) -> float:
        return self.tracked_mlp_parameters / self.mlp_parameters if self.mlp_parameters else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "mlp_left_out": list(self.mlp_left_out),
            "model_share": round(self.model_share, 6),
            "mlp_share": round(self.mlp_share, 6),
            "summary": self.summary(),
        }

    def summary(self) -> str:
        """One line: 'tracks 42 modules (24 expert projections): 61.2% of the model's parameters,
        100.0% of its MLP parameters'."""
        experts = f" ({self.experts} expert projections)" if self.experts else ""
        line = (
            f"tracks {self.modules} modules{experts}: {100 * self.model_share:.1f}% of the model's parameters, "
            f"{100 * self.mlp_share:.1f}% of its MLP parameters"
        )
        if self.mlp_left_out:
            line += f" (--modules '{self.selection}' leaves out {', '.join(self.mlp_left_out[:4])}"
            line += ", ...)" if len(self.mlp_left_out) > 4 else ")"
        return line


def _tracked_elements(modules: dict[str, nn.Module]) -> dict[str, int]:
    """Elements of each model parameter (by full name) that the tracked modules cover."""
    covered: dict[str, int] = {}
    for name, module in modules.items():
        if isinstance(module, ExpertLinear):
            names = module.parameter_name, module.bias_name
        else:
            names = f"{name}.weight", (f"{name}.bias" if getattr(module, "bias", None) is not None else None)
        for parameter_name, tensor in zip(names, (module.weight, getattr(module, "bias", None)), strict=True):
            if parameter_name is not None:
                covered[parameter_name] = covered.get(parameter_name, 0) + tensor.numel()
    return covered


def _layer_pattern(name: str) -> str:
    return _BLOCK.sub(".*.", name, count=1)


def coverage(model: nn.Module, modules: dict[str, nn.Module], selection: str) -> Coverage:
    """The `Coverage` of `modules` (chosen by `selection`) in `model`.

    Raises InputError when a keyword selection leaves out a weight matrix (≥ 2 dimensions) of a
    kind it names, naming the matrices and the module that holds them: a default fit never
    tracks a silent subset. Vectors (norms, attention sinks) are counted, never refused."""
    selection = resolved_selection(model, selection)
    covered = _tracked_elements(modules)
    parameters = dict(model.named_parameters())
    mlp = {n: p for n, p in parameters.items() if _kind(n.rsplit(".", 1)[0]) == "mlp"}
    kinds = _KEYWORDS.get(selection, ())
    refused = [
        n
        for n, p in parameters.items()
        if p.dim() >= 2 and _kind(n.rsplit(".", 1)[0]) in kinds and covered.get(n, 0) < p.numel()
    ]
    if refused:
        owner = refused[0].rsplit(".", 1)[0]
        patterns = list(dict.fromkeys(_layer_pattern(n) for n in refused))
        share = sum(parameters[n].numel() - covered.get(n, 0) for n in refused)
        raise InputError(
            f"--modules {selection} would leave out {', '.join(patterns[:4])}{', ...' if len(patterns) > 4 else ''} "
            f"({share:,} parameters): {type(model.get_submodule(owner)).__name__} is neither a linear layer, "
            "a router nor a fused experts module this version can track per expert; choose a subset on purpose "
            "with a --modules regular expression"
        )
    left_out = [n for n, p in mlp.items() if p.dim() >= 2 and covered.get(n, 0) < p.numel()]
    experts = sum(isinstance(m, ExpertLinear) for m in modules.values())
    return Coverage(
        selection=selection,
        explicit=selection not in KEYWORDS,
        modules=len(modules),
        experts=experts,
        tracked_parameters=sum(covered.values()),
        model_parameters=sum(p.numel() for p in parameters.values()),
        tracked_mlp_parameters=sum(min(covered.get(n, 0), p.numel()) for n, p in mlp.items()),
        mlp_parameters=sum(p.numel() for p in mlp.values()),
        mlp_left_out=tuple(dict.fromkeys(_layer_pattern(n) for n in left_out)),
    )
