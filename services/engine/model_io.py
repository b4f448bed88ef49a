"""Loading a local Hugging Face causal LM and fingerprinting it.

Models and tokenizers come only from local directories (no hub downloads): `local_files_only`
is always set, so a hub id fails at once with a clear error. Weights load from safetensors only
(a directory holding only pickle-based `pytorch_model.bin` is refused: unpickling runs code), and
never with a model's own Python code unless the operator allowed it.

A PEFT adapter directory (`adapter_config.json` beside `adapter_model.safetensors`) loads as its
base model (the local directory its config names, under the same access policy) with the adapter
applied (peft's PeftModel, imported only then); its tokenizer is the adapter's own when it saved
one, else the base's. A merged adapter (merge_and_unload, save_pretrained) is an ordinary model.

`set_model_access(ModelAccess(roots, allow_remote_code))` is the process's policy (`influence
serve/worker --model-roots --allow-remote-code`); every load goes through `ModelAccess.check`.
With roots, a path outside them is refused with one message whether or not it exists, so a
caller cannot probe the server's filesystem. Without roots (the embedded mode, and a server whose
operator gave none) any local directory loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError, NotFoundError
from . import modules
from .modules import weight_parameter_name

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class ModelRef:
    """How to load and run a model: a local Hugging Face directory, a device ("" in a job: the
    device of the worker that runs the task) and a dtype; with an adapter directory in `path`,
    `base` may name its base model's directory ("": the one its config names)."""

    path: str
    device: str = "cpu"
    dtype: str = "float32"
    base: str = ""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise InputError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def parse_device(name: str | torch.device) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device '{name}' (cpu or cuda)")
    return device


@dataclass(frozen=True)
class ModelAccess:
    """Where models may load from (`roots`: absolute directories; empty: anywhere) and whether a
    model's own code (`trust_remote_code`) may run."""

    roots: tuple[Path, ...] = ()
    allow_remote_code: bool = False

    @classmethod
    def parse(cls, roots: str, allow_remote_code: bool = False) -> ModelAccess:
        """From `DIR[:DIR...]` (--model-roots / INFLUENCE_MODEL_ROOTS); each must be an existing directory."""
        parsed = []
        for root in (part for part in roots.split(os.pathsep) if part):
            path = Path(root).resolve()
            if not path.is_dir():
                raise InputError(f"--model-roots: {root} is not a directory")
            parsed.append(path)
        return cls(tuple(parsed), allow_remote_code)

    def check(self, model_dir: str | Path) -> Path:
        """The directory to load; InputError, the same whether or not it exists, when it lies
        outside every root (symbolic links resolved, so none leads out)."""
        path = Path(model_dir)
        if not self.roots:
            return path
        resolved = Path(os.path.realpath(path)) if path.is_absolute() else None
        if resolved is None or not any(resolved == root or root in resolved.parents for root in self.roots):
            raise InputError(
                f"model path {str(model_dir)!r} is not allowed: this server loads models only from the "
                "directories its operator configured (--model-roots), given as absolute paths"
            )
        return resolved


_access = ModelAccess()


def set_model_access(access: ModelAccess) -> None:
    """The policy of this process (a server or worker sets it once, at start)."""
    global _access
    _access = access


def model_access() -> ModelAccess:
    return _access


