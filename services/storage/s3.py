"""S3Store: the artifact store in an S3 bucket, through the minio SDK (path-style requests).

Every operation runs under one retry policy (retry.py): the SDK's HTTP pool retries nothing
itself, so a dead endpoint costs `policy.attempts` quick failures, not attempts x urllib3's 5.
Errors become the domain errors of errors.py; the S3 error code stays in the message.
"""

from __future__ import annotations

import copy
import http.client
import io
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

from ..errors import DomainError, InputError, NotFoundError, PermissionDeniedError, StorageError
from . import traffic
from .base import ArtifactStore, ObjectInfo
from .keys import check_key, check_prefix
from .retry import RetryPolicy, Transient, call_with_retries

T = TypeVar("T")

_CHUNK = 1 << 20
_MISSING = {"NoSuchKey", "NoSuchObject"}
_DENIED = {"PermissionDeniedError", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
_NETWORK_ERRORS = (http.client.HTTPException, ConnectionError, TimeoutError)  # plus urllib3's, imported lazily
_TRANSIENT = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "OperationAborted", "Throttling"}


class S3Store(ArtifactStore):
    """Objects in `bucket` at `endpoint` ("host:port"); the bucket is created if missing.
    Credentials: static keys, or a minio credentials `Provider` (e.g. `credential_chain()`), or
    neither (anonymous requests)."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        access_key: str | None,
        secret_key: str | None,
        secure: bool = False,
        region: str = "us-east-1",
        *,
        credentials=None,
        retry: RetryPolicy | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 120.0,
    ):
        import urllib3
        from minio import Minio

        self.endpoint, self.bucket, self.secure, self.region = endpoint, bucket, secure, region
        self.retry = retry or RetryPolicy()
        self._pool = pool = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=urllib3.Retry(total=0, redirect=0, raise_on_status=False),
            maxsize=8,
        )
        try:
            self.client = Minio(
                endpoint,
                access_key=access_key or None,
                secret_key=secret_key or None,
                credentials=None if access_key else credentials,
                secure=secure,
                region=region,
                http_client=pool,
            )
        except ValueError as error:
            raise InputError(f"invalid S3 endpoint {endpoint!r}: {error}") from None
        self._call("create bucket", None, self._ensure_bucket)

    def close(self) -> None:
        self._pool.clear()

    def in_bucket(self, bucket: str) -> S3Store:
        """A view of `bucket` on the same endpoint, client and credentials (not created if missing;
        closing the view closes this store's connections too)."""
        if bucket == self.bucket:
            return self
        view = copy.copy(self)
        view.bucket = bucket
        return view

    @staticmethod
    def credential_chain(connect_timeout: float = 5.0):
        """The minio SDK's credential chain, first that answers: AWS_ACCESS_KEY_ID/SECRET (+ session
        token), MINIO_ACCESS_KEY/SECRET, ~/.aws/credentials, then IAM: a web identity token
        (AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN: EKS IRSA, and any OIDC workload identity),
        the ECS container endpoint, or the instance's role. Credentials are refreshed before
        they expire."""
        import urllib3
        from minio.credentials import providers

        metadata = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=connect_timeout),
            retries=urllib3.Retry(total=1, backoff_factor=0.2),
        )
        return providers.ChainedProvider(
            [
                providers.EnvAWSProvider(),
                providers.EnvMinioProvider(),
                providers.AWSConfigProvider(),
                providers.IamAwsProvider(http_client=metadata),
            ]
        )

    # -- plumbing -----------------------------------------------------------------------

    def _ensure_bucket(self) -> None:
        from minio.error import S3Error

        try:
            if self.client.bucket_exists(bucket_name=self.bucket):
                return
            self.client.make_bucket(bucket_name=self.bucket)
        except S3Error as error:
            if error.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):  # created concurrently
                raise
        except ValueError as error:  # the SDK validates bucket names
            if "fetch credentials" in str(error):  # the credential chain found none (_translate)
                raise
            raise InputError(f"invalid bucket name {self.bucket!r}: {error}") from None

    def _call(self, what: str, key: str | None, operation: Callable[[], T]) -> T:
        """Run `operation` under the retry policy, translating SDK errors to domain errors."""

        def attempt() -> T:
            try:
                return operation()
            except DomainError:
                raise
            except Exception as error:
                translated = self._translate(error, what, key)
                if translated is None:
                    raise
                raise translated from None

        return call_with_retries(attempt, self.retry, what + (f" {key!r}" if key else ""), self.describe())

    def _translate(self, error: Exception, what: str, key: str | None) -> Exception | None:
        """The domain error (or Transient) for an SDK/network error; None: not ours, re-raise."""
        import urllib3
        from minio.error import InvalidResponseError, S3Error, ServerError

        if isinstance(error, ValueError) and "fetch credentials" in str(error):  # the chain found none
            return PermissionDeniedError(
                f"{what} on {self.describe()}: no S3 credentials found by the chain (AWS_* or MINIO_* env, "
                "~/.aws, a web identity token, the ECS or instance role)"
            )
        status = None
        code = None
        if isinstance(error, S3Error):
            code, status = error.code, getattr(error.response, "status", None)
        elif isinstance(error, ServerError):
            status = error.status_code
        elif isinstance(error, InvalidResponseError):
            status = getattr(error, "_code", None)
        elif isinstance(error, (*_NETWORK_ERRORS, urllib3.exceptions.HTTPError)):
            return Transient(error)
        else:
            return None
        if code in _MISSING:
            return NotFoundError(f"no object at {key!r}")
        if code == "NoSuchBucket":
            return NotFoundError(f"bucket {self.bucket!r} does not exist")
        if code in _DENIED or status == 403:
            return PermissionDeniedError(
                f"object store {self.describe()} refused access ({code or status}) during {what}: check the "
                "credentials (INFLUENCE_S3_ACCESS_KEY / INFLUENCE_S3_SECRET_KEY) and their permissions on the bucket"
            )
        if code in _TRANSIENT or (status is not None and (status >= 500 or status == 429)):
            return Transient(error)
        return StorageError(f"object store {self.describe()}: {what} failed: {code or status}: {error}")

    # -- writes -------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> None:
        check_key(key)
        data = bytes(data)
        self._call(
            "put",
            key,
            lambda: self.client.put_object(
                bucket_name=self.bucket, object_name=key, data=io.BytesIO(data), length=len(data)
            ),
        )
        traffic.count("s3", "written", len(data))

    def put_file(self, key: str, path: str | Path) -> None:
        check_key(key)
        source = Path(path)
        if not source.is_file():
            raise NotFoundError(f"cannot upload {source}: no such file")
        with open(source, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size

            def upload():
                handle.seek(0)  # a retry starts over
                self.client.put_object(
                    bucket_name=self.bucket, object_name=key, data=handle, length=size, num_parallel_uploads=1
                )

            self._call("put_file", key, upload)
        traffic.count("s3", "written", size)

    # -- reads --------------------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        check_key(key)

        def read() -> bytes:
            response = self.client.get_object(bucket_name=self.bucket, object_name=key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        data = self._call("get", key, read)
        traffic.count("s3", "read", len(data))
        return data

    def get_file(self, key: str, path: str | Path) -> Path:
        check_key(key)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")

        def download() -> None:
            response = self.client.get_object(bucket_name=self.bucket, object_name=key)
            try:
                with open(temporary, "wb") as handle:  # "wb": a retry starts over
                    for chunk in response.stream(_CHUNK):
                        handle.write(chunk)
            finally:
                response.close()
                response.release_conn()

        try:
            self._call("get_file", key, download)
            traffic.count("s3", "read", temporary.stat().st_size)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        return target

    def stat(self, key: str) -> ObjectInfo:
        check_key(key)
        found = self._call("stat", key, lambda: self.client.stat_object(bucket_name=self.bucket, object_name=key))
        if found.is_dir:
            raise NotFoundError(f"no object at {key!r}")
        return ObjectInfo(key, int(found.size))

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except NotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)

        def names() -> list[str]:
            found = self.client.list_objects(bucket_name=self.bucket, prefix=prefix or None, recursive=True)
            return [item.object_name for item in found if not item.is_dir]

        return sorted(self._call("list", prefix, names))

    # -- deletes ------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        check_key(key)
        self._call("delete", key, lambda: self.client.remove_object(bucket_name=self.bucket, object_name=key))

    def delete_prefix(self, prefix: str) -> int:
        from minio.deleteobjects import DeleteObject

        if not check_prefix(prefix):
            raise InputError("delete_prefix needs a non-empty prefix (refusing to empty the whole bucket)")
        keys = self.list(prefix)

        def remove() -> None:
            errors = list(
                self.client.remove_objects(bucket_name=self.bucket, delete_object_list=[DeleteObject(k) for k in keys])
            )
            if errors:
                first = errors[0]
                raise StorageError(
                    f"object store {self.describe()}: could not delete {len(errors)} of {len(keys)} objects under "
                    f"{prefix!r}, e.g. {first.name!r}: {first.code}: {first.message}"
                )

        if keys:
            self._call("delete_prefix", prefix, remove)
        return len(keys)

    def describe(self) -> str:
        secure = "&secure=1" if self.secure else ""
        region = f"&region={self.region}" if self.region != "us-east-1" else ""
        return f"s3://{self.bucket}?endpoint={self.endpoint}{secure}{region}"


def split_s3_uri(uri: str, field: str, *, prefix: bool = False) -> tuple[str, str]:
    """(bucket, key) of "s3://bucket/key", or with `prefix` also of "s3://bucket/dir/" (a key
    ending in "/"); InputError naming the field otherwise."""
    parsed = urlparse(uri or "")
    key = unquote(parsed.path.lstrip("/"))
    if parsed.scheme != "s3" or not parsed.netloc or not key or (key.endswith("/") and not prefix) or parsed.query:
        shape = "s3://BUCKET/KEY or s3://BUCKET/PREFIX/" if prefix else "s3://BUCKET/KEY"
        raise InputError(f"{field} must look like {shape}, got {uri!r}", field=field)
    return parsed.netloc, key
