"""One forward and backward pass that records, per tracked module, its inputs and the gradient
of an objective with respect to its outputs.

Layout of a `ModuleCapture` (B sequences, N token positions, N = T × calls):
    a:          [B, N, d_in_full]  inputs with a homogeneous 1 appended when the module has a bias;
                                    zero at padding positions
    s:          [B, N, d_out]      ∂objective/∂output; zero at padding positions
    token_mask: [B, N] bool        True at real (non-padding) positions
    calls:      how many times the module ran in the forward pass (a shared module contributes
                every call; its per-sequence gradient is Σ over all N positions)

A mixture-of-experts expert (`modules.ExpertLinear`) sees only the tokens routed to it: its
rows are scattered back to their token positions, the other positions hold a = s = 0 and are
not in its token_mask (so its covariance averages over its routed tokens only); an expert no
token of the batch was routed to captures zeros. A router's output is its logits (the first of
the (logits, scores, indices) it returns).

The per-sequence gradient of the objective w.r.t. the module's W ∈ R^{d_out × d_in_full} is
    DW_b = Σ_n s[b, n] a[b, n]ᵀ = s[b]ᵀ a[b].
Only activation gradients are computed: `torch.autograd.grad` is asked for the module outputs,
so autograd never computes a weight gradient nor goes below the first tracked module.

Objectives (all are sums of token log-likelihoods over `target_mask`; larger = more likely;
their gradient w.r.t. the logits is formed directly, see `log_likelihood_gradient`):
    "true":    labels are the sequence's own next tokens (training gradients, queries, empirical Fisher)
    "sampled": labels drawn from the model's own predictive distribution (the sampled Fisher, whose
               expectation is the Gauss-Newton matrix for softmax cross-entropy). Each sequence
               draws from its own CPU generator seeded by (seed, sequence index), so the draw does
               not depend on batching, partitioning or the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .data import Batch
from .device import host_to_device
from .modules import ExpertLinear, TrackedModule, describe


@dataclass
class ModuleCapture:
    a: torch.Tensor
    s: torch.Tensor
    token_mask: torch.Tensor
    calls: int

    def per_sequence_gradients(self) -> torch.Tensor:
        """DW: [B, d_out, d_in_full] = sᵀ a per sequence."""
        return torch.bmm(self.s.transpose(1, 2), self.a)


def accumulation_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """Contractions run in float32, or float64 when the model itself is float64."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def sequence_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator for sequence `index`'s sampled labels: independent of batch composition
    and of the device the model runs on (a GPU fit draws the labels the CPU reference draws)."""
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + index * 7919 + 17) % (2**63 - 1))
    return generator


def sequence_uniforms(indices: torch.Tensor, positions: int, seed: int) -> torch.Tensor:
    """The uniforms of each sequence's label draws, on the host: [B, positions] float32 in [0, 1),
    row b from sequence indices[b]'s own generator (`sequence_generator`). indices: [B] (CPU)."""
    return torch.stack([torch.rand(positions, generator=sequence_generator(seed, index)) for index in indices.tolist()])


def sample_labels(logits: torch.Tensor, indices: torch.Tensor, seed: int) -> torch.Tensor:
    """Labels drawn from softmax(logits) per position: logits [B, T-1, V], indices [B] -> [B, T-1]."""
    return sample_from(torch.softmax(logits.detach().to(accumulation_dtype(logits.dtype)), dim=-1), indices, seed)


