"""One pass of the model over a list of sequences: length-bucketed batches, one capture per
batch, progress and cancellation between batches, and every capture checked for NaN and Inf.

Every pass of the engine (covariance, correction, query gradients, scoring, self-influence)
iterates `captured_batches`; what it does with each batch's captures is its own business.

A non-finite capture is refused before anyone uses it. Which sequence is to blame is not
obvious from a batch: a sequence whose padding positions overflow poisons the backward pass of
the whole batch (0 × Inf = NaN flows into the other sequences' gradients through attention). So
on that path only, the batch's sequences are re-run one at a time and the error names the first
one that is non-finite on its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import nn

from ..errors import NonFiniteError
from .capture import ModuleCapture, capture
from .data import Batch, TokenizedSequence, collate, count_batches, length_bucketed_batches
from .finite import is_finite
from .modules import device_of
from .progress import Progress

TRAINING = "training sequence {} (in file order)"
QUERY = "query {} (in request order)"


def captured_batches(
    model: nn.Module,
    modules: dict[str, nn.Module],
    sequences: Sequence[TokenizedSequence],
    *,
    batch_size: int,
    pad_token_id: int,
    stage: str,
    objective: str = "true",
    seed: int = 0,
    progress: Progress | None = None,
    subject: str = TRAINING,
) -> Iterator[tuple[Batch, dict[str, ModuleCapture]]]:
    """(batch, captures) for each batch of `sequences`; the batch is on the model's device.

    `stage` names the pass in progress reports and errors; `subject` names a sequence in errors
    from its 1-based position in its source (TRAINING or QUERY).
    """
    progress = progress or Progress()
    device = device_of(model)
    progress.stage(stage, count_batches(len(sequences), batch_size))
    for batch in length_bucketed_batches(sequences, batch_size, pad_token_id):
        progress.check_cancelled()
        batch = batch.to(device)
        captures = capture(model, modules, batch, objective, seed=seed)
        if not all(is_finite(c.a) and is_finite(c.s) for c in captures.values()):
            raise _blame(model, modules, sequences, batch, pad_token_id, stage, objective, seed, subject)
        yield batch, captures
        progress.advance(1, int(batch.attention_mask.sum()))


def _blame(model, modules, sequences, batch, pad_token_id, stage, objective, seed, subject) -> NonFiniteError:
    """The error naming the first sequence of `batch` (in source order) that is non-finite alone."""
    by_index = {sequence.index: sequence for sequence in sequences}
    device = device_of(model)
    for index in sorted(int(i) for i in batch.indices):
        alone = capture(model, modules, collate([by_index[index]], pad_token_id).to(device), objective, seed=seed)
        for name, module_capture in alone.items():
            for what, values in (("inputs", module_capture.a), ("output gradients", module_capture.s)):
                if not is_finite(values):
                    return NonFiniteError(
                        f"{subject.format(index + 1)} makes the {what} of module {name} NaN or Inf ({stage} pass); "
                        "the model produces non-finite values on it"
                    )
    members = ", ".join(subject.format(int(i) + 1) for i in sorted(batch.indices.tolist()))
    return NonFiniteError(
        f"a batch of {members} produces NaN or Inf ({stage} pass), though none does alone: the model overflows "
        "on this batch's padding"
    )
