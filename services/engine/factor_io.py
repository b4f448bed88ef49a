"""The factor-set format: one safetensors file per module, described by JSON metadata.

    to_artifact(factor_set)  -> (metadata, {file name: {tensor name: tensor}})
    from_artifact(metadata, read_tensors) -> FactorSet

metadata:
    kind "factors", format_version, strategy, fisher, model_fingerprint, n_sequences, n_tokens,
    storage_dtype, damping_policy (the default used at score time),
    modules {name: {d_in, d_out, has_bias, transposed, file}}, provenance (e.g. the fit config).
Tensors are stored in float64 when the factors are float64 (exact tests) and float32 otherwise.
Persisting is not the engine's job: services/storage encodes each file (safetensors) and
publishes (metadata, files) as an artifact,
a manifest.json with every file's sha256 written last, in a directory or an object store alike
(services/catalog/factor_sets.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import PreconditionError
from .factors import FactorSet, ModuleFactors
from .finite import require_finite
from .modules import TrackedModule
from .strategies import get_strategy

FORMAT_VERSION = 3  # 2: order- and dtype-independent fingerprints; 3: only what preconditioning reads
KIND = "factors"


def _file_name(module_name: str) -> str:
    return f"{module_name}.safetensors"


def to_artifact(
    factor_set: FactorSet, storage_dtype: torch.dtype | None = None
) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(metadata, {file name: {tensor name: CPU tensor in storage_dtype}}) for a factor set."""
    storage_dtype = storage_dtype or storage_dtype_for(factor_set)
    files: dict[str, dict[str, torch.Tensor]] = {}
    modules = {}
    for name, tracked in factor_set.modules.items():
        tensors = {
            key: require_finite(
                value.detach().to("cpu", storage_dtype).contiguous(),
                f"the {key} of module {name} (in the {str(storage_dtype).removeprefix('torch.')} factor file)",
            )
            for key, value in factor_set.factors[name].tensors().items()
        }
        file_name = _file_name(name)
        files[file_name] = tensors
        modules[name] = {
            "d_in": tracked.d_in,
            "d_out": tracked.d_out,
            "has_bias": tracked.has_bias,
            "transposed": tracked.transposed,
            "file": file_name,
        }
    metadata = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "strategy": factor_set.strategy,
        "fisher": factor_set.fisher,
        "model_fingerprint": factor_set.model_fingerprint,
        "n_sequences": factor_set.n_sequences,
        "n_tokens": factor_set.n_tokens,
        "storage_dtype": str(storage_dtype).removeprefix("torch."),
        "damping_policy": "0.1 x mean eigenvalue per module unless --damping-factor/--damping say otherwise",
        "modules": modules,
        "provenance": factor_set.metadata,
    }
    return metadata, files


def check_metadata(metadata: dict, where: str = "factor set") -> None:
    """PreconditionError unless `metadata` describes factors of a format this code reads."""
    if not isinstance(metadata, dict) or metadata.get("kind") != KIND:
        raise PreconditionError(f"{where} is not a factor set (its manifest's metadata has no kind 'factors')")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise PreconditionError(
            f"{where} has factor format version {metadata.get('format_version')!r}; this code reads {FORMAT_VERSION}"
        )


def module_factors(
    name: str, info: dict, tensors: dict[str, torch.Tensor], strategy: str, where: str
) -> tuple[TrackedModule, ModuleFactors]:
    """One module's entry and file, checked: the tensors its strategy stores (`Strategy.stores`), of
    the shapes its entry says, all finite (PreconditionError naming the module and tensor otherwise)."""
    tracked = TrackedModule(name, info["d_in"], info["d_out"], info["has_bias"], info["transposed"])
    shapes = ModuleFactors.shapes(tracked.d_out, tracked.d_in_full)
    declared = get_strategy(strategy)
    for key in declared.stores:
        if key not in tensors:
            raise PreconditionError(f"{where}: module {name} has no tensor {key}, which {strategy} needs")
    for key, value in tensors.items():
        if key in shapes and tuple(value.shape) != shapes[key]:
            raise PreconditionError(
                f"{where}: tensor {key} of module {name} has shape {tuple(value.shape)}, expected {shapes[key]}"
            )
        require_finite(value, f"{where}: tensor {key} of module {name}", "the factor file is damaged")
    return tracked, ModuleFactors.stored_by(declared, tensors)


def from_artifact(
    metadata: dict, read_tensors: Callable[[str], dict[str, torch.Tensor]], where: str = "factor set"
) -> FactorSet:
    """Rebuild a FactorSet; `read_tensors(file name)` returns a file's tensors, checked against
    its manifest and decoded (the artifact reader does that)."""
    check_metadata(metadata, where)
    tracked, factors = {}, {}
    try:
        for name, info in metadata["modules"].items():
            tracked[name], factors[name] = module_factors(
                name, info, read_tensors(info["file"]), metadata["strategy"], where
            )
        return FactorSet(
            strategy=metadata["strategy"],
            fisher=metadata["fisher"],
            modules=tracked,
            factors=factors,
            n_sequences=metadata["n_sequences"],
            n_tokens=metadata["n_tokens"],
            model_fingerprint=metadata["model_fingerprint"],
            metadata=metadata.get("provenance", {}),
        )
    except (KeyError, TypeError) as error:
        raise PreconditionError(f"{where} has incomplete metadata ({type(error).__name__}: {error})") from None


def check_files(metadata: dict, read_tensors: Callable[[str], dict[str, torch.Tensor]], where: str) -> None:
    """Check a factor set's metadata and every module file (as from_artifact does), one module at
    a time, keeping none: an upload of any size is verified in bounded memory."""
    check_metadata(metadata, where)
    try:
        for name, info in metadata["modules"].items():
            module_factors(name, info, read_tensors(info["file"]), metadata["strategy"], where)
    except (KeyError, TypeError) as error:
        raise PreconditionError(f"{where} has incomplete metadata ({type(error).__name__}: {error})") from None


def storage_dtype_for_model(model_dtype: torch.dtype) -> torch.dtype:
    """Factors of a float64 model are stored in float64 (exact tests), every other model's in float32."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def storage_dtype_for(factor_set: FactorSet) -> torch.dtype:
    """float64 when the factors were fitted from a float64 model, else float32."""
    return torch.float64 if factor_set.metadata.get("model_dtype") == "float64" else torch.float32
