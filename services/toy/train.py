"""Training a tiny causal LM on a toy corpus (CPU, AdamW) and scoring prompt/completion pairs."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm


@dataclass(frozen=True)
class TrainConfig:
    """AdamW with linear warm-up then cosine decay to 0; `epochs` full passes over the texts.

    Batches are drawn by length within pools of `length_pool` batches (see `epoch_batches`).
    """

    epochs: int = 60
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    length_pool: int = 8
    seed: int = 0


@dataclass(frozen=True)
class CompletionScore:
    """log p(completion | prompt) in nats (summed over completion tokens), and whether greedy
    decoding with teacher forcing predicts every completion token."""

    logprob: float
    correct: bool


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into input_ids [B, T] and attention_mask [B, T]."""
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


def next_token_loss(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats per token) of predicting token t+1 from tokens ≤ t, over non-pad targets.

    input_ids, attention_mask: [B, T], right-padded.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # [B, T-1, V]
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)  # [B, T-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def epoch_batches(
    lengths: Sequence[int], batch_size: int, pool_batches: int, generator: torch.Generator
) -> list[list[int]]:
    """One epoch's batches of indices: a random permutation, cut into pools of `pool_batches` batches;
    each pool is sorted by length and cut into batches (so a batch pads little), and the batches are
    shuffled. Every index appears once; ceil(n / batch_size) batches.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    pool = batch_size * max(1, pool_batches)
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda index: lengths[index])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def train_causal_lm(
    model: torch.nn.Module, tokenizer, texts: Sequence[str], config: TrainConfig, *, progress: bool = True
) -> list[float]:
    """Train `model` in place on next-token prediction over every non-pad token of `texts`.

    Returns the mean training loss (nats per token) of each epoch. Leaves the model in eval mode.
    With `progress`, a tqdm bar on stderr, shown only when stderr is a terminal.
    """
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    pad_id = tokenizer.pad_token_id
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = max(1, int(config.warmup_fraction * total_steps))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    def learning_rate_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    # disable=None: tqdm turns itself off when stderr is not a terminal, so a log gets no stream of
    # carriage-return updates (callers print a one-line summary instead).
    bar = tqdm(
        total=total_steps, desc="training demo model", unit="step", disable=None if progress else True, file=sys.stderr
    )
    epoch_losses = []
    model.train()
    lengths = [len(row) for row in encoded]
    for _ in range(config.epochs):
        loss_sum, token_count = 0.0, 0
        for batch in epoch_batches(lengths, config.batch_size, config.length_pool, generator):
            input_ids, attention_mask = _pad([encoded[i] for i in batch], pad_id)
            loss = next_token_loss(model, input_ids, attention_mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            targets = int(attention_mask[:, 1:].sum())
            loss_sum += loss.item() * targets
            token_count += targets
            bar.update(1)
        epoch_losses.append(loss_sum / max(1, token_count))
        bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
    bar.close()
    model.eval()
    return epoch_losses


@torch.no_grad()
def score_completions(model: torch.nn.Module, tokenizer, pairs: Sequence[tuple[str, str]]) -> list[CompletionScore]:
    """Score each (prompt, completion): summed log-probability of the completion tokens and greedy accuracy."""
    model.eval()
    scores = []
    for prompt, completion in pairs:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + completion_ids])
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)  # [T-1, V]
        positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
        targets = ids[0, len(prompt_ids) :]
        logprob = float(log_probs[positions, targets].sum())
        correct = bool((log_probs[positions].argmax(dim=-1) == targets).all())
        scores.append(CompletionScore(logprob, correct))
    return scores
