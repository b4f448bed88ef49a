"""open_store: a store from a URL, the one way services and workers pick their backend.

    /some/dir, ./dir, file:///some/dir              -> LocalStore
    s3://bucket?endpoint=host:port[&secure=1][&region=r] -> S3Store
S3 credentials come from the environment: INFLUENCE_S3_ACCESS_KEY / INFLUENCE_S3_SECRET_KEY,
else with INFLUENCE_S3_CREDENTIALS=chain the minio SDK's chain (AWS_* env, ~/.aws, web identity
as with EKS IRSA, the ECS or EC2 role: S3Store.credential_chain), else AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, else none (anonymous requests).
"""

from __future__ import annotations

import os
import urllib.parse

from ..errors import InputError
from .base import ArtifactStore
from .local import LocalStore
from .retry import RetryPolicy

_S3_OPTIONS = {"endpoint", "secure", "region"}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def open_store(url: str, *, retry: RetryPolicy | None = None, connect_timeout: float = 5.0) -> ArtifactStore:
    """The store `url` names (see the module docstring); `retry` and `connect_timeout` apply to S3."""
    if not url:
        raise InputError("empty store URL")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InputError(f"store URL {url!r}: file URLs need an absolute path (file:///dir)")
        return LocalStore(urllib.parse.unquote(parsed.path))
    if parsed.scheme == "s3":
        return _s3_store(url, parsed, retry, connect_timeout)
    if "://" in url:
        raise InputError(f"unsupported store URL {url!r}: use a directory, file:///dir or s3://bucket?endpoint=...")
    return LocalStore(url)


def _s3_store(url: str, parsed: urllib.parse.SplitResult, retry: RetryPolicy | None, connect_timeout: float):
    from .s3 import S3Store

    options = {name: values[-1] for name, values in urllib.parse.parse_qs(parsed.query, keep_blank_values=True).items()}
    unknown = sorted(set(options) - _S3_OPTIONS)
    if unknown:
        raise InputError(f"store URL {url!r}: unknown option(s) {unknown} (known: {sorted(_S3_OPTIONS)})")
    if not parsed.netloc or parsed.path not in ("", "/"):
        raise InputError(f"store URL {url!r}: expected s3://bucket?endpoint=host:port")
    if not options.get("endpoint"):
        raise InputError(f"store URL {url!r}: needs ?endpoint=host:port")
    secure = options.get("secure", "0").lower()
    if secure not in _TRUE | _FALSE:
        raise InputError(f"store URL {url!r}: secure must be 0 or 1, got {secure!r}")
    mode = os.environ.get("INFLUENCE_S3_CREDENTIALS", "")
    if mode not in ("", "chain"):
        raise InputError(f"INFLUENCE_S3_CREDENTIALS must be chain or empty, got {mode!r}")
    access_key, secret_key = os.environ.get("INFLUENCE_S3_ACCESS_KEY"), os.environ.get("INFLUENCE_S3_SECRET_KEY")
    chain = None
    if mode == "chain" and not (access_key or secret_key):
        chain = S3Store.credential_chain(connect_timeout)
    else:  # each INFLUENCE_S3_* variable wins over its AWS_* one
        access_key = access_key or os.environ.get("AWS_ACCESS_KEY_ID")
        secret_key = secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY")
    return S3Store(
        options["endpoint"],
        parsed.netloc,
        access_key,
        secret_key,
        credentials=chain,
        secure=secure in _TRUE,
        region=options.get("region") or "us-east-1",
        retry=retry,
        connect_timeout=connect_timeout,
    )
