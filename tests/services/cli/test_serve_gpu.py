"""`influence serve --workers N` on a GPU: the servicers plan each worker with 1/N of the GPU
(engine/budget.py, INFLUENCE_WORKERS_PER_GPU), so N model copies must fit or a job is refused at
submission. No server: the workers are stand-ins with a worker's context device."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

from services.cli.servers import share_the_gpu


def workers(*devices: str):
    return [SimpleNamespace(context=SimpleNamespace(device=device)) for device in devices]


def test_workers_on_one_gpu_share_it_and_say_so(monkeypatch, caplog):
    monkeypatch.setenv("INFLUENCE_WORKERS_PER_GPU", "1")  # restored (unset) after the test
    monkeypatch.delenv("INFLUENCE_WORKERS_PER_GPU")
    with caplog.at_level(logging.WARNING, "influence.serve"):
        share_the_gpu(workers("cuda", "cuda", "cuda"))
    assert os.environ["INFLUENCE_WORKERS_PER_GPU"] == "3"
    assert "3 workers share one GPU" in caplog.text and "--workers 1" in caplog.text


def test_one_gpu_worker_or_cpu_workers_leave_the_budget_alone(monkeypatch):
    monkeypatch.setenv("INFLUENCE_WORKERS_PER_GPU", "1")  # restored (unset) after the test
    monkeypatch.delenv("INFLUENCE_WORKERS_PER_GPU")
    share_the_gpu(workers("cuda"))
    share_the_gpu(workers("cpu", "cpu", "cpu"))
    assert "INFLUENCE_WORKERS_PER_GPU" not in os.environ
