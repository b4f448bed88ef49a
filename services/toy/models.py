"""Tiny randomly initialised causal LMs of four Hugging Face architectures, built in-process.

Every model uses eager attention, has all dropout off, is in eval() mode, and agrees with the toy
tokenizer on special ids (pad 0, bos 2, eos 3). Saved directories load back with
`AutoModelForCausalLM.from_pretrained(out_dir)`.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

from .tokenizer import BOS_ID, EOS_ID, PAD_ID

ARCHITECTURES = ("gpt2", "llama", "gpt_neox", "opt")


def _special_ids(vocab_size: int) -> dict[str, int | None]:
    """pad/bos/eos ids of the toy tokenizer, or None where the vocabulary is too small to hold them."""
    ids = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    return {key: (value if value < vocab_size else None) for key, value in ids.items()}


def tiny_config(
    arch: str, vocab_size: int, *, n_layer: int, d_model: int, n_head: int, d_ff: int, max_positions: int
) -> PretrainedConfig:
    """A transformers config for `arch` with hidden width `d_model`, feed-forward width `d_ff`, no dropout."""
    special = _special_ids(vocab_size)
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_positions,
            n_embd=d_model,
            n_layer=n_layer,
            n_head=n_head,
            n_inner=d_ff,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            **special,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=d_model,
            intermediate_size=d_ff,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=n_head,
            max_position_embeddings=max_positions,
            attention_dropout=0.0,
            **special,
        )
    if arch == "gpt_neox":
        head_dim = d_model // n_head
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=d_model,
            intermediate_size=d_ff,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            max_position_embeddings=max_positions,
            rotary_pct=0.5 if head_dim % 4 == 0 else 1.0,  # rotary width must be even
            hidden_dropout=0.0,
            attention_dropout=0.0,
            classifier_dropout=0.0,
            **special,
        )
    if arch == "opt":
        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=d_model,
            word_embed_proj_dim=d_model,
            ffn_dim=d_ff,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            max_position_embeddings=max_positions,
            dropout=0.0,
            attention_dropout=0.0,
            layerdrop=0.0,
            **special,
        )
    raise ValueError(f"unknown architecture '{arch}' (choose from {', '.join(ARCHITECTURES)})")


def build_tiny_model(
    arch: str,
    vocab_size: int,
    out_dir: str | Path | None = None,
    *,
    n_layer: int = 2,
    d_model: int = 32,
    n_head: int = 2,
    d_ff: int | None = None,
    max_positions: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A randomly initialised causal LM, deterministic in `seed`, in eval mode, in `dtype`.

    `d_ff` defaults to 4 * d_model. Weights are initialised in float32 and then cast, so the same
    seed gives the same values (up to rounding) in every dtype. Saved as safetensors into `out_dir`
    when given.
    """
    config = tiny_config(
        arch,
        vocab_size,
        n_layer=n_layer,
        d_model=d_model,
        n_head=n_head,
        d_ff=d_ff if d_ff is not None else 4 * d_model,
        max_positions=max_positions,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.to(dtype)
    model.config.dtype = dtype
    model.eval()
    if out_dir is not None:
        save_model_dir(model, None, out_dir)
    return model


def save_model_dir(model: PreTrainedModel, tokenizer, out_dir: str | Path) -> Path:
    """Save `model` (safetensors) and, if given, `tokenizer` into `out_dir`; returns the directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar for a one-shard toy model
    try:
        model.save_pretrained(str(out_dir), safe_serialization=True)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir
