"""Who is calling: bearer tokens checked on every RPC, and the caller's tenant for the servicers.

`influence serve --auth-tokens FILE` names a file of `TOKEN TENANT` lines (`#` starts a
comment). `TokenFile` re-reads it when its mtime changes (checked at most every
`recheck_seconds`), so tokens rotate without a restart; a file that became unreadable or invalid
keeps the previous tokens (and says so in the log, never quoting the file). Tokens are kept only
as SHA-256 digests, and never logged.

`AuthInterceptor` (a grpc.aio server interceptor) lets health checks and reflection through,
answers any other call without a valid `authorization: Bearer TOKEN` with UNAUTHENTICATED, and
runs the call with `current_tenant()` set to the token's tenant. Without --auth-tokens there is
no interceptor and every call is the DEFAULT_TENANT's (the layout that existed before tenants).
"""

from __future__ import annotations

import contextvars
import hashlib
import inspect
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from ..errors import InputError, UnauthenticatedError, message_of
from ..wire import DEFAULT_TENANT
from .status import status_code

log = logging.getLogger("influence.auth")

TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# services every caller may use without a token: Kubernetes probes and tooling discovery
EXEMPT_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.")
MIN_TOKEN_CHARS = 16

_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("influence_tenant", default=DEFAULT_TENANT)


def current_tenant() -> str:
    """The tenant of the call being served (DEFAULT_TENANT without authentication)."""
    return _tenant.get()


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


def bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = (value if isinstance(value, str) else value.decode()).partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks `authorization: Bearer TOKEN` on every call but health and reflection."""

    def __init__(self, tokens: TokenFile):
        self.tokens = tokens

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(EXEMPT_SERVICES):
            return handler
        token = bearer_token(details.invocation_metadata)
        tenant = self.tokens.tenant_of(token) if token else None
        if tenant is None:
            reason = "an invalid token" if token else "no 'authorization: Bearer TOKEN' metadata"
            log.debug("refused %s: %s", details.method, reason)
            return _refusing(
                handler,
                UnauthenticatedError(
                    f"{details.method}: {reason}; this server needs a token (INFLUENCE_TOKEN or --token)"
                ),
            )
        return _as_tenant(handler, tenant)


def _replace(handler: grpc.RpcMethodHandler, wrap_unary, wrap_stream) -> grpc.RpcMethodHandler:
    """The handler with its behaviour wrapped (wrap_stream for response-streaming methods)."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer
    )


def _refusing(handler: grpc.RpcMethodHandler, error: UnauthenticatedError) -> grpc.RpcMethodHandler:
    async def refuse(request, context):
        await context.abort(status_code(error), message_of(error))

    async def refuse_stream(request, context):
        await context.abort(status_code(error), message_of(error))
        yield  # pragma: no cover (an async generator, like the handler it replaces)

    return _replace(handler, lambda _: refuse, lambda _: refuse_stream)


def _as_tenant(handler: grpc.RpcMethodHandler, tenant: str) -> grpc.RpcMethodHandler:
    """The handler, run with current_tenant() == tenant (each call is its own asyncio task)."""

    def wrap_unary(behaviour):
        async def unary(request, context):
            _tenant.set(tenant)
            result = behaviour(request, context)
            return await result if inspect.isawaitable(result) else result

        return unary

    def wrap_stream(behaviour):
        async def streaming(request, context):
            _tenant.set(tenant)
            async for item in behaviour(request, context):
                yield item

        return streaming

    return _replace(handler, wrap_unary, wrap_stream)


def token_file_from_env(path: str) -> TokenFile | None:
    """TokenFile of --auth-tokens (or INFLUENCE_AUTH_TOKENS), or None when neither is set."""
    path = path or os.environ.get("INFLUENCE_AUTH_TOKENS", "")
    return TokenFile(path) if path else None
