"""LoRA adapters of the tiny family models (tests/support/families.py), saved the way PEFT saves
them: adapter_config.json (naming the base model's directory) beside adapter_model.safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

# what each family's adapter adapts (attention and MLP linears; GPT-2's are Conv1D layers)
TARGETS = {
    "llama": (["q_proj", "v_proj", "up_proj", "down_proj"], False),
    "gpt2": (["c_attn", "c_fc"], True),
}


def build_lora_adapter(base_dir: Path, family: str, out_dir: Path, seed: int = 0, rank: int = 2) -> Path:
    """A LoRA adapter of the model in `base_dir` with random A and B (a freshly initialised B is 0:
    the adapter would change nothing and A's gradients would vanish), saved into `out_dir`."""
    targets, fan_in_fan_out = TARGETS[family]
    model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, fan_in_fan_out=fan_in_fan_out)
    adapted = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if ".lora_" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    adapted.save_pretrained(out_dir)
    return out_dir
