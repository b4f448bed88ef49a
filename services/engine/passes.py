"""One pass of the model over a list of sequences: length-bucketed batches, one capture per
batch, progress and cancellation between batches, and every capture checked for NaN and Inf.

Every pass of the engine (covariance, correction, query gradients, scoring, self-influence)
iterates `captured_batches`; what it does with each batch's captures is its own business.

A non-finite capture is refused before anyone uses it on the CPU; on a GPU, where reading a value
waits for the device, each batch's check stays a device flag and the pass reads them all once,
after its last batch (what the batch added to sums is discarded with the failed task). Which sequence is to blame is not
obvious from a batch: a sequence whose padding positions overflow poisons the backward pass of
the whole batch (0 × Inf = NaN flows into the other sequences' gradients through attention). So
on that path only, the batch's sequences are re-run one at a time and the error names the first
one that is non-finite on its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..errors import NonFiniteError
from .capture import ModuleCapture, capture
from .data import Batch, TokenizedSequence, collate, count_batches, length_bucketed_batches
from .finite import all_finite, is_finite
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
    checks: list[tuple[torch.Tensor, Batch]] = []  # on a GPU: each batch's finiteness, read once at the end
    for batch in length_bucketed_batches(sequences, batch_size, pad_token_id):
        progress.check_cancelled()
        batch = batch.to(device)
        captures = capture(model, modules, batch, objective, seed=seed)
        if device.type == "cpu":
            if not all(is_finite(c.a) and is_finite(c.s) for c in captures.values()):
                raise _blame(model, modules, sequences, batch, pad_token_id, stage, objective, seed, subject)
        else:
            checks.append((all_finite([t for c in captures.values() for t in (c.a, c.s)]), batch))
        yield batch, captures
        progress.advance(1, batch.tokens)
    if checks:
        finite = torch.stack([flag for flag, _ in checks]).cpu()  # the pass's one read of the device
        if not bool(finite.all()):
            batch = checks[int((~finite).nonzero()[0])][1]
            raise _blame(model, modules, sequences, batch, pad_token_id, stage, objective, seed, subject)


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
