"""Progress of the system's operations in a terminal or a log (the CLI's and the demo's bars), or as
JSON lines for programs (`--json`)."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..gen.influence.v1 import common_pb2


@dataclass(frozen=True)
class Phase:
    """What one bar shows: a job stage over its shards, or a step of a one-task stage over its
    units (batches of a pass, modules of the eigendecomposition, ...)."""

    name: str
    done: int
    total: int
    unit: str
    running: float = 0.0  # by shards: the share of the shard whose task reported last (0 <= running < 1)


DONE = "done"  # the stage of an operation that succeeded


def phase_of(metadata: common_pb2.OperationMetadata) -> Phase:
    """A stage fanned out over several shards is shown by shards, moving within a shard by the step
    its running task reports (a step at its end, or one left from the stage before, adds nothing:
    its shard is counted done, or not begun); a stage that is one task (a one-shard fit, the
    eigendecomposition, a merge) by the step its task reports; an operation that ended is "done"
    (its record keeps the last step reported)."""
    if metadata.stage == DONE:
        return Phase(DONE, metadata.shards_done, metadata.shards_total, "shard")
    if metadata.shards_total > 1 or not metadata.step:
        within = 0 < metadata.step_done < metadata.step_total and metadata.shards_done < metadata.shards_total
        running = metadata.step_done / metadata.step_total if within else 0.0
        return Phase(metadata.stage, metadata.shards_done, metadata.shards_total, "shard", running)
    return Phase(metadata.step, metadata.step_done, metadata.step_total, metadata.step_unit or "batch")


class ShownPhases:
    """The phases a progress display has shown, and the steps of the metadata's history (`steps`,
    in the order they ran) none of them covers: steps no poll saw running. A phase covers the step
    of its name, and a stage shown by shards covers its tasks' steps; a step that did no unit of
    work (a task's "starting", replaced by its first step) needs no showing."""

    def __init__(self):
        self.names: set[str] = set()
        self.sharded: set[str] = set()  # stages shown by shards

    def add(self, phase: Phase) -> None:
        self.names.add(phase.name)
        if phase.unit == "shard" and phase.total > 1:
            self.sharded.add(phase.name)

    def missed(self, metadata: common_pb2.OperationMetadata, current: Phase) -> list[Phase]:
        """The history's steps not shown nor covered by `current`, each as a phase at its last counts."""
        names = self.names | {current.name}
        sharded = self.sharded | ({current.name} if current.unit == "shard" and current.total > 1 else set())
        return [
            Phase(step.step, step.done, step.total, step.unit or "batch")
            for step in metadata.steps
            if step.done > 0 and step.step not in names and step.stage not in sharded
        ]


def plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("ch", "sh", "s", "x")) else "s")


SHARDS = "{l_bar}{bar}| {n:.3g}/{total_fmt} {unit}s [{elapsed}<{remaining}{postfix}]"  # a shard in parts


