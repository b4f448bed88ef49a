"""The correction pass's sums: the diagonal Λ [d_out, d_in] measured in the factors' basis.

For a tracked module with eigenbasis (Q_S, Q_A) from the covariance pass (covariance.py):
    Λ = E_m[(Q_Sᵀ DW_m Q_A)^⊙2]      (EK-FAC's eigenvalue correction)   [d_out, d_in]
and with no basis (the diagonal strategy) Λ = E_m[DW_m^⊙2], in the parameters' own basis.
DW_m = s_mᵀ a_m is sequence m's gradient (s [N, d_out], a [N, d_in]; capture.py), rotated as
rotation.py does.

`CorrectionAccumulator` holds Σ_m of the squares in float64 with the counts of one shard
(mergeable, sums.py); `eigenvalues` divides the reduced sum by the number of sequences.
"""

from __future__ import annotations

import torch

from .capture import ModuleCapture
from .finite import require_finite
from .modules import TrackedModule
from .rotation import rotated_per_sequence_gradients
from .sums import RunningSums


class CorrectionAccumulator:
    """Σ_m (Q_Sᵀ DW_m Q_A)^⊙2 per module (or Σ_m DW_m^⊙2 with no basis): during a pass on its device
    (`sums.RunningSums`, counts as device tensors: adding a batch never waits for the device), after
    `finish` (once per task) and when read from the store in float64 on the host.

    `bases`: (Q_S, Q_A) per module on the device and in the dtype of the captures it is given
    (the caller places them once: FitModel.correction), or None."""

    def __init__(
        self,
        modules: dict[str, TrackedModule],
        bases: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
        device: torch.device | str | None = "cpu",
    ):
        """`device`: where a pass adds its batches; None for a partial sum read from the store."""
        self.modules = modules
        self.bases = bases
        self.squared_sums: dict[str, torch.Tensor] = {}
        self.n_sequences = 0
        self.n_tokens = 0
        self.batch_sizes: set[int] = set()
        self._running = None
        if device is not None:
            self._running = RunningSums({n: (m.d_out, m.d_in_full) for n, m in modules.items()}, device)
            self._tokens = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, captures: dict[str, ModuleCapture], n_sequences: int) -> None:
        for name, capture in captures.items():
            correction_update(self._running, name, capture, self.bases[name] if self.bases is not None else None)
        self.n_sequences += n_sequences
        self._tokens += sequence_tokens(captures)

    def finish(self, batch_size: int) -> CorrectionAccumulator:
        """The pass's sums and token count to the host (float64), once, checked for NaN and Inf."""
        self.squared_sums = self._running.to_host()
        self.n_tokens = int(self._tokens)
        self._running = None
        self.batch_sizes = {batch_size}
        self.check_finite()
        return self

    def check_finite(self) -> None:
        for name, value in self.squared_sums.items():
            require_finite(
                value,
                f"the eigenvalue-correction sums of module {name} (correction pass)",
                "the model produces non-finite gradients on this data",
            )

    def merge(self, other: CorrectionAccumulator) -> None:
        for name in self.modules:
            self.squared_sums[name] += other.squared_sums[name]
        self.n_sequences += other.n_sequences
        self.n_tokens += other.n_tokens
        self.batch_sizes |= other.batch_sizes

    def merge_modules(self, other: CorrectionAccumulator) -> None:
        """Join another module group's sums over the same sequences (budget.py's groups): its modules
        are added to these, the counts are the same."""
        self.modules = {**self.modules, **other.modules}
        self.squared_sums.update(other.squared_sums)
        self.batch_sizes |= other.batch_sizes

    def state(self) -> dict[str, torch.Tensor]:
        state = {
            "n_sequences": torch.tensor([self.n_sequences], dtype=torch.int64),
            "n_tokens": torch.tensor([self.n_tokens], dtype=torch.int64),
            "batch_sizes": torch.tensor(sorted(self.batch_sizes), dtype=torch.int64),
        }
        state.update({f"{name}/squared_sum": value for name, value in self.squared_sums.items()})
        return state

    @classmethod
    def from_state(cls, modules, bases, state: dict[str, torch.Tensor]) -> CorrectionAccumulator:
        accumulator = cls(modules, bases, device=None)
        accumulator.n_sequences = int(state["n_sequences"][0])
        accumulator.n_tokens = int(state["n_tokens"][0])
        accumulator.batch_sizes = set(state["batch_sizes"].tolist()) if "batch_sizes" in state else set()
        for name in modules:
            accumulator.squared_sums[name] = state[f"{name}/squared_sum"].to(torch.float64)
        return accumulator

    def eigenvalues(self) -> dict[str, torch.Tensor]:
        """Λ per module: [d_out, d_in] = mean over sequences."""
        return {name: value / max(self.n_sequences, 1) for name, value in self.squared_sums.items()}


def correction_update(
    sums: RunningSums, name: str, capture: ModuleCapture, bases: tuple[torch.Tensor, torch.Tensor] | None
) -> None:
    """Module `name`'s sum [d_out, d_in] += Σ_b (Q_Sᵀ DW_b Q_A)^⊙2 over the batch's sequences (DW_b
    itself with no bases); sums, capture and bases (Q_S, Q_A) on one device."""
    rotated = rotated_per_sequence_gradients(capture, *(bases if bases is not None else (None, None)))
    sums.add(name, rotated.square_().sum(0))


def sequence_tokens(captures: dict[str, ModuleCapture]) -> torch.Tensor:
    """Real tokens of a batch's sequences (one call of a module's positions; the most over the
    modules, since an expert counts only the tokens routed to it): a 0-dim int64 tensor on the
    captures' device (read once per task, never per batch)."""
    return torch.stack([c.token_mask[:, : c.token_mask.shape[1] // c.calls].sum() for c in captures.values()]).max()
