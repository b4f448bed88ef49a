"""Progress reporting and cancellation between batches, with no UI in the math core.

The engine calls `stage(name, total, unit)` when a step starts (a pass over batches, the
eigendecompositions over modules, ...), `advance(units, tokens)` as it goes and `check_cancelled()`
between units. Services write operation metadata (which
the CLI shows as bars); tests use the silent default.
"""

from __future__ import annotations

from ..errors import CancelledError


class Progress:
    """Silent progress: subclass and override what you need."""

    def stage(self, name: str, total: int, unit: str = "batch") -> None:
        pass

    def advance(self, units: int = 1, tokens: int = 0) -> None:
        pass

    def cancelled(self) -> bool:
        return False

    def check_cancelled(self) -> None:
        if self.cancelled():
            raise CancelledError("cancelled")

    def close(self) -> None:
        pass
