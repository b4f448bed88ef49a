"""Job-system errors (domain errors: no gRPC here)."""

from ..engine.errors import EngineError


class QueueUnavailable(EngineError):
    """Redis did not answer (callers may retry later)."""
