"""Which modules of a causal LM are tracked, and how their weights are laid out.

A tracked module is an `nn.Linear` (or subclass) or a transformers GPT-2 `Conv1D`. Either way
we view its weight as W ∈ R^{d_out × d_in} acting as out = W a (+ b); Conv1D stores Wᵀ, which
only matters when someone reads `module.weight` directly. With a bias the input gets a
homogeneous coordinate: a = [x, 1] ∈ R^{d_in + 1}, and the bias is the last column of W.

Selection keywords:
- `mlp`: the feed-forward linear layers of every transformer block (the paper's default),
- `attention`: the attention projections of every block,
- `all`: both,
- `adapter`: the LoRA matrices (lora_A, lora_B) of a PEFT adapter model, and the default there:
  an adapter model asked for the default (`mlp`) tracks its adapter (what fine-tuning changed),
- anything else: a regular expression searched in the module's full name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError

_BLOCK = re.compile(r"\.(\d+)\.")
_MLP_WORDS = re.compile(r"(^|\.)(mlp|feed_forward|ffn|ff|fc1|fc2|dense_h_to_4h|dense_4h_to_h)(\.|$)")
_ATTENTION_WORDS = re.compile(r"(^|\.)(attn|attention|self_attn|self_attention|cross_attn)(\.|$)")
_LORA = re.compile(r"\.lora_[AB]\.[^.]+$")  # peft's LoRA matrices: ….q_proj.lora_A.default
KEYWORDS = ("mlp", "attention", "all", "adapter")


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


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_trackable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def describe(name: str, module: nn.Module) -> TrackedModule:
    if is_conv1d(module):
        d_in, d_out = module.weight.shape
        return TrackedModule(name, int(d_in), int(d_out), module.bias is not None, True)
    d_out, d_in = module.weight.shape
    return TrackedModule(name, int(d_in), int(d_out), module.bias is not None, False)


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
    candidates = [(name, module) for name, module in model.named_modules() if is_trackable(module)]
    if selection == "mlp" and is_adapter_model(model):
        selection = "adapter"  # the default of an adapter model
    if selection == "adapter":
        chosen = [(n, m) for n, m in candidates if _LORA.search(n)]
    elif selection in ("mlp", "attention"):
        chosen = [(n, m) for n, m in candidates if _kind(n) == selection]
    elif selection == "all":
        chosen = [(n, m) for n, m in candidates if _kind(n) is not None]
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
        module.weight.requires_grad_(True)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
