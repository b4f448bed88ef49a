"""Progress reporting and cancellation between batches, with no UI in the math core.

The engine calls `stage(name, total)` when a pass starts, `advance(batches, tokens)` after each
batch and `check_cancelled()` between batches. The CLI shows tqdm bars; services write operation
metadata; tests use the silent default.
"""

from __future__ import annotations

from ..errors import CancelledError


class Progress:
    """Silent progress: subclass and override what you need."""

    def stage(self, name: str, total: int) -> None:
        pass

    def advance(self, batches: int = 1, tokens: int = 0) -> None:
        pass

    def cancelled(self) -> bool:
        return False

    def check_cancelled(self) -> None:
        if self.cancelled():
            raise CancelledError("cancelled")

    def close(self) -> None:
        pass


class TqdmProgress(Progress):
    """One tqdm bar per stage on stderr, with tokens/s."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._bar = None
        self._tokens = 0

    def stage(self, name: str, total: int) -> None:
        self.close()
        if not self.enabled:
            return
        from tqdm import tqdm

        self._tokens = 0
        self._bar = tqdm(total=total, desc=f"{name:>12}", unit="batch", dynamic_ncols=True, leave=True)

    def advance(self, batches: int = 1, tokens: int = 0) -> None:
        if self._bar is None:
            return
        self._tokens += tokens
        elapsed = self._bar.format_dict.get("elapsed") or 0.0
        if elapsed > 0:
            self._bar.set_postfix_str(f"{self._tokens / elapsed:,.0f} tok/s", refresh=False)
        self._bar.update(batches)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