def sample_from(probabilities: torch.Tensor, indices: torch.Tensor, seed: int) -> torch.Tensor:
    """Labels drawn from `probabilities` [B, T-1, V] per position, by inverse-CDF sampling.

    Each sequence's uniforms come from its own CPU generator (see `sequence_uniforms`), moved to
    the probabilities' device: a label depends neither on which batch the sequence is in nor on
    the device. indices: [B] (CPU). Returns [B, T-1] int64.
    """
    _, positions, _ = probabilities.shape
    uniforms = host_to_device(sequence_uniforms(indices, positions, seed), probabilities.device)
    return inverse_cdf(probabilities, uniforms)


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor, block: int = 64) -> torch.Tensor:
    """The first index i with Σ_{j≤i} w_j ≥ u·Σ_j w_j, per row: weights [..., V] ≥ 0, uniforms
    [...] in [0, 1) -> [...] int64.

    Two levels instead of a cumulative sum over V (a sequential scan, 7-17 ms per 8×128×5000
    batch on 2 cores, 1-2 s of a 1,000-sequence fit): block totals (one vectorised sum), then a cumulative
    sum over the V/block totals and over the one chosen block of each row.
    """
    vocab = weights.shape[-1]
    full = vocab // block * block
    totals = [weights[..., :full].unflatten(-1, (-1, block)).sum(-1)] if full else []
    if full < vocab:
        totals.append(weights[..., full:].sum(-1, keepdim=True))
    block_cumulative = torch.cat(totals, dim=-1).cumsum(-1)  # [..., n_blocks]
    target = (uniforms.to(weights.dtype) * block_cumulative[..., -1]).unsqueeze(-1)  # [..., 1]
    chosen = torch.searchsorted(block_cumulative, target).clamp_max(block_cumulative.shape[-1] - 1)  # [..., 1]
    before = torch.where(chosen > 0, block_cumulative.gather(-1, (chosen - 1).clamp_min(0)), 0)
    columns = chosen * block + torch.arange(block, device=weights.device)  # [..., block]
    inside = weights.gather(-1, columns.clamp_max(vocab - 1)).masked_fill(columns >= vocab, 0).cumsum(-1)
    offset = torch.searchsorted(inside, target - before).clamp_max(block - 1)
    limit = (vocab - 1 - chosen * block).clamp_max(block - 1)
    return (chosen * block + torch.minimum(offset, limit)).squeeze(-1)


def log_likelihood_gradient(logits: torch.Tensor, batch: Batch, objective: str, seed: int) -> torch.Tensor:
    """∂/∂logits of Σ over targets of log p(label): [B, T, V] in the logits' dtype.

    Position t-1 predicts token t; see the module docstring for `objective`. The derivative of
    log softmax(x)[y] is onehot(y) - softmax(x), written directly: one softmax serves both the
    label draw and the gradient, and autograd never builds the log-softmax/gather backward.
    """
    work_dtype = accumulation_dtype(logits.dtype)
    probabilities = torch.softmax(logits.detach().to(work_dtype), dim=-1)  # [B, T, V]; the last row is unused
    if objective == "true":
        labels = batch.input_ids[:, 1:]
    elif objective == "sampled":
        labels = sample_from(probabilities[:, :-1], batch.indices, seed)
    else:
        raise ValueError(f"unknown objective {objective!r}")
    mask = torch.zeros(batch.target_mask.shape, dtype=work_dtype, device=logits.device)  # [B, T]
    mask[:, :-1] = batch.target_mask[:, 1:]  # position t-1 counts when token t is a target
    gradient = probabilities.mul_(mask.neg().unsqueeze(-1))  # -softmax, in place
    gradient[:, :-1].scatter_add_(-1, labels.unsqueeze(-1), mask[:, :-1].unsqueeze(-1))
    return gradient.to(logits.dtype)


