"""A word-level tokenizer for toy corpora, built with the `tokenizers` library.

Ids: `<pad>`=0, `<unk>`=1, `<bos>`=2, `<eos>`=3, then the given words in order. Text is split on
whitespace and punctuation (each punctuation character is its own token); nothing is added
automatically, so `tokenizer(text)["input_ids"]` is exactly the ids of the text's words.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(len(SPECIAL_TOKENS))


def build_word_tokenizer(words: list[str], out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `words` (duplicates and special tokens are skipped).

    Vocabulary size is 4 + number of distinct words. Saved with `save_pretrained(out_dir)` when
    `out_dir` is given, so `AutoTokenizer.from_pretrained(out_dir)` loads it offline.
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        if not word or any(ch.isspace() for ch in word):
            raise ValueError(f"a vocabulary word must be non-empty and contain no whitespace: {word!r}")
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with single spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer
