"""Checks of request fields shared by the servicers (and the register task); each failure names the
field: an InputError, or a ResourceExhaustedError for a value over a limit this server's operator set."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..engine.model_io import model_access
from ..errors import InputError, NotFoundError, ResourceExhaustedError
from ..wire import REQUEST_LIMITS, RESOURCE_ID

_OPERATION = re.compile(f"operations/({RESOURCE_ID})")


def operation_id(name: str, field: str = "name") -> str:
    """The id in "operations/{id}", or an InputError naming the field. (The names of the resources
    the services share are parsed by their catalog modules: catalog.datasets.parse_dataset_path, ...)"""
    match = _OPERATION.fullmatch(name or "")
    if not match:
        raise InputError(f"{field} must look like 'operations/ID', got {name!r}", field=field)
    return match.group(1)


def model_path(spec, field: str = "model.path") -> str:
    if not spec.path:
        raise InputError(f"{field} is required (a model directory readable by the workers)", field=field)
    return model_directory(spec.path, field)


def model_directory(path: str, field: str) -> str:
    """`path`, a model directory the access policy allows and the filesystem holds."""
    model_access().check(path)  # before looking at the filesystem: no probing outside the roots
    _usable(Path(path), field)
    if not Path(path).is_dir():
        raise NotFoundError(f"model directory not found: {path}")
    return path


def _usable(path: Path, field: str) -> Path:
    """`path`, if the filesystem can look it up at all (InputError for a name too long, ...)."""
    try:
        path.exists()
    except OSError as error:
        raise InputError(f"{field} is no path this server can look up ({error.strerror})", field=field) from None
    return path


def positive(value: int, field: str, default: int, maximum: int | None = None) -> int:
    if value < 0:
        raise InputError(f"{field} must be >= 0, got {value}", field=field)
    value = value or default
    if maximum is not None and value > maximum:
        raise InputError(f"{field} must be <= {maximum}, got {value}", field=field)
    return value


def within_limit(value: int, limit: int, name: str, what: str, field: str = "", advice: str = "") -> int:
    """`value` unless it is over `limit`, this server's wire.REQUEST_LIMITS entry `name` (0: no limit):
    then a ResourceExhaustedError that says what the request has (`what`, e.g. "the dataset has 12
    sequences"), the limit and the flag that sets it, and then `advice` if any."""
    if limit and value > limit:
        message = f"{what}; this server's limit is {limit} ({REQUEST_LIMITS[name].flag})"
        raise ResourceExhaustedError(message + (f": {advice}" if advice else ""), field=field)
    return value


def file_uri(uri: str, field: str) -> Path:
    """The absolute path of a "file:///abs/path" URI (InputError naming the field otherwise)."""
    parsed = urlparse(uri or "")
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
        raise InputError(f"{field} must be a file:///absolute/path URI, got {uri!r}", field=field)
    return _usable(Path(unquote(parsed.path)), field)