class _Recorder:
    """Forward hooks that keep each tracked module's inputs and outputs for one pass."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        # per call: the input and, for an expert, (token_index [T_e], n_tokens) of its routed rows
        self.inputs: dict[str, list[tuple[torch.Tensor, tuple | None]]] = {name: [] for name in modules}
        self.outputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self._handles = []

    def __enter__(self) -> _Recorder:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str) -> Callable:
        def record(module, args, output):
            routed = tuple(args[1:3]) if isinstance(module, ExpertLinear) else None
            self.inputs[name].append((args[0].detach(), routed))
            self.outputs[name].append(output[0] if isinstance(output, tuple) else output)

        return record

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _token_layout(x: torch.Tensor, batch_size: int, routed: tuple | None = None) -> torch.Tensor:
    """[B, ..., d] -> [B, N, d] with all middle dimensions as token positions; an expert's routed
    rows [T_e, d] (routed = (token_index [T_e], n_tokens)) scattered to their positions, zeros elsewhere."""
    if routed is None:
        return x.reshape(batch_size, -1, x.shape[-1])
    token_index, n_tokens = routed
    rows = x.new_zeros(n_tokens, x.shape[-1]).index_copy_(0, token_index, x)
    return rows.reshape(batch_size, -1, x.shape[-1])


def _unrouted(tracked: TrackedModule, batch: Batch, dtype: torch.dtype) -> ModuleCapture:
    """The capture of an expert no token of `batch` was routed to: zeros, no token counted."""
    batch_size, length = batch.input_ids.shape
    device = batch.input_ids.device
    return ModuleCapture(
        a=torch.zeros(batch_size, length, tracked.d_in_full, dtype=dtype, device=device),
        s=torch.zeros(batch_size, length, tracked.d_out, dtype=dtype, device=device),
        token_mask=torch.zeros(batch_size, length, dtype=torch.bool, device=device),
        calls=1,
    )


def capture(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batch: Batch,
    objective: str = "true",
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> dict[str, ModuleCapture]:
    """Run `model` on `batch` and return each tracked module's (a, s) capture.

    Tracked weights must require grad (see `modules.freeze_except`). `dtype` is the dtype of
    the returned tensors (default: `accumulation_dtype` of the model's dtype).
    """
    model_dtype = next(model.parameters()).dtype
    dtype = dtype or accumulation_dtype(model_dtype)
    batch_size, length = batch.input_ids.shape
    with torch.enable_grad(), _Recorder(modules) as recorder:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logits_gradient = log_likelihood_gradient(logits, batch, objective, seed)
        names = [name for name in modules if recorder.outputs[name]]
        outputs = [output for name in names for output in recorder.outputs[name]]
        gradients = torch.autograd.grad(logits, outputs, grad_outputs=logits_gradient, allow_unused=True)
    del logits, logits_gradient
    padded = batch.padded  # known on the host: reading the mask would wait for the device
    captures: dict[str, ModuleCapture] = {}
    position = 0
    for name in modules:
        module = modules[name]
        tracked = describe(name, module)
        inputs = recorder.inputs[name]
        if not inputs:
            if isinstance(module, ExpertLinear):
                captures[name] = _unrouted(tracked, batch, dtype)
            continue
        calls = len(inputs)
        call_gradients = gradients[position : position + calls]
        position += calls
        a_parts, s_parts, mask_parts = [], [], []
        for (x, routed), g in zip(inputs, call_gradients, strict=True):
            a = _token_layout(x, batch_size, routed).to(dtype)
            s = (
                torch.zeros(*a.shape[:2], tracked.d_out, dtype=dtype, device=a.device)
                if g is None
                else (_token_layout(g, batch_size, routed).to(dtype))
            )
            if a.shape[1] == length:
                token_mask = batch.attention_mask.bool()
            else:  # not token-aligned: every position counts
                token_mask = torch.ones(a.shape[:2], dtype=torch.bool, device=a.device)
            if routed is not None:
                chosen = torch.zeros(routed[1], dtype=torch.bool, device=a.device).index_fill_(0, routed[0], True)
                token_mask = token_mask & chosen.reshape(a.shape[:2])
            if tracked.has_bias:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            if padded:  # zero both at padding (s is zero there already, but only by construction);
                # a select, not a product: padding activations that overflow must not become NaN
                keep = token_mask.unsqueeze(-1)
                a, s = a.where(keep, 0.0), s.where(keep, 0.0)
            a_parts.append(a)
            s_parts.append(s)
            mask_parts.append(token_mask)
        captures[name] = ModuleCapture(
            a=torch.cat(a_parts, dim=1) if calls > 1 else a_parts[0],
            s=torch.cat(s_parts, dim=1) if calls > 1 else s_parts[0],
            token_mask=torch.cat(mask_parts, dim=1) if calls > 1 else mask_parts[0],
            calls=calls,
        )
    return captures


def describe_all(modules: dict[str, nn.Module]) -> dict[str, TrackedModule]:
    return {name: describe(name, module) for name, module in modules.items()}