def load_model_and_tokenizer(
    model_dir: str | Path, device: str = "cpu", dtype: str = "float32", tokenizer=None, base: str = ""
):
    """Load `AutoModelForCausalLM` and `AutoTokenizer` from a local directory, in eval mode.

    Returns (model, tokenizer). The tokenizer always has a pad token id (eos, else 0). A
    `tokenizer` already loaded from `model_dir` (by `load_tokenizer`) is used as it is. `base`:
    an adapter's base model directory instead of the one its config names.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own bars report progress; theirs would garble one-line errors
    access = model_access()
    model_dir = access.check(model_dir)
    if not model_dir.is_dir():
        raise NotFoundError(f"model directory not found: {model_dir}")
    torch_dtype = parse_dtype(dtype)
    torch_device = parse_device(device)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir, base)
    adapter, model_dir = (
        (model_dir, adapter_base(model_dir, base)) if is_adapter_dir(model_dir, base) else (None, model_dir)
    )
    if not any(model_dir.glob("*.safetensors")):
        pickled = sorted(path.name for path in model_dir.iterdir() if path.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise InputError(
            f"{model_dir} holds no safetensors weights"
            + (f" (only {', '.join(pickled)}: pickle files, which this system never loads)" if pickled else "")
            + "; save the model with save_pretrained(..., safe_serialization=True)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            local_files_only=True,
            dtype=torch_dtype,
            # the tracked modules are linear maps: none needs attention's internals, so a GPU runs
            # SDPA (no B·H·T² probabilities kept for the backward); the CPU keeps eager, the
            # arithmetic its reference tests were written against
            attn_implementation="sdpa" if torch_device.type == "cuda" else "eager",
            use_safetensors=True,  # never unpickle weights
            trust_remote_code=access.allow_remote_code,
        )
    except Exception as error:
        raise InputError(f"cannot load a causal language model from {model_dir}: {_first_line(error)}") from None
    if adapter is not None:
        model = _with_adapter(model, adapter)
    model.to(torch_device)
    model.eval()
    return model, tokenizer


def model_skeleton(model_dir: str | Path, dtype: str = "float32", base: str = "") -> torch.nn.Module:
    """The model of a local directory built from its config on the meta device: its modules and
    shapes, no weights read and no memory taken (what a fit's plan needs at submission). An
    adapter directory gives its base's skeleton (the LoRA matrices are small beside it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM

    access = model_access()
    model_dir = access.check(model_dir)
    if is_adapter_dir(model_dir, base):
        model_dir = adapter_base(model_dir, base)
    try:
        config = AutoConfig.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=access.allow_remote_code
        )
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                config, dtype=parse_dtype(dtype), trust_remote_code=access.allow_remote_code
            )
    except Exception as error:
        raise InputError(
            f"cannot read a causal language model's config from {model_dir}: {_first_line(error)}"
        ) from None


def module_names(model_dir: str | Path) -> set[str] | None:
    """The module names of the model a local directory's config describes (model_skeleton: no
    weights read): what a factor set's modules can be checked against before anything loads. None
    when the skeleton cannot be built here (e.g. remote code) or the directory is an adapter (its
    LoRA modules exist only once peft applies it): the check is then the worker's, with the weights."""
    if is_adapter_dir(model_dir):
        return None
    try:
        model = model_skeleton(model_dir)
    except InputError:  # the full load, later, says what is wrong with the directory
        return None
    return modules.module_names(model)


ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(model_dir: str | Path, base: str = "") -> bool:
    """A PEFT adapter directory (its adapter_config.json), not a model of its own; InputError when
    a `base` is given for a directory that is no adapter."""
    adapter = (Path(model_dir) / ADAPTER_CONFIG).is_file()
    if base and not adapter:
        raise InputError(f"a base model is for a PEFT adapter directory; {model_dir} has no {ADAPTER_CONFIG}")
    return adapter


def adapter_base(adapter_dir: Path, base: str = "") -> Path:
    """The adapter's base model directory: `base` when given, else the one its config names
    (`base_model_name_or_path`): a local directory (no hub ids), checked against the access policy
    like any model path."""
    if base:
        if not model_access().check(base).is_dir():
            raise NotFoundError(f"base model directory not found: {base}")
        return Path(base).resolve()
    try:
        base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""
    except (OSError, ValueError) as error:
        raise InputError(f"{adapter_dir / ADAPTER_CONFIG} is unreadable: {_first_line(error)}") from None
    path = Path(base)
    if not path.is_absolute():
        path = (adapter_dir / path) if (adapter_dir / path).is_dir() else path
    if not base or not path.is_dir():
        raise NotFoundError(
            f"the adapter at {adapter_dir} names base model {base!r}, which is no local directory: give the "
            f"base's directory (--base-model DIR), or set base_model_name_or_path in its {ADAPTER_CONFIG}"
        )
    return model_access().check(path.resolve())


