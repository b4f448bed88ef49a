"""What every service's messages share: timestamps, and responses packed in google.protobuf.Any.
Each service builds its own resource messages (factor_svc/messages.py, ...)."""

from __future__ import annotations

from google.protobuf import any_pb2, empty_pb2, timestamp_pb2


def timestamp(seconds: float | None) -> timestamp_pb2.Timestamp:
    """`seconds` since the epoch (unset when None or 0)."""
    stamp = timestamp_pb2.Timestamp()
    if seconds:
        stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def packed(message) -> bytes:
    """A message wrapped in google.protobuf.Any, serialised (an operation's stored response)."""
    wrapper = any_pb2.Any()
    wrapper.Pack(message)
    return wrapper.SerializeToString()


def empty_response() -> bytes:
    """The response of a job whose output is not a resource (e.g. StreamBlocks' blocks job)."""
    return packed(empty_pb2.Empty())
