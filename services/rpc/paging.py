"""Pagination (AIP-158): page tokens are opaque to callers and bound to the list that made them.

A token encodes (scope, position): the scope names the collection and filter of the request, so a
token passed to another list, or with another filter, is refused (INVALID_ARGUMENT) rather than
silently returning a wrong page; a token that does not decode is refused the same way.
"""

from __future__ import annotations

import base64
import binascii
import json

from ..errors import InputError

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def page_size(requested: int) -> int:
    """0 -> the default (50); at most 500; negative: InputError."""
    if requested < 0:
        raise InputError("page_size must be >= 0", field="page_size")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def make_token(scope: str, position: str) -> str:
    raw = json.dumps({"s": scope, "p": position}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def read_token(token: str, scope: str) -> str | None:
    """The position a token continues from (None for the first page)."""
    if not token:
        return None
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        token_scope, position = decoded["s"], decoded["p"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InputError("page_token is not one this server issued", field="page_token") from None
    if token_scope != scope or not isinstance(position, str):
        raise InputError("page_token belongs to another list or filter", field="page_token")
    return position
