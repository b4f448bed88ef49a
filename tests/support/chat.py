"""A chat template for the tiny family tokenizers (tests/support/families.py), written into a
saved model directory the way a user's instruct model carries one (tokenizer_config.json)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

# Each turn as "role: content" closed by the end-of-sequence token (tokens the tiny models have:
# a real template's <|im_start|>/<|im_end|> would need new embeddings), BOS in front.
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def add_chat_template(model_dir: Path, template: str = TEMPLATE) -> Path:
    """Save `model_dir`'s tokenizer again with `template` as its chat template."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(model_dir)
    return model_dir
