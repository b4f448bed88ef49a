"""Mixture-of-experts fit and score time against a dense model of the same active size, on the
demo's toy corpus (services/toy: the planted-facts corpus, its word-level tokenizer).

Every model: 2 layers, width 96, 4 heads, random weights (timing does not depend on training),
float32, in-process engine (`fit_factors`, EK-FAC, sampled Fisher, `--modules mlp`, batch 8;
`compute_scores` of the corpus's queries). MoE models: 8 experts of width 96, top-2 (active
MLP width 192); the dense reference is a Llama with intermediate size 192, the same active
MLP width. Qwen2-MoE adds a shared expert (width 96) and DeepSeek-V3 a shared expert and a
dense first layer, so their active size is larger; the table says so.

    nice -n 19 .venv/bin/python bench/bench_moe.py [--families mixtral,olmoe] [--sequences N]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GptOssConfig,
    LlamaConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from services.engine.fit import FitConfig, fit_factors
from services.engine.records import Query, TrainingExample
from services.engine.score import ScoreConfig, compute_scores
from services.toy.recipe import DemoSettings, build_corpus
from services.toy.tokenizer import build_word_tokenizer

WIDTH, EXPERT_FFN, EXPERTS, TOP_K = 96, 96, 8, 2


def config_of(family: str, vocab: int, special: dict):
    common = {
        "vocab_size": vocab,
        "hidden_size": WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
        **special,
    }
    moe = {"num_experts_per_tok": TOP_K}
    if family == "llama (dense)":
        return LlamaConfig(**common, intermediate_size=TOP_K * EXPERT_FFN)
    if family == "mixtral":
        return MixtralConfig(**common, **moe, intermediate_size=EXPERT_FFN, num_local_experts=EXPERTS)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(
            **common, **moe, intermediate_size=EXPERT_FFN, moe_intermediate_size=EXPERT_FFN,
            shared_expert_intermediate_size=EXPERT_FFN, num_experts=EXPERTS,
        )  # fmt: skip
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            **common, **moe, intermediate_size=EXPERT_FFN, moe_intermediate_size=EXPERT_FFN, num_experts=EXPERTS,
            head_dim=WIDTH // 4,
        )  # fmt: skip
    if family == "olmoe":
        return OlmoeConfig(**common, **moe, intermediate_size=EXPERT_FFN, num_experts=EXPERTS)
    if family == "gpt_oss":
        return GptOssConfig(
            **common, **moe, intermediate_size=EXPERT_FFN, num_local_experts=EXPERTS, head_dim=WIDTH // 4,
            layer_types=["full_attention"] * 2,
        )  # fmt: skip
    if family == "deepseek_v3":
        return DeepseekV3Config(
            **common, **moe, intermediate_size=TOP_K * EXPERT_FFN, moe_intermediate_size=EXPERT_FFN,
            n_routed_experts=EXPERTS, n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1,
            q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=24,
            rope_scaling=None,
        )  # fmt: skip
    raise ValueError(family)


FAMILIES = ("llama (dense)", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--sequences", type=int, default=0, help="first N training sequences (0: all)")
    args = parser.parse_args()
    corpus = build_corpus(DemoSettings(), seed=0)
    tokenizer = build_word_tokenizer(corpus.vocabulary())
    examples = [TrainingExample(s.id, s.text) for s in corpus.training]
    examples = examples[: args.sequences] if args.sequences else examples
    queries = [Query(q.id, q.prompt, q.completion) for q in corpus.queries]
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    special["pad_token_id"] = tokenizer.pad_token_id
    print(json.dumps({"sequences": len(examples), "queries": len(queries), "threads": torch.get_num_threads()}))
    for family in args.families.split(","):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config_of(family, len(tokenizer), special), dtype=torch.float32)
        with torch.no_grad():  # routers that route (some families start them at zero)
            for name, parameter in model.named_parameters():
                if name.endswith(("mlp.gate.weight", "mlp.router.weight")) and parameter.dim() == 2:
                    parameter.normal_(0, 1.0)
        model.eval()
        started = time.perf_counter()
        factors = fit_factors(model, tokenizer, examples, FitConfig(batch_size=8))
        fit_seconds = time.perf_counter() - started
        started = time.perf_counter()
        compute_scores(model, tokenizer, factors, examples, queries, ScoreConfig(batch_size=8))
        score_seconds = time.perf_counter() - started
        coverage = factors.metadata["coverage"]
        print(
            json.dumps(
                {
                    "family": family,
                    "parameters": coverage["model_parameters"],
                    "tracked": coverage["tracked_parameters"],
                    "modules": coverage["modules"],
                    "mlp_share": coverage["mlp_share"],
                    "fit_s": round(fit_seconds, 2),
                    "score_s": round(score_seconds, 2),
                    "timings": factors.metadata.get("timings"),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
