"""Who is calling: bearer tokens checked on every RPC, and the caller's tenant for the servicers.

`influence serve --auth-tokens FILE` names a file of `TOKEN TENANT` lines (`#` starts a
comment). `TokenFile` re-reads it when its mtime changes (checked at most every
`recheck_seconds`), so tokens rotate without a restart; a file that became unreadable or invalid
keeps the previous tokens (and says so in the log, never quoting the file). Tokens are kept only
as SHA-256 digests, and never logged.

rpc/door.py decides each call's tenant from its metadata (`tenant_of_call`) before reading its
body: health checks and reflection need no token, any other call without a valid
`authorization: Bearer TOKEN` is answered UNAUTHENTICATED, and an accepted one runs with
`current_tenant()` set to its token's tenant (`serving_as`). Without --auth-tokens every call is
the DEFAULT_TENANT's (the layout that existed before tenants).
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError, UnauthenticatedError, message_of
from ..wire import DEFAULT_TENANT

log = logging.getLogger("influence.auth")

TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# services every caller may use without a token: Kubernetes probes and tooling discovery
EXEMPT_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.")
MIN_TOKEN_CHARS = 16

_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("influence_tenant", default=DEFAULT_TENANT)


def current_tenant() -> str:
    """The tenant of the call being served (DEFAULT_TENANT without authentication)."""
    return _tenant.get()


def serving_as(tenant: str) -> None:
    """Make `tenant` the current tenant of the running call (each call is its own asyncio task)."""
    _tenant.set(tenant)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_tokens(text: str, source: str) -> dict[str, str]:
    """{sha256(token): tenant} of a tokens file's text; InputError naming the line otherwise."""
    tokens: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise InputError(f"{source} line {number}: expected 'TOKEN TENANT', got {len(parts)} fields")
        token, tenant = parts
        if len(token) < MIN_TOKEN_CHARS:
            raise InputError(f"{source} line {number}: the token is shorter than {MIN_TOKEN_CHARS} characters")
        if not TENANT_PATTERN.match(tenant):
            # not quoted: with the columns swapped it would be the token
            raise InputError(f"{source} line {number}: the tenant (second field) must be 1-64 of A-Z a-z 0-9 _ -")
        digest = _digest(token)
        if digest in tokens and tokens[digest] != tenant:
            raise InputError(f"{source} line {number}: the same token is given to two tenants")
        tokens[digest] = tenant
    if not tokens:
        raise InputError(f"{source} holds no tokens: give one 'TOKEN TENANT' pair per line")
    return tokens


class TokenFile:
    """The tokens of a file, re-read when its modification time or size changes. `clock` gives the
    monotonic seconds the re-check interval is measured in (tests pass one they advance)."""

    def __init__(self, path: str | Path, recheck_seconds: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.recheck_seconds = recheck_seconds
        self._clock = clock
        self._lock = threading.Lock()
        try:
            stat = self.path.stat()
            self._tokens = parse_tokens(self.path.read_text(encoding="utf-8"), str(self.path))
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"cannot read --auth-tokens {self.path}: {type(error).__name__}") from None
        self._signature = (stat.st_mtime_ns, stat.st_size)
        self._checked = clock()

    def tenant_of(self, token: str) -> str | None:
        """The tenant whose token this is, or None."""
        self._maybe_reload()
        return self._tokens.get(_digest(token))

    def _maybe_reload(self) -> None:
        if self._clock() - self._checked < self.recheck_seconds:
            return
        with self._lock:
            self._checked = self._clock()
            try:
                stat = self.path.stat()
                signature = (stat.st_mtime_ns, stat.st_size)
                if signature == self._signature:
                    return
                self._signature = signature  # a bad version is reported once, not every second
                self._tokens = parse_tokens(self.path.read_text(encoding="utf-8"), str(self.path))
                log.info("reloaded %s: %d tokens", self.path, len(self._tokens))
            except (OSError, UnicodeDecodeError, InputError) as error:
                # keep serving the previous tokens: a half-written file must not lock everyone out
                log.warning(
                    "keeping the previous tokens: %s",
                    message_of(error)
                    if isinstance(error, InputError)
                    else f"cannot read {self.path}: {type(error).__name__}",
                )


def tenant_of_call(tokens: TokenFile | None, method: str, metadata) -> str | None:
    """The tenant a call runs as, from its method and metadata alone: DEFAULT_TENANT without
    tokens, None for a call exempt from them (health, reflection); UnauthenticatedError when it
    needs a token and has no valid one."""
    if method.startswith(EXEMPT_SERVICES):
        return None
    if tokens is None:
        return DEFAULT_TENANT
    token = bearer_token(metadata)
    tenant = tokens.tenant_of(token) if token else None
    if tenant is None:
        reason = "an invalid token" if token else "no 'authorization: Bearer TOKEN' metadata"
        log.debug("refused %s: %s", method, reason)
        raise UnauthenticatedError(f"{method}: {reason}; this server needs a token (INFLUENCE_TOKEN or --token)")
    return tenant


def bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = (value if isinstance(value, str) else value.decode()).partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def token_file_from_env(path: str) -> TokenFile | None:
    """TokenFile of --auth-tokens (or INFLUENCE_AUTH_TOKENS), or None when neither is set."""
    path = path or os.environ.get("INFLUENCE_AUTH_TOKENS", "")
    return TokenFile(path) if path else None