def _columns(stream) -> int | None:
    """The width of the terminal `stream` writes to (None: unknown, e.g. not a file)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


class StageBars:
    """Progress bars from operation metadata, one per phase (see `phase_of`), with its units/s, ETA
    and tokens/s (the operation's token counter counts every phase's tokens, so a bar shows what it
    grew by since its phase began).

    On a terminal the bars redraw in place, never backwards. When stderr is not a terminal (a log
    file, CI) or is one of no width (a 0-column pseudo-terminal, where a bar draws as a blank
    line), a bar's redraws would flood the log, so each phase prints one line when it ends instead.

    A step that began and ended between two polls (the EK-FAC correction pass of a small fit) is
    never the metadata's current step, but it is in the metadata's step history (`steps`): when a
    poll shows steps of the history no bar has shown, each gets its bar (or line), complete, at
    that poll, in the order they ran, before the phase now running."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)()) and _columns(self.stream) != 0
        self._bar = None
        self._phase: Phase | None = None
        self._started, self._start_tokens = time.monotonic(), 0
        self._shown = ShownPhases()
        self._missed = False  # the phase shown is a step that ran between two polls

    def _rate(self, tokens_processed: int) -> float:
        return (tokens_processed - self._start_tokens) / max(time.monotonic() - self._started, 1e-9)

    def __call__(self, metadata: common_pb2.OperationMetadata) -> None:
        if not self.enabled:
            return
        phase = phase_of(metadata)
        missed = self._shown.missed(metadata, phase)
        if missed or self._phase is None or phase.name != self._phase.name:
            self._end_phase(metadata)
            for step in missed:  # shown complete, each as its own phase
                self._start(step, metadata, missed=True)
                self._end_phase(metadata)
            self._start(phase, metadata)
        self._phase = phase
        if self._bar is not None:
            if metadata.tokens_processed > self._start_tokens:
                self._bar.set_postfix_str(f"{self._rate(metadata.tokens_processed):,.0f} tok/s", refresh=False)
            reached = phase.done + phase.running if phase.running else phase.done  # ints stay ints
            self._bar.update(max(0, reached - self._bar.n))

    def _start(self, phase: Phase, metadata: common_pb2.OperationMetadata, missed: bool = False) -> None:
        """Show `phase` from now (`missed`: a step that ran between two polls, about to be ended)."""
        self._phase, self._missed = phase, missed
        self._shown.add(phase)
        self._started, self._start_tokens = time.monotonic(), metadata.tokens_processed
        if phase.name != DONE and self.interactive:
            from tqdm import tqdm

            by_shards = {"bar_format": SHARDS} if phase.unit == "shard" else {}
            self._bar = tqdm(
                total=phase.total or None,
                desc=f"{phase.name:>18}",
                unit=phase.unit,
                dynamic_ncols=True,
                file=self.stream,
                **by_shards,
            )

    def _end_phase(self, metadata: common_pb2.OperationMetadata) -> None:
        """The phase that was running is over: `metadata` (of the next one) holds its last counts."""
        phase = self._phase
        if phase is None or phase.name == DONE:
            return
        rate = self._rate(metadata.tokens_processed)
        if self._bar is not None:
            if rate > 0:
                self._bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
            if self._bar.total:
                self._bar.update(self._bar.total - self._bar.n)
            self.close()
        else:
            elapsed = time.monotonic() - self._started
            tokens = f", {rate:,.0f} tok/s" if rate > 0 else ""
            took = "between two polls" if self._missed else f"in {elapsed:.1f}s{tokens}"
            line = f"{phase.name:>18}: {phase.total}/{phase.total} {plural(phase.unit)} {took}"
            print(line, file=self.stream, flush=True)

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


def fit_passes(factors_dir: Path) -> str:
    """Every pass of a fit with its seconds ("covariance 75.4s, eigen 1.1s, correction 30.2s"), from
    the factor set's provenance: the fit's summary line."""
    timings = json.loads((factors_dir / "manifest.json").read_text())["metadata"].get("provenance", {}).get("timings")
    return ", ".join(f"{step} {seconds:.1f}s" for step, seconds in (timings or {}).items())


class JsonProgress:
    """`--json`'s progress: one JSON object per line on stdout (flushed) whenever an operation's
    phase or counts change: {"event": "progress", "kind", "phase", "done", "total", "unit",
    "tokens"}; a step no poll saw running (the metadata's step history) with its last counts,
    before the phase now running. Same interface as StageBars."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self._last: dict | None = None
        self._shown = ShownPhases()

    def __call__(self, metadata: common_pb2.OperationMetadata) -> None:
        if not self.enabled:
            return
        phase = phase_of(metadata)
        for shown in [*self._shown.missed(metadata, phase), phase]:  # steps no poll saw, first
            self._shown.add(shown)
            event = {
                "event": "progress",
                "kind": metadata.kind,
                "phase": shown.name,
                "done": shown.done,
                "total": shown.total,
                "unit": shown.unit,
                "tokens": metadata.tokens_processed,
            }
            if event != self._last:
                print(json.dumps(event), file=self.stream, flush=True)
                self._last = event

    def close(self, clear: bool = False) -> None:
        pass

    def __enter__(self) -> JsonProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass
