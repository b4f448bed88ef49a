"""Factors on disk: one safetensors file per module plus manifest.json, written last.

manifest.json:
    format_version, kind "factors", strategy, fisher, model_fingerprint, n_sequences, n_tokens,
    damping_policy (the default used at score time), modules {name: {d_in, d_out, has_bias,
    transposed, file}}, files {file: sha256}, metadata (e.g. the fit config).
Tensors are stored in float64 when the factors are float64 (exact tests) and float32 otherwise.
`to_artifact` / `from_artifact` convert to and from (manifest, {file: tensors}) so other
stores (object storage) reuse the same format; `save_factors` / `load_factors` use a directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .errors import InputError, NotFoundError, PreconditionError
from .factors import FactorSet, ModuleFactors
from .modules import TrackedModule

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _file_name(module_name: str) -> str:
    return f"{module_name}.safetensors"


def to_artifact(factor_set: FactorSet, storage_dtype: torch.dtype = torch.float32) -> tuple[dict, dict[str, bytes]]:
    """(manifest, {file name: safetensors bytes}) for a factor set."""
    files: dict[str, bytes] = {}
    modules = {}
    for name, tracked in factor_set.modules.items():
        tensors = {
            key: value.detach().to("cpu", storage_dtype).contiguous()
            for key, value in factor_set.factors[name].tensors().items()
        }
        file_name = _file_name(name)
        files[file_name] = save_safetensors_bytes(tensors) if tensors else save_safetensors_bytes({})
        modules[name] = {
            "d_in": tracked.d_in,
            "d_out": tracked.d_out,
            "has_bias": tracked.has_bias,
            "transposed": tracked.transposed,
            "file": file_name,
        }
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "factors",
        "strategy": factor_set.strategy,
        "fisher": factor_set.fisher,
        "model_fingerprint": factor_set.model_fingerprint,
        "n_sequences": factor_set.n_sequences,
        "n_tokens": factor_set.n_tokens,
        "storage_dtype": str(storage_dtype).removeprefix("torch."),
        "damping_policy": "0.1 x mean eigenvalue per module unless --damping-factor/--damping say otherwise",
        "modules": modules,
        "files": {file_name: hashlib.sha256(data).hexdigest() for file_name, data in files.items()},
        "metadata": factor_set.metadata,
    }
    return manifest, files


def from_artifact(manifest: dict, read_file) -> FactorSet:
    """Rebuild a FactorSet; `read_file(name) -> bytes`. Verifies every file's sha256."""
    if manifest.get("kind") != "factors" or manifest.get("format_version") != FORMAT_VERSION:
        raise InputError("not a factors artifact of a supported format version")
    tracked, factors = {}, {}
    for name, info in manifest["modules"].items():
        tracked[name] = TrackedModule(name, info["d_in"], info["d_out"], info["has_bias"], info["transposed"])
        data = read_file(info["file"])
        expected = manifest["files"].get(info["file"])
        if hashlib.sha256(data).hexdigest() != expected:
            raise PreconditionError(f"factor file {info['file']} is corrupted (sha256 mismatch)")
        tensors = load_safetensors_bytes(data)
        factors[name] = ModuleFactors(**{key: tensors[key] for key in ModuleFactors.TENSOR_FIELDS if key in tensors})
    return FactorSet(
        strategy=manifest["strategy"],
        fisher=manifest["fisher"],
        modules=tracked,
        factors=factors,
        n_sequences=manifest["n_sequences"],
        n_tokens=manifest["n_tokens"],
        model_fingerprint=manifest["model_fingerprint"],
        metadata=manifest.get("metadata", {}),
    )


def storage_dtype_for(factor_set: FactorSet) -> torch.dtype:
    """float64 when the factors were fitted from a float64 model, else float32."""
    return torch.float64 if factor_set.metadata.get("model_dtype") == "float64" else torch.float32


def save_factors(factor_set: FactorSet, out_dir: str | Path) -> Path:
    """Write the factor files, then manifest.json last (a reader never sees half a factor set)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest, files = to_artifact(factor_set, storage_dtype_for(factor_set))
    stale = out_dir / MANIFEST
    if stale.exists():
        stale.unlink()
    for file_name, data in files.items():
        _atomic_write(out_dir / file_name, data)
    _atomic_write(out_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return out_dir


def load_factors(directory: str | Path) -> FactorSet:
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise NotFoundError(f"no factors at {directory} (missing {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{manifest_path} is not valid JSON: {error.msg}") from None

    def read_file(name: str) -> bytes:
        path = directory / name
        if not path.is_file():
            raise NotFoundError(f"factor file missing: {path}")
        return path.read_bytes()

    return from_artifact(manifest, read_file)


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_bytes(data)
    os.replace(temporary, path)
