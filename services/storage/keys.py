"""Object keys: '/'-separated names, the same rules for every backend.

A key is relative ("factors/f1/manifest.json"), has no empty, "." or ".." segment, and no
segment starts with "." (LocalStore keeps its temporary files under such names, so they
can never collide with a key nor show up in a listing). A prefix is any string that a key
may start with; "" means everything.
"""

from __future__ import annotations

from ..errors import InputError

MAX_KEY_BYTES = 1024  # the S3 limit


def check_key(key: str) -> str:
    """`key` unchanged if valid, else InputError naming the problem."""
    if not isinstance(key, str) or not key:
        raise InputError(f"invalid key {key!r}: keys are non-empty strings")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InputError(f"invalid key {key[:60]!r}...: longer than {MAX_KEY_BYTES} bytes")
    if "\\" in key or "\x00" in key:
        raise InputError(f"invalid key {key!r}: backslashes and NUL are not allowed")
    for segment in key.split("/"):
        if not segment or segment.startswith("."):
            raise InputError(
                f"invalid key {key!r}: segments must be non-empty and must not start with '.' (no '/x', 'a//b', '..')"
            )
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: "" or the start of a valid key ("jobs/", "jobs/a", "factors/f1/")."""
    if prefix == "":
        return prefix
    if not isinstance(prefix, str):
        raise InputError(f"invalid prefix {prefix!r}")
    # Every complete segment must be valid; the last, partial one may be empty ("jobs/").
    head, _, tail = prefix.rpartition("/")
    if head:
        check_key(head)
    if tail:
        check_key(tail)
    return prefix


def as_directory(prefix: str) -> str:
    """`prefix` with exactly one trailing '/' (artifact prefixes name a directory); "" stays ""
    (the store's root is the artifact, e.g. a local directory that holds one factor set)."""
    prefix = prefix.rstrip("/")
    if not prefix:
        return ""
    check_key(prefix)
    return prefix + "/"
