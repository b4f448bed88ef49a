"""Reference computations for the engine's tests: plain, slow, obviously-correct versions.

- `loop_gradients`: each sequence alone, `loss.backward()` with real parameter gradients.
- `exact_fisher`: E_m[g_m g_mᵀ] from those per-sequence gradients, per module.
- `exact_ggn`: Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t per sequence, averaged, from full Jacobians.
- `BigramLM`: logits_t = W·emb(x_t) (+ b). With W = 0 predictions are uniform, and on a dataset
  of every (x, y) pair the empirical Fisher equals the GGN and factorises exactly as A ⊗ S,
  so K-FAC and EK-FAC must reproduce the exact damped inverse.
Gradients are laid out as the engine's: [d_out, d_in(+1 for bias)], flattened row-major.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from services.engine.capture import sample_labels
from services.engine.data import Batch, collate
from services.engine.modules import describe


class IntTokenizer:
    """Text of space-separated integers <-> those ids; no special tokens."""

    pad_token_id = 0
    bos_token_id = None
    eos_token_id = None

    def __call__(self, text, add_special_tokens=True):  # a text or a list of them, as HF tokenizers take
        if isinstance(text, list):
            return {"input_ids": [[int(word) for word in item.split()] for item in text]}
        return {"input_ids": [int(word) for word in text.split()]}

    def convert_ids_to_tokens(self, ids):
        return [str(i) for i in ids]


def ids_text(ids) -> str:
    return " ".join(str(int(i)) for i in ids)


class BigramLM(nn.Module):
    """logits[t] = head(emb(x_t)); the embedding is fixed, the head is the tracked module."""

    def __init__(self, vocab: int, width: int, bias: bool = True, seed: int = 0, zero_head: bool = True):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, width)
        self.embed.weight.data = torch.randn(vocab, width, generator=generator, dtype=torch.float64)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].mlp = nn.Linear(width, vocab, bias=bias, dtype=torch.float64)
        if zero_head:
            nn.init.zeros_(self.layers[0].mlp.weight)
            if bias:
                nn.init.zeros_(self.layers[0].mlp.bias)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.layers[0].mlp(self.embed(input_ids)))


class SharedLayerLM(nn.Module):
    """Applies the same Linear twice (weight sharing): h -> tanh(L(h)) -> L(h') -> head."""

    def __init__(self, vocab: int, width: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, width, dtype=torch.float64)
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].mlp = nn.Linear(width, width, dtype=torch.float64)
        self.head = nn.Linear(width, vocab, bias=False, dtype=torch.float64)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        hidden = self.embed(input_ids)
        hidden = torch.tanh(self.blocks[0].mlp(hidden))
        hidden = self.blocks[0].mlp(hidden)
        return SimpleNamespace(logits=self.head(hidden))


def flat_gradient(name: str, module: nn.Module) -> torch.Tensor:
    """The module's .grad in the engine's [d_out, d_in(+1)] layout, flattened."""
    tracked = describe(name, module)
    weight = module.weight.grad
    if tracked.transposed:
        weight = weight.T
    parts = [weight]
    if tracked.has_bias:
        parts.append(module.bias.grad.unsqueeze(-1))
    return torch.cat(parts, dim=-1).reshape(-1).clone()


def single_batch(sequence, pad_token_id: int = 0) -> Batch:
    return collate([sequence], pad_token_id)


