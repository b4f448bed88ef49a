"""Checks of request fields shared by the servicers; each failure is an InputError naming the field."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..engine.model_io import model_access
from ..errors import InputError, NotFoundError

_RESOURCE = re.compile(r"^(datasets|factorSets|indexes|results|operations)/([A-Za-z0-9_-]{1,64})$")


def resource_id(name: str, collection: str, field: str) -> str:
    """The id in "{collection}/{id}", or a InputError naming the field."""
    match = _RESOURCE.match(name or "")
    if not match or match.group(1) != collection:
        raise InputError(f"{field} must look like '{collection}/ID', got {name!r}")
    return match.group(2)


def model_path(spec, field: str = "model.path") -> str:
    if not spec.path:
        raise InputError(f"{field} is required (a model directory readable by the workers)")
    model_access().check(spec.path)  # before looking at the filesystem: no probing outside the roots
    if not Path(spec.path).is_dir():
        raise NotFoundError(f"model directory not found: {spec.path}")
    if spec.device not in ("", "cpu", "cuda"):
        raise InputError(f"model.device must be cpu or cuda, got {spec.device!r}")
    if spec.dtype not in ("", "float32", "float64", "bfloat16", "float16"):
        raise InputError(f"model.dtype must be float32, bfloat16, float16 or float64, got {spec.dtype!r}")
    return spec.path


def positive(value: int, field: str, default: int, maximum: int | None = None) -> int:
    if value < 0:
        raise InputError(f"{field} must be >= 0, got {value}")
    value = value or default
    if maximum is not None and value > maximum:
        raise InputError(f"{field} must be <= {maximum}, got {value}")
    return value


def page(page_size: int, page_token: str) -> tuple[int, int]:
    if page_size < 0:
        raise InputError(f"page_size must be >= 0, got {page_size}")
    try:
        offset = int(page_token or 0)
    except ValueError:
        raise InputError(f"invalid page_token {page_token!r}") from None
    if offset < 0:
        raise InputError(f"invalid page_token {page_token!r}")
    return min(page_size or 50, 500), offset


def file_uri(uri: str, field: str) -> Path:
    """The absolute path of a "file:///abs/path" URI (InputError naming the field otherwise)."""
    parsed = urlparse(uri or "")
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
        raise InputError(f"{field} must be a file:///absolute/path URI, got {uri!r}")
    return Path(unquote(parsed.path))
