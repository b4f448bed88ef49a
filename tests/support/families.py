"""Tiny random models of every architecture family the README names, saved the way users have
them: `save_pretrained` directories with a real sub-word tokenizer (a byte-level BPE trained by
the `tokenizers` library on a small corpus), loaded back through AutoModelForCausalLM and
AutoTokenizer like any checkpoint.

Families and what each one exercises:
    llama     LlamaForCausalLM: gate/up/down MLP names that do not sort in model order, tied
              embeddings, a BOS-prepending tokenizer without a pad token
    mistral   MistralForCausalLM: Llama naming, another class, untied head
    qwen2     Qwen2ForCausalLM: Llama naming, biased q/k/v projections (tracked with --modules all)
    gpt2      GPT2LMHeadModel: Conv1D layers with biases, tied embeddings, no BOS, no pad token
    gpt_neox  GPTNeoXForCausalLM: dense_h_to_4h/dense_4h_to_h with biases
    opt       OPTForCausalLM: fc1/fc2 with biases, a tokenizer with a pad token

Mixture-of-experts families (MOE_FAMILIES: experts stored fused as 3-D parameters, as
transformers 5 builds every sparse-MoE family; 4 experts, top-2, so a batch leaves some
expert-token pairs unrouted):
    mixtral      MixtralForCausalLM: router + experts, nothing else in the MLP
    qwen2_moe    Qwen2MoeForCausalLM: + a shared expert (nn.Linear) and its sigmoid gate
    qwen3_moe    Qwen3MoeForCausalLM: q/k norms, no shared expert
    olmoe        OlmoeForCausalLM: q/k norms, no shared expert
    gpt_oss      GptOssForCausalLM: transposed, interleaved experts with biases, a biased router,
                 attention sinks
    deepseek_v3  DeepseekV3ForCausalLM: sigmoid group routing, a shared expert, a dense first layer, MLA
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GPT2Config,
    GPTNeoXConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OlmoeConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from services.toy.models import save_model_dir

WORDS = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "sailors",
    "sing",
    "about",
    "silver",
    "rivers",
    "and",
    "distant",
    "mountains",
    "where",
    "merchants",
    "trade",
    "copper",
    "tea",
    "and",
    "amber",
    "every",
    "morning",
    "before",
    "the",
    "market",
    "opens",
)


@dataclass(frozen=True)
class Family:
    name: str
    model_class: str  # the transformers class a user would see
    modules: str  # the --modules selection its tests use
    bos: bool  # the tokenizer prepends a BOS token
    pad: bool  # the tokenizer defines a pad token


FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", "mlp", bos=True, pad=False),
    "mistral": Family("mistral", "MistralForCausalLM", "mlp", bos=True, pad=False),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", "all", bos=False, pad=False),
    "gpt2": Family("gpt2", "GPT2LMHeadModel", "mlp", bos=False, pad=False),
    "gpt_neox": Family("gpt_neox", "GPTNeoXForCausalLM", "mlp", bos=False, pad=True),
    "opt": Family("opt", "OPTForCausalLM", "mlp", bos=True, pad=True),
}

MOE_FAMILIES = {
    "mixtral": Family("mixtral", "MixtralForCausalLM", "mlp", bos=True, pad=False),
    "qwen2_moe": Family("qwen2_moe", "Qwen2MoeForCausalLM", "mlp", bos=False, pad=False),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", "mlp", bos=False, pad=False),
    "olmoe": Family("olmoe", "OlmoeForCausalLM", "mlp", bos=False, pad=True),
    "gpt_oss": Family("gpt_oss", "GptOssForCausalLM", "mlp", bos=False, pad=False),
    "deepseek_v3": Family("deepseek_v3", "DeepseekV3ForCausalLM", "mlp", bos=True, pad=False),
}
EXPERTS, TOP_K_EXPERTS = 4, 2

# MLP module names of one block (block 1 of a MoE family: DeepSeek-V3's block 0 is dense), per family, in model order
MLP_NAMES = {
    "llama": ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"],
    "mistral": ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"],
    "qwen2": ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"],
    "gpt2": ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"],
    "gpt_neox": ["gpt_neox.layers.0.mlp.dense_h_to_4h", "gpt_neox.layers.0.mlp.dense_4h_to_h"],
    "opt": ["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"],
    **{
        family: [
            f"model.layers.1.mlp.{'router' if family == 'gpt_oss' else 'gate'}",
            *(f"model.layers.1.mlp.experts.{e}.{p}" for e in range(EXPERTS) for p in ("gate_up_proj", "down_proj")),
        ]
        for family in MOE_FAMILIES
    },
}


def sentences(count: int, seed: int, low: int = 3, high: int = 14) -> list[str]:
    """`count` random sentences of `low`..`high` words from WORDS."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        length = int(torch.randint(low, high + 1, (1,), generator=generator))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=generator)))
    return out


