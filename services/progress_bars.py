"""Progress of the system's operations in a terminal or a log: the CLI's and the demo's stage bars."""

from __future__ import annotations

import sys
import time

from .gen.influence.v1 import common_pb2


class StageBars:
    """Progress from operation metadata: one bar per stage, shards done / total, and the stage's
    tokens/s (the operation's token counter counts every stage's tokens, so a bar shows what
    it grew by since its stage began).

    On a terminal the bars redraw in place. When stderr is not a terminal (a log file, CI), a
    bar's carriage-return redraws would flood the log, so each stage prints one line when it
    ends instead."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        self._stage = None
        self._stage_started, self._stage_tokens = time.monotonic(), 0
        self._last = None

    def _rate(self, tokens_processed: int) -> float:
        elapsed = max(time.monotonic() - self._stage_started, 1e-9)
        return (tokens_processed - self._stage_tokens) / elapsed

    def __call__(self, metadata: common_pb2.OperationMetadata) -> None:
        if not self.enabled:
            return
        if metadata.stage != self._stage:
            self._end_stage(metadata)
            self._stage = metadata.stage
            self._stage_started, self._stage_tokens = time.monotonic(), metadata.tokens_processed
            if metadata.stage != "done" and self.interactive:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=metadata.shards_total,
                    desc=f"{metadata.stage:>12}",
                    unit="shard",
                    dynamic_ncols=True,
                    file=self.stream,
                )
        self._last = metadata
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self._rate(metadata.tokens_processed):,.0f} tok/s", refresh=False)
            self._bar.update(metadata.shards_done - self._bar.n)

    def _end_stage(self, metadata: common_pb2.OperationMetadata) -> None:
        """The stage that was running is over: `metadata` (of the next stage) holds its last counts."""
        if self._stage in (None, "done"):
            return
        rate = self._rate(metadata.tokens_processed)
        if self._bar is not None:
            self._bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
            self._bar.update(self._bar.total - self._bar.n)
            self.close()
        elif self._last is not None:
            elapsed = time.monotonic() - self._stage_started
            total = self._last.shards_total
            print(
                f"{self._stage:>12}: {total}/{total} shards in {elapsed:.1f}s, {rate:,.0f} tok/s",
                file=self.stream,
                flush=True,
            )

    def close(self, clear: bool = False) -> None:
        if self._bar is not None:
            if clear:
                self._bar.leave = False
            self._bar.close()
            self._bar = None

    def __enter__(self) -> StageBars:
        return self

    def __exit__(self, error_type, *exc) -> None:
        self.close(clear=error_type is not None)  # an error message stays a single line
