"""Logging setup for every pxcluster process: text for people, or one JSON object a line.

In JSON, every field passed with `extra=` (volume, epoch, node, ...) becomes a top-level key,
so a log pipeline can select a volume's lines without parsing messages."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ms = int(record.msecs)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{ts}.{ms:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # default=str: a log line must never be lost because an extra is not JSON-native.
        return json.dumps(out, default=str, separators=(",", ":"))


def setup(level: int | str, log_format: str = "text") -> None:
    if log_format not in ("text", "json"):
        raise ValueError(f"unknown log format {log_format!r}")
    if log_format == "text":
        logging.basicConfig(level=level, format=TEXT_FORMAT, force=True)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