def _with_adapter(model: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """`model` with the adapter at `adapter_dir` applied (weights from safetensors only)."""
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise InputError(
            f"{adapter_dir} holds no adapter_model.safetensors; save the adapter with "
            "save_pretrained(..., safe_serialization=True)"
        )
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except Exception as error:
        raise InputError(f"cannot apply the adapter at {adapter_dir}: {_first_line(error)}") from None


def load_tokenizer(model_dir: str | Path, base: str = ""):
    """Only the tokenizer of a local model directory (with a pad token id, as above); an adapter's
    own, else its base's (`base`, or the one its config names)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    access = model_access()
    model_dir = access.check(model_dir)
    if not model_dir.is_dir():
        raise NotFoundError(f"model directory not found: {model_dir}")
    if is_adapter_dir(model_dir, base) and not (model_dir / "tokenizer_config.json").is_file():
        model_dir = adapter_base(model_dir, base)  # an adapter saved without a tokenizer uses its base's
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=access.allow_remote_code
        )
    except Exception as error:
        raise InputError(f"cannot load a tokenizer from {model_dir}: {_first_line(error)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary and special tokens."""
    vocabulary = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]
    return hashlib.sha256(json.dumps([vocabulary, special]).encode()).hexdigest()


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def model_fingerprint(model: torch.nn.Module, tracked_names: list[str] | None = None) -> str:
    """A sha256 identifying the model's architecture and weights, cheap enough for large models.

    Hashes the config (without fields that describe how it was loaded: path, dtype, attention
    implementation, library version), every parameter's name and shape, and a strided sample of
    up to 4096 values of each tracked module's weight (of every parameter when none are named; of
    a fused experts parameter once for all its experts).
    Fine-tuning or re-initialising the model changes those values, so factors fitted for one
    model are recognised as foreign to another.

    Depends only on the model: not on the order of `tracked_names` (they are sorted), nor on the
    device, nor on the dtype it was loaded in (float32, float64 and bfloat16 loads of one
    checkpoint agree: samples are hashed rounded to bfloat16). `directory_fingerprint` computes
    the same from a model directory without loading it.
    """
    config = getattr(model, "config", None)
    parameters = dict(model.named_parameters())
    return _fingerprint(
        config.to_dict() if config is not None else None,
        getattr(model, "peft_config", {}),
        {name: tuple(parameter.shape) for name, parameter in parameters.items()},
        tracked_names,
        lambda name, indices: parameters[name].detach().reshape(-1)[indices.to(parameters[name].device)],
    )


