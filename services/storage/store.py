"""The artifact store: keys are '/'-separated paths; values are bytes.

Both backends behave the same: `put_bytes` replaces atomically (a reader sees the old or the
new value, never a mix), `get_bytes` raises NotFoundError for a missing key, `list(prefix)` is
recursive and sorted. Publishing an artifact = writing its files, then its manifest
(services/system/stages.py), so a reader that finds the manifest finds every file.
"""

from __future__ import annotations

import io
import os
import time
import urllib.parse
from pathlib import Path

from .errors import NotFoundError, StorageError, StorageUnavailable


class ArtifactStore:
    """Interface; see the module docstring."""

    def put_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def describe(self) -> str:
        raise NotImplementedError


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or ".." in key.split("/"):
        raise StorageError(f"invalid artifact key {key!r}")
    return key


class LocalStore(ArtifactStore):
    """Files under a root directory (the embedded default)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"no artifact at {key}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        start = base if base.is_dir() else base.parent
        if not start.exists():
            return []
        keys = []
        for path in start.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def describe(self) -> str:
        return f"file://{self.root}"


class S3Store(ArtifactStore):
    """An S3 bucket through the minio SDK (path-style; region us-east-1 by default).

    Transient failures (connection errors, 5xx, throttling) are retried `retries` times with
    exponential backoff, then raise StorageUnavailable.
    """

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        access_key: str | None,
        secret_key: str | None,
        *,
        secure: bool = False,
        region: str = "us-east-1",
        retries: int = 4,
        backoff: float = 0.25,
    ):
        import urllib3
        from minio import Minio

        self.endpoint, self.bucket, self.retries, self.backoff = endpoint, bucket, retries, backoff
        # One retry policy (ours, below): the SDK's pool would otherwise retry 5 more times per attempt.
        pool = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=300), retries=urllib3.Retry(total=0, redirect=0), maxsize=16
        )
        self.client = Minio(
            endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region, http_client=pool
        )
        self._retry(self._ensure_bucket)

    def _ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except Exception as error:  # created concurrently by another process
                if getattr(error, "code", "") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def _retry(self, operation, *args):
        from minio.error import S3Error, ServerError

        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return operation(*args)
            except S3Error as error:
                if error.code in ("NoSuchKey", "NoSuchObject"):
                    raise NotFoundError(f"no artifact at {args[0] if args else '?'}") from None
                if error.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                    raise StorageError(f"object store refused access to bucket {self.bucket}: {error.code}") from None
                if error.code not in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"):
                    raise StorageError(f"object store error: {error.code}: {error.message}") from None
                failure = error
            except (ServerError, OSError) as error:  # 5xx, connection refused/reset, timeouts
                failure = error
            except Exception as error:
                if type(error).__module__.startswith("urllib3"):
                    failure = error
                else:
                    raise
            if attempt < self.retries:
                time.sleep(delay)
                delay *= 2
        raise StorageUnavailable(
            f"object store at {self.endpoint} unavailable after {self.retries + 1} attempts: "
            f"{type(failure).__name__}: {str(failure).splitlines()[0][:200] if str(failure) else ''}"
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        _check_key(key)
        self._retry(lambda k: self.client.put_object(self.bucket, k, io.BytesIO(data), len(data)), key)

    def get_bytes(self, key: str) -> bytes:
        _check_key(key)

        def read(k):
            response = self.client.get_object(self.bucket, k)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._retry(read, key)

    def exists(self, key: str) -> bool:
        try:
            self._retry(lambda k: self.client.stat_object(self.bucket, k), _check_key(key))
            return True
        except NotFoundError:
            return False

    def list(self, prefix: str) -> list[str]:
        return sorted(
            self._retry(
                lambda p: [o.object_name for o in self.client.list_objects(self.bucket, prefix=p, recursive=True)],
                prefix,
            )
        )

    def delete(self, key: str) -> None:
        self._retry(lambda k: self.client.remove_object(self.bucket, k), _check_key(key))

    def describe(self) -> str:
        return f"s3://{self.bucket}?endpoint={self.endpoint}"


def open_store(url: str, *, retries: int = 4) -> ArtifactStore:
    """`file:///path` or a plain path -> LocalStore; `s3://bucket?endpoint=host:port&secure=0` -> S3Store.

    S3 credentials come from INFLUENCE_S3_ACCESS_KEY / INFLUENCE_S3_SECRET_KEY, else
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("", "file"):
        return LocalStore(parsed.path if parsed.scheme else url)
    if parsed.scheme != "s3":
        raise StorageError(f"unsupported store URL {url!r} (file:// or s3://)")
    query = urllib.parse.parse_qs(parsed.query)
    endpoint = query.get("endpoint", [""])[0]
    if not endpoint or not parsed.netloc:
        raise StorageError(f"store URL {url!r} needs a bucket and ?endpoint=host:port")
    return S3Store(
        endpoint,
        parsed.netloc,
        os.environ.get("INFLUENCE_S3_ACCESS_KEY") or os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("INFLUENCE_S3_SECRET_KEY") or os.environ.get("AWS_SECRET_ACCESS_KEY"),
        secure=query.get("secure", ["0"])[0] in ("1", "true"),
        region=query.get("region", ["us-east-1"])[0],
        retries=retries,
    )
