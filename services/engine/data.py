"""Training sequences and queries: tokenising and batching (reading them is records.py).

Conventions (shared by every pass):
- A training sequence is tokenised as the tokenizer does by default (special tokens included,
  e.g. Llama's BOS) and truncated to `max_length` tokens. Its loss is the summed negative
  log-likelihood of every token after the first: targets are positions 1..T-1.
- A query is `prompt` tokens followed by `completion` tokens (each tokenised separately, the
  completion without special tokens), so the boundary is exact. Its measurement is the summed
  log-probability of the completion tokens only; prompt tokens are masked.
- A chat (`messages`, engine/records.py) is rendered by the tokenizer's chat template and
  tokenised without adding special tokens (the template writes them), as `apply_chat_template`
  does. A chat query's prompt is the conversation before its last assistant turn rendered with
  the generation prompt; its completion is the rest of the whole conversation's rendering (the
  assistant's text and the template's end-of-turn tokens), so only the completion counts.
- Pre-tokenized training sequences (`tokens`) are taken as they are (truncated to `max_length`);
  each id must lie in the tokenizer's vocabulary. Their text (for the records) is their decoding.
- Batches are right-padded. `target_mask[b, t]` is 1 where token t is a scored target
  (predicted from position t-1); position 0 is never a target.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from ..errors import InputError
from .device import host_to_device
from .records import ChatMessage, Query, TrainingExample


@dataclass(frozen=True)
class TokenizedSequence:
    """One sequence's token ids and which of its tokens are loss targets.

    input_ids: [T] int64; target_mask: [T] bool (False at position 0 and on prompt tokens).
    """

    index: int
    input_ids: torch.Tensor
    target_mask: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class Batch:
    """Right-padded batch.

    indices: [B] positions of the sequences in their source list (always on the host);
    input_ids, attention_mask, target_mask: [B, T];
    padded: whether any row is padded, and tokens: the real tokens, both known on the host when
    the batch is made, so a pass on a GPU never reads them back from the device.
    """

    indices: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    padded: bool = True
    tokens: int = 0

    def to(self, device: torch.device | str) -> Batch:
        """The batch on `device` (a GPU's copies from pinned memory, not blocking: device.host_to_device)."""
        return Batch(
            self.indices,
            host_to_device(self.input_ids, device),
            host_to_device(self.attention_mask, device),
            host_to_device(self.target_mask, device),
            self.padded,
            self.tokens,
        )


def _token_ids(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _chat_text(tokenizer, messages: Sequence[ChatMessage], what: str, *, generation_prompt: bool = False) -> str:
    """The conversation as the tokenizer's chat template renders it; InputError naming the fix
    when the tokenizer has none."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"{what} is a chat (messages) but this model's tokenizer has no chat template: add one "
            "(chat_template.jinja or chat_template in tokenizer_config.json) or give text lines instead"
        )
    turns = [{"role": message.role, "content": message.content} for message in messages]
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as error:  # the template's own checks (e.g. roles that must alternate)
        message = (str(error).strip() or type(error).__name__).splitlines()[0][:300]
        raise InputError(f"{what}: the chat template cannot render it: {message}") from None


def rendered(tokenizer, examples: Sequence[TrainingExample]) -> list[TrainingExample]:
    """The examples with every chat's `text` its rendering by the chat template and every
    pre-tokenized sequence's its decoding (plain texts, and examples already rendered, as they are)."""
    return [_rendered(tokenizer, example) for example in examples]


def _rendered(tokenizer, example: TrainingExample) -> TrainingExample:
    if example.text or not (example.messages or example.tokens):
        return example
    if example.tokens:
        vocabulary = len(tokenizer)
        if max(example.tokens) >= vocabulary:
            raise InputError(
                f"training example '{example.id}': token id {max(example.tokens)} is outside the tokenizer's "
                f"vocabulary of {vocabulary}: were the shards written with this model's tokenizer?"
            )
        return replace(example, text=tokenizer.decode(list(example.tokens)))
    return replace(example, text=_chat_text(tokenizer, example.messages, f"training example '{example.id}'"))


def tokenize_training(
    tokenizer, examples: Sequence[TrainingExample], max_length: int, start_index: int = 0
) -> list[TokenizedSequence]:
    """Tokenise training texts; every token after the first is a target.

    Sequence indices are `start_index + position`: a shard keeps its sequences' global indices,
    so sampled labels (seeded per index) do not depend on how the data is sharded.
    """
    if not examples:
        return []
    examples = rendered(tokenizer, examples)
    # One batched call per kind (the Rust tokenizer encodes in bulk; per text, the Python wrapper
    # cost twice the encoding), and one flat tensor that the sequences are views of. A chat's
    # rendering holds its special tokens already.
    token_lists: list[list[int]] = [list(example.tokens[:max_length]) for example in examples]
    for chat in (False, True):
        positions = [
            position
            for position, example in enumerate(examples)
            if not example.tokens and bool(example.messages) == chat
        ]
        if positions:
            texts = [examples[position].text for position in positions]
            for position, ids in zip(
                positions, tokenizer(texts, add_special_tokens=not chat)["input_ids"], strict=True
            ):
                token_lists[position] = list(ids[:max_length])
    for example, ids in zip(examples, token_lists, strict=True):
        if len(ids) < 2:
            raise InputError(f"training example '{example.id}' has fewer than 2 tokens; nothing to predict")
    offsets = [0]
    for ids in token_lists:
        offsets.append(offsets[-1] + len(ids))
    token_ids = torch.tensor([token for ids in token_lists for token in ids], dtype=torch.long)
    target_mask = torch.ones(offsets[-1], dtype=torch.bool)
    target_mask[offsets[:-1]] = False  # the first token of each sequence is no target
    return [
        TokenizedSequence(index, token_ids[start:end], target_mask[start:end])
        for index, start, end in zip(
            range(start_index, start_index + len(examples)), offsets[:-1], offsets[1:], strict=True
        )
    ]


def tokenize_queries(tokenizer, queries: Sequence[Query], max_length: int) -> list[TokenizedSequence]:
    """Tokenise prompt and completion separately; only completion tokens are targets.

    A query longer than `max_length` is truncated from the left of the prompt so that the whole
    completion is kept; a completion that alone exceeds the limit is an error.
    """
    sequences = []
    for index, query in enumerate(queries):
        if query.messages:
            prompt_ids, completion_ids = _chat_query_ids(tokenizer, query)
        else:
            prompt_ids = _token_ids(tokenizer, query.prompt, special=True) if query.prompt else []
            if not prompt_ids and tokenizer.bos_token_id is not None:
                prompt_ids = [tokenizer.bos_token_id]
            completion_ids = _token_ids(tokenizer, query.completion, special=False)
        if not completion_ids:
            raise InputError(f"query '{query.id}': completion tokenises to no tokens")
        if len(completion_ids) >= max_length:
            raise InputError(
                f"query '{query.id}': completion has {len(completion_ids)} tokens, max length is {max_length}"
            )
        prompt_ids = prompt_ids[-(max_length - len(completion_ids)) :] if prompt_ids else []
        if not prompt_ids:
            raise InputError(f"query '{query.id}': empty prompt and the tokenizer has no BOS token to condition on")
        ids = prompt_ids + completion_ids
        target_mask = torch.zeros(len(ids), dtype=torch.bool)
        target_mask[len(prompt_ids) :] = True
        sequences.append(TokenizedSequence(index, torch.tensor(ids, dtype=torch.long), target_mask))
    return sequences


def _chat_query_ids(tokenizer, query: Query) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a chat query: the turns before the last rendered with the
    generation prompt, then the rest of the whole conversation's rendering."""
    what = f"query '{query.id}'"
    prompt = _chat_text(tokenizer, query.messages[:-1], what, generation_prompt=True)
    whole = _chat_text(tokenizer, query.messages, what)
    if not whole.startswith(prompt):
        raise InputError(
            f"{what}: the chat template does not render the turns before the last as a prefix of the whole "
            "conversation, so the completion cannot be told apart"
        )
    return _token_ids(tokenizer, prompt, special=False), _token_ids(tokenizer, whole[len(prompt) :], special=False)


def collate(sequences: Sequence[TokenizedSequence], pad_token_id: int) -> Batch:
    """Right-pad sequences into one batch."""
    longest = max(sequence.length for sequence in sequences)
    batch_size = len(sequences)
    input_ids = torch.full((batch_size, longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
    target_mask = torch.zeros((batch_size, longest), dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        input_ids[row, : sequence.length] = sequence.input_ids
        attention_mask[row, : sequence.length] = 1
        target_mask[row, : sequence.length] = sequence.target_mask
    indices = torch.tensor([sequence.index for sequence in sequences], dtype=torch.long)
    tokens = sum(sequence.length for sequence in sequences)
    return Batch(indices, input_ids, attention_mask, target_mask, tokens < batch_size * longest, tokens)


def length_bucketed_batches(
    sequences: Sequence[TokenizedSequence], batch_size: int, pad_token_id: int
) -> Iterator[Batch]:
    """Batches of similar-length sequences (sorted by length, stable), so padding wastes little.

    Results are keyed by `Batch.indices`, so the order of batches never changes an answer.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    order = sorted(range(len(sequences)), key=lambda position: (-sequences[position].length, position))
    for start in range(0, len(order), batch_size):
        yield collate([sequences[position] for position in order[start : start + batch_size]], pad_token_id)


def count_batches(n_sequences: int, batch_size: int) -> int:
    return (n_sequences + batch_size - 1) // batch_size


def pack_sequences(sequences: Sequence[TokenizedSequence]) -> dict[str, torch.Tensor]:
    """Flat tensors for storage: token_ids [Σ T], offsets [n+1], target_mask [Σ T], index [n]."""
    lengths = torch.tensor([sequence.length for sequence in sequences], dtype=torch.long)
    offsets = torch.zeros(len(sequences) + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    return {
        "token_ids": torch.cat([sequence.input_ids for sequence in sequences]).to(torch.int64),
        "target_mask": torch.cat([sequence.target_mask for sequence in sequences]).to(torch.uint8),
        "offsets": offsets,
        "index": torch.tensor([sequence.index for sequence in sequences], dtype=torch.long),
    }


def unpack_sequences(tensors: dict[str, torch.Tensor]) -> list[TokenizedSequence]:
    """Inverse of `pack_sequences`; the sequences are views into the flat tensors."""
    offsets = tensors["offsets"].tolist()
    token_ids, target_mask = tensors["token_ids"], tensors["target_mask"].bool()
    return [
        TokenizedSequence(int(index), token_ids[start:end], target_mask[start:end])
        for index, start, end in zip(tensors["index"].tolist(), offsets[:-1], offsets[1:], strict=True)
    ]