def bpe_tokenizer(family: Family, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on this module's word list (sub-word pieces, a space
    marker as in GPT-2/Llama-3 tokenizers), with the family's special-token conventions."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(sentences(400, seed=99), trainer)
    if family.bos:
        bos_id = core.token_to_id("<s>")
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    else:
        core.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>" if family.bos else "<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>" if family.pad else None,
        clean_up_tokenization_spaces=False,
    )


def moe_config(family: str, vocab: int, special: dict | None = None, width: int = 16, expert_ffn: int = 12):
    """A tiny config of MoE `family`: 2 layers, `EXPERTS` experts of width `expert_ffn`, top-2."""
    common = {
        "vocab_size": vocab,
        "hidden_size": width,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        **(special or {}),
    }
    if family == "deepseek_v3":  # multi-head latent attention: as many key/value heads as heads
        common["num_key_value_heads"] = 2
    experts = {"num_experts_per_tok": TOP_K_EXPERTS}
    if family == "mixtral":
        return MixtralConfig(**common, **experts, intermediate_size=expert_ffn, num_local_experts=EXPERTS)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(
            **common,
            **experts,
            intermediate_size=2 * expert_ffn,
            moe_intermediate_size=expert_ffn,
            shared_expert_intermediate_size=expert_ffn,
            num_experts=EXPERTS,
        )
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            **common,
            **experts,
            intermediate_size=2 * expert_ffn,
            moe_intermediate_size=expert_ffn,
            num_experts=EXPERTS,
            head_dim=width // 2,
        )
    if family == "olmoe":
        return OlmoeConfig(**common, **experts, intermediate_size=expert_ffn, num_experts=EXPERTS)
    if family == "gpt_oss":
        return GptOssConfig(
            **common,
            **experts,
            intermediate_size=expert_ffn,
            num_local_experts=EXPERTS,
            head_dim=width // 2,
            layer_types=["full_attention"] * 2,
        )
    if family == "deepseek_v3":
        return DeepseekV3Config(
            **common,
            **experts,
            intermediate_size=2 * expert_ffn,
            moe_intermediate_size=expert_ffn,
            n_routed_experts=EXPERTS,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            n_shared_experts=1,
            q_lora_rank=8,
            kv_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=width // 2,
            rope_scaling=None,
        )
    raise ValueError(family)


def _config(family: str, vocab: int, tokenizer) -> object:
    width, ffn, layers, heads = 16, 24, 2, 2
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if tokenizer.pad_token_id is not None:
        special["pad_token_id"] = tokenizer.pad_token_id
    if family in MOE_FAMILIES:
        return moe_config(family, vocab, special, width)
    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=1,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            **special,
        )
    if family == "mistral":
        return MistralConfig(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=1,
            max_position_embeddings=128,
            sliding_window=None,
            tie_word_embeddings=False,
            **special,
        )
    if family == "qwen2":
        return Qwen2Config(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=1,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            use_sliding_window=False,
            **special,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_positions=128,
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            n_inner=ffn,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **special,
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=128,
            rotary_pct=0.5,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            **special,
        )
    if family == "opt":
        return OPTConfig(
            vocab_size=vocab,
            hidden_size=width,
            word_embed_proj_dim=width,
            ffn_dim=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=128,
            dropout=0.0,
            attention_dropout=0.0,
            **special,
        )
    raise ValueError(family)


def build_family_model(family: str, out_dir: Path, seed: int = 0) -> Path:
    """A tiny random `family` model and its tokenizer saved with save_pretrained into out_dir."""
    known = FAMILIES | MOE_FAMILIES
    tokenizer = bpe_tokenizer(known[family])
    config = _config(family, len(tokenizer), tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():  # random biases and norms, so biases matter to the gradients; routers that route
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
            elif name.endswith(("mlp.gate.weight", "mlp.router.weight")) and parameter.dim() == 2:
                parameter.normal_(0, 1.0)  # some families start their routers at zero: one fixed top-k
            elif family in MOE_FAMILIES and name.endswith("embed_tokens.weight"):
                parameter.normal_(0, 1.0)  # tokens that differ more than the random biases do: varied routing
    model.eval()
    assert type(model).__name__ == known[family].model_class, type(model).__name__
    save_model_dir(model, tokenizer, out_dir)
    return out_dir
