"""What the tests share and are not tests: servers started for them (servers/), reference
implementations and tolerances for the engine (reference, numerics, families, tiny), the system's
test workspace and cluster (system), helm rendering (helm), a manual clock (clock), and the
worker process that kills itself (doomed_worker)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