def sequence_log_likelihood(model, batch: Batch, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over targets of log p(label); labels default to the true next tokens. labels: [1, T-1]."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    log_probs = torch.log_softmax(logits[:, :-1].to(torch.float64), dim=-1)
    labels = batch.input_ids[:, 1:] if labels is None else labels
    picked = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (picked * batch.target_mask[:, 1:]).sum()


def loop_gradients(
    model, modules: dict[str, nn.Module], sequences, *, objective="true", seed=0
) -> dict[str, torch.Tensor]:
    """Per-sequence gradients of the objective, one sequence at a time: {name: [M, d_out·d_in]}."""
    for module in modules.values():
        for parameter in module.parameters():
            parameter.requires_grad_(True)
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    for sequence in sequences:
        batch = single_batch(sequence)
        labels = None
        if objective == "sampled":
            with torch.no_grad():
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            labels = sample_labels(logits[:, :-1], batch.indices, seed)
        model.zero_grad(set_to_none=True)
        sequence_log_likelihood(model, batch, labels).backward()
        for name, module in modules.items():
            rows[name].append(flat_gradient(name, module))
    return {name: torch.stack(values).to(torch.float64) for name, values in rows.items()}


def exact_fisher(gradients: torch.Tensor) -> torch.Tensor:
    """E_m[g gᵀ]: [P, P] from per-sequence gradients [M, P]."""
    return gradients.T @ gradients / gradients.shape[0]


def exact_ggn(model, name: str, module: nn.Linear, sequences) -> torch.Tensor:
    """Per-sequence GGN of the summed target NLL w.r.t. one Linear's (W, b), averaged: [P, P]."""
    has_bias = module.bias is not None
    weight0 = module.weight.detach().clone()
    bias0 = module.bias.detach().clone() if has_bias else None
    d_out, d_in = weight0.shape
    total = None
    for sequence in sequences:
        batch = single_batch(sequence)

        def logits_of(flat, batch=batch):
            weight = flat[: d_out * d_in].reshape(d_out, d_in)
            bias = flat[d_out * d_in :] if has_bias else None
            original = module.forward
            module.forward = lambda x: torch.nn.functional.linear(x, weight, bias)
            try:
                out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[0, :-1]
            finally:
                module.forward = original
            return out.to(torch.float64)

        flat0 = torch.cat([weight0.reshape(-1)] + ([bias0] if has_bias else []))
        jacobian = torch.autograd.functional.jacobian(logits_of, flat0)  # [T-1, V, P(torch layout)]
        jacobian = _to_engine_layout(jacobian, d_out, d_in, has_bias)
        probabilities = torch.softmax(logits_of(flat0).detach(), dim=-1)
        ggn = 0
        for t in range(jacobian.shape[0]):
            if not bool(sequence.target_mask[t + 1]):
                continue
            p = probabilities[t]
            hessian = torch.diag(p) - torch.outer(p, p)
            ggn = ggn + jacobian[t].T @ hessian @ jacobian[t]
        total = ggn if total is None else total + ggn
    return total / len(sequences)


def _to_engine_layout(jacobian: torch.Tensor, d_out: int, d_in: int, has_bias: bool) -> torch.Tensor:
    """Reorder torch's (W flattened, then b) parameter axis to the engine's [d_out, d_in+1] rows."""
    leading = jacobian.shape[:-1]
    weight = jacobian[..., : d_out * d_in].reshape(*leading, d_out, d_in)
    if has_bias:
        bias = jacobian[..., d_out * d_in :].reshape(*leading, d_out, 1)
        weight = torch.cat([weight, bias], dim=-1)
    return weight.reshape(*leading, -1)


def kronecker_basis(factors) -> torch.Tensor:
    """K with vec(Q_Sᵀ G Q_A) = Kᵀ vec(G) for row-major vec: K = Q_S ⊗ Q_A."""
    return torch.kron(
        factors.gradient_eigenvectors.to(torch.float64), factors.activation_eigenvectors.to(torch.float64)
    )


def dense_curvature(factors, strategy: str) -> torch.Tensor:
    """The approximate curvature matrix the factors stand for: [P, P]."""
    eigenvalues = factors.diagonal().reshape(-1)
    if strategy == "diagonal":
        return torch.diag(eigenvalues)
    basis = kronecker_basis(factors)
    return basis @ torch.diag(eigenvalues) @ basis.T


# -- the bigram model as a Hugging Face checkpoint, so the exact case also runs through the service
# system (which loads models from directories with AutoModelForCausalLM) ------------------------


def register_bigram_architecture():
    """Register `BigramForCausalLM` with the Auto classes (in this process) and return it."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    class BigramConfig(PretrainedConfig):
        model_type = "influence_test_bigram"

        def __init__(self, vocab_size: int = 5, width: int = 3, bias: bool = True, **kwargs):
            self.width, self.bias = width, bias
            super().__init__(vocab_size=vocab_size, **kwargs)

    class BigramForCausalLM(PreTrainedModel):
        config_class = BigramConfig
        base_model_prefix = "bigram"

        def __init__(self, config: BigramConfig):
            super().__init__(config)
            reference = BigramLM(config.vocab_size, config.width, bias=config.bias)
            self.embed = reference.embed
            self.layers = reference.layers
            self.post_init()

        def _init_weights(self, module):  # the weights come from BigramLM or the checkpoint
            pass

        def forward(self, input_ids=None, attention_mask=None, use_cache=False, **kwargs):
            return CausalLMOutput(logits=self.layers[0].mlp(self.embed(input_ids)))

    try:
        AutoConfig.register(BigramConfig.model_type, BigramConfig)
        AutoModelForCausalLM.register(BigramConfig, BigramForCausalLM)
    except ValueError:  # registered before in this process
        pass
    return AutoModelForCausalLM


def save_bigram_checkpoint(out_dir, vocab: int = 5, width: int = 3, bias: bool = True):
    """A float64 BigramLM (zero head: uniform predictions) and a word-level tokenizer whose ids are
    the words "0".."vocab-1" themselves (no special tokens), saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    auto = register_bigram_architecture()
    config = AutoConfig.for_model("influence_test_bigram", vocab_size=vocab, width=width, bias=bias)
    model = auto.from_config(config, dtype=torch.float64)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    core = Tokenizer(models.WordLevel(vocab={str(i): i for i in range(vocab)}, unk_token="0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="0").save_pretrained(str(out_dir))
    return out_dir
