"""Where a step's tensors live, how exactly its device computes, and whether a GPU is usable.

**The placement rule.** A step (FitModel, Scorer, Indexer) computes on its model's device
(`self.device`). Everything it is handed from elsewhere — factors and eigenbases, prepared
queries, index-space queries, cached captures: CPU tensors as the store, a cache or a file returns
them — is moved there by `to_device` at the step's entry, before any kernel sees it: the factors
(as `Preconditioner`s) and eigenbases once per task, prepared queries once per call. Kernels (the
functions that do the arithmetic; tests/engine/test_device_placement.py lists and runs every one of them
on fake CUDA tensors) take tensors on one device and never move them. Results reach the host in
one place each: `sums.RunningSums.to_host` (a pass's sums, once per task), and the scores `.to("cpu")`
per batch.

Code that reads values (finiteness checks, counts of real tokens, the damping λ from mean Λ, the
singular-curvature check, top-k, TF-IDF) stays outside kernels: on the host before placement
(damping, singularity: `precondition.preconditioner`) or on results already on the host.

**Exact arithmetic.** TF32 (10-bit mantissas in float32 matmuls on Ampere and later GPUs, on by
default for cuDNN and forced on by some container images) would round grams, rotations and
scores far beyond float32's 1e-7. `exact_arithmetic()` turns it off for the work it wraps (every
step's public method) and puts the process's settings back once no step is running; what was in
effect is `arithmetic_provenance()`, which every factor set's provenance records.

**The worker's check.** `cuda_problem()` says why this process cannot compute on CUDA (no GPU,
no driver, a driver older than the CUDA build needs, a GPU the build has no kernels for), or None.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

import torch


def to_device(value, device: torch.device | str):
    """`value` with every tensor in it on `device`: a tensor, or dicts, lists, tuples and dataclass
    instances of them (rebuilt, never changed in place); anything else as it is. A tensor already
    there is returned as it is (no copy)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_device(item, device) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [field.name for field in dataclasses.fields(value) if field.init]
        return dataclasses.replace(value, **{name: to_device(getattr(value, name), device) for name in fields})
    return value


def host_to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device`; to a GPU from pinned memory without blocking the host (kernels
    queued after it on the same stream wait for it, the host does not): a pageable copy would be a
    synchronisation per batch."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def release_device_memory(device: torch.device | str) -> None:
    """Give the CUDA caching allocator's free blocks back (after an out-of-memory error, before the
    retry at a lower batch size); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


class _ExactArithmetic:
    """TF32 off (cuBLAS matmuls, cuDNN, float32 matmul precision "highest") while any step runs.

    The settings are process-wide, and several workers may run steps on threads of one process,
    so the first step to enter saves them and turns TF32 off and the last to leave restores them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: tuple[bool, bool, str] | None = None

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                self._saved = (
                    torch.backends.cuda.matmul.allow_tf32,
                    torch.backends.cudnn.allow_tf32,
                    torch.get_float32_matmul_precision(),
                )
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
                torch.set_float32_matmul_precision("highest")
            self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._saved is not None:
                matmul, cudnn, precision = self._saved
                torch.backends.cuda.matmul.allow_tf32 = matmul
                torch.backends.cudnn.allow_tf32 = cudnn
                torch.set_float32_matmul_precision(precision)
                self._saved = None

    def __call__(self, function):
        """As a decorator: the function runs inside the scope."""

        def exact(*args, **kwargs):
            with self:
                return function(*args, **kwargs)

        exact.__name__, exact.__qualname__, exact.__doc__ = function.__name__, function.__qualname__, function.__doc__
        exact.__wrapped__ = function
        return exact


EXACT_ARITHMETIC = _ExactArithmetic()


def exact_arithmetic() -> _ExactArithmetic:
    """The TF32-off scope: `with exact_arithmetic(): ...`, or `@exact_arithmetic()` on a function."""
    return EXACT_ARITHMETIC


def tf32_settings() -> dict:
    """TF32 as it is in effect now: cuBLAS matmuls, cuDNN, the float32 matmul precision, and
    whether the environment forces cuBLAS TF32 on (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE, which no
    setting can undo)."""
    return {
        "matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "tf32_forced_by_environment": os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "") == "1",
    }


def arithmetic_provenance(device: torch.device | str) -> dict:
    """What a factor set records of how it was computed: the device (and GPU), torch and CUDA
    versions, and the TF32 settings in effect inside `exact_arithmetic`."""
    device = torch.device(device)
    with exact_arithmetic():
        tf32 = tf32_settings()
    record = {
        "device": device.type,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "",
        "tf32": tf32["matmul_tf32"] or tf32["cudnn_tf32"] or tf32["tf32_forced_by_environment"],
    }
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def driver_version() -> str:
    """The NVIDIA kernel driver's version, from /proc (no CUDA call), or "" when none is loaded."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return ""
    for word in text.split():
        if word.count(".") >= 1 and word.replace(".", "").isdigit():
            return word
    return ""


def cuda_problem() -> str | None:
    """Why this process cannot compute on CUDA, in one line, or None when it can: torch built
    without CUDA, no usable GPU or driver (torch.cuda.is_available() is False, e.g. a driver older
    than the CUDA the build needs), or a GPU that cannot run a small matmul (no kernels for its
    architecture, a broken device)."""
    driver = driver_version() or "none loaded"
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return (
            f"torch.cuda.is_available() is False (torch {torch.__version__} built for CUDA {torch.version.cuda}; "
            f"NVIDIA driver {driver}): no GPU visible, or its driver is too old for this CUDA"
        )
    try:
        properties = torch.cuda.get_device_properties(0)
        probe = torch.ones(8, 8, device="cuda")
        total = float((probe @ probe).sum())
    except Exception as error:  # any failure here means the device cannot run our kernels
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        return f"CUDA is available but a test matmul failed (driver {driver}): {first_line}"
    if total != 512.0:
        return f"CUDA is available but {properties.name} computed a wrong test matmul ({total} != 512)"
    return None