def _fingerprint(config: dict | None, adapters: dict, shapes: dict[str, tuple], tracked_names, sample) -> str:
    """`model_fingerprint` of a model described by its config dict, peft adapters' configs,
    parameter shapes (name -> shape) and `sample(name, indices)`: the values at `indices` (int64
    [n]) of the flattened parameter `name`."""
    digest = hashlib.sha256()
    if config is not None:
        config_dict = {key: value for key, value in config.items() if key not in _LOAD_ONLY_CONFIG_KEYS}
        digest.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    for name, adapter in sorted(adapters.items()):  # an adapter's rank, scale, targets
        settings = {key: value for key, value in adapter.to_dict().items() if key not in _ADAPTER_LOAD_ONLY_KEYS}
        digest.update(name.encode() + json.dumps(settings, sort_keys=True, default=_sorted_set).encode())
    for name in sorted(shapes):
        digest.update(f"{name}:{shapes[name]};".encode())
    sampled = {weight_parameter_name(n, shapes) for n in tracked_names} if tracked_names else set(shapes)
    # a LoRA matrix's fingerprint covers the base weight it adapts (…q_proj.base_layer.weight)
    sampled |= {_base_weight(name) for name in sampled if _base_weight(name) in shapes}
    for name in sorted(sampled):
        numel = math.prod(shapes[name])
        indices = torch.arange(0, numel, max(1, numel // 4096), dtype=torch.int64)[:4096]
        values = sample(name, indices).to(device="cpu").to(torch.bfloat16)
        digest.update(name.encode() + b"\0" + values.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def directory_fingerprint(model_dir: str | Path, tracked_names: list[str]) -> str | None:
    """`model_fingerprint(model, tracked_names)` of the model a local directory holds, without
    loading it: the config and shapes from its skeleton (no weights), the sampled values read
    from its safetensors files (only the pages that hold them). None where that cannot be the
    loaded model's (an adapter, a skeleton that cannot be built here, a checkpoint whose tensors
    are not the model's parameters as they are named, e.g. converted at load, or not in
    safetensors files): the worker's check, with the weights loaded, is then the only one."""
    if is_adapter_dir(model_dir):
        return None
    try:
        skeleton = model_skeleton(model_dir)
    except InputError:
        return None
    shapes = {name: tuple(parameter.shape) for name, parameter in skeleton.named_parameters()}
    stored = _safetensors_entries(Path(model_dir))
    if any(name not in stored or stored[name].shape != shape for name, shape in shapes.items()):
        return None
    return _fingerprint(
        skeleton.config.to_dict(), {}, shapes, tracked_names, lambda name, indices: stored[name].values(indices)
    )


@dataclass(frozen=True)
class _StoredTensor:
    """A tensor in a safetensors file: read element by element through a memory map."""

    path: Path
    offset: int  # of its first byte in the file
    dtype: str  # the safetensors dtype: F32, F16, BF16, F64
    shape: tuple[int, ...]

    def values(self, indices: torch.Tensor) -> torch.Tensor:
        """The flattened tensor's values at `indices` (int64 [n])."""
        import numpy as np

        numpy_dtype = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}[self.dtype]
        array = np.memmap(self.path, dtype=numpy_dtype, mode="r", offset=self.offset, shape=(math.prod(self.shape),))
        picked = torch.from_numpy(np.ascontiguousarray(array[indices.numpy()]))
        return picked.view(torch.bfloat16) if self.dtype == "BF16" else picked


def _safetensors_entries(model_dir: Path) -> dict[str, _StoredTensor]:
    """Every floating-point tensor of the directory's *.safetensors files, by name (their
    headers read, no data)."""
    entries = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__" and entry["dtype"] in ("F32", "F16", "BF16", "F64"):
                start = 8 + length + entry["data_offsets"][0]
                entries[name] = _StoredTensor(path, start, entry["dtype"], tuple(entry["shape"]))
    return entries


def _sorted_set(value):
    """JSON for what json cannot write: a set (peft's target_modules) sorted, so that the hash seed
    of the process does not change it; anything else as its str."""
    return sorted(value, key=str) if isinstance(value, (set, frozenset)) else str(value)


def _base_weight(name: str) -> str:
    """The base layer's weight beside a LoRA matrix's ("….lora_A.default.weight" -> "….base_layer.weight")."""
    head, _, _ = name.partition(".lora_")
    return f"{head}.base_layer.weight" if head != name else ""


# Fingerprints already computed per model object and module set: a worker that keeps a model
# loaded checks factor sets against it (and describes it to a fit's model-free stages) without
# re-hashing the weights for every task.
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_fingerprint(model: torch.nn.Module, names: Sequence[str]) -> str:
    """`model_fingerprint(model, names)`, computed once per model object and module set."""
    known = _FINGERPRINTS.setdefault(model, {})
    key = tuple(sorted(names))
    if key not in known:
        known[key] = model_fingerprint(model, list(key))
    return known[key]


# Adapter config fields that say where it was loaded from or how it runs, not what it is.
_ADAPTER_LOAD_ONLY_KEYS = frozenset(("base_model_name_or_path", "revision", "inference_mode", "runtime_config"))
# Config fields that say how a checkpoint was loaded or saved, not what the model is.
_LOAD_ONLY_CONFIG_KEYS = frozenset(
    ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation", "attn_implementation")
)
