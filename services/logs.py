"""Logging for long-running processes (`influence serve`, `influence worker`): plain text for a
terminal, or one JSON object per line for a log collector (`--log-format json`)."""

from __future__ import annotations

import json
import logging
import time

_TEXT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    """{"time": RFC 3339 UTC, "level", "logger", "message", "process", "thread"[, "exception"]}."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "thread": record.threadName,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Root logging at `level` (debug, info, warning, error) in `log_format` (text or json)."""
    from .errors import InputError

    if log_format not in ("text", "json"):
        raise InputError(f"--log-format takes text or json, got {log_format!r}")
    if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise InputError(f"--log-level takes debug, info, warning or error, got {level!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
