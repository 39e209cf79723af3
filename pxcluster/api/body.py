"""Request bodies: a JSON object whose fields are checked by name and type before any of them
reaches the service layer, so bad input is a 400 with the field named, never a 500."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from pxcluster.errors import InvalidArgument
from pxcluster.units import parse_size

MAX_BODY = 64 << 10


class Body:
    def __init__(self, fields: dict[str, Any]) -> None:
        self._fields = fields

    @classmethod
    async def read(cls, request: web.Request, allowed: frozenset[str]) -> Body:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise InvalidArgument(f"request body over {MAX_BODY} bytes")
        raw = await request.read()
        if not raw.strip():
            return cls({})
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"request body is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise InvalidArgument("request body must be a JSON object")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise InvalidArgument(
                f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
            )
        return cls(value)

    def _get(self, key: str, kind: type | tuple[type, ...], what: str, default: Any) -> Any:
        if key not in self._fields or (self._fields[key] is None and default is None):
            return default
        value = self._fields[key]
        # bool is an int subclass: {"repl": true} must not pass as 1.
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise InvalidArgument(f"field {key!r} must be {what}")
        return value

    def string(self, key: str, *, required: bool = False) -> str | None:
        value = self._get(key, str, "a string", None)
        if value is None and required:
            raise InvalidArgument(f"field {key!r} is required")
        if value is not None and not value:
            raise InvalidArgument(f"field {key!r} must not be empty")
        return value  # type: ignore[no-any-return]

    def required_string(self, key: str) -> str:
        value = self.string(key, required=True)
        assert value is not None
        return value

    def boolean(self, key: str, default: bool) -> bool:
        return bool(self._get(key, bool, "true or false", default))

    def integer(self, key: str, default: int) -> int:
        return int(self._get(key, int, "an integer", default))

    def number(self, key: str, default: float, *, low: float, high: float) -> float:
        value = float(self._get(key, (int, float), "a number", default))
        if not low <= value <= high:
            raise InvalidArgument(f"field {key!r} must be between {low:g} and {high:g}")
        return value

    def optional_integer(self, key: str) -> int | None:
        value = self._get(key, int, "an integer", None)
        return None if value is None else int(value)

    def optional_rate(self, key: str) -> int | None:
        """Bytes/s as an integer or a string like 100M; 0 means unlimited."""
        value = self._get(key, (int, str), "bytes/s as an integer, or a string like 100M", None)
        if value is None or isinstance(value, int):
            return value
        return 0 if value.strip() == "0" else parse_size(value)

    def size(self, key: str) -> int:
        value = self._get(
            key, (int, str), "a size: bytes as an integer, or a string like 512M", None
        )
        if value is None:
            raise InvalidArgument(f"field {key!r} is required")
        return value if isinstance(value, int) else parse_size(value)
