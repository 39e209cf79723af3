"""Request bodies: a JSON object whose fields are checked by name, type and range before any
of them reaches the service layer, so bad input is a 400 with the field named, never a 500.

Every number is bounded here: an unbounded integer stored in etcd would break whatever later
turns it into a float (an iops limit of 10**400 made /metrics fail)."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from aiohttp import web

from pxcluster import inputs
from pxcluster.errors import InvalidArgument, PxcError
from pxcluster.units import parse_rate, parse_size

MAX_BODY = 64 << 10  # bytes; also the app's client_max_size
BODY_TIMEOUT = 10.0  # s to receive a whole body: a client trickling it holds a handler
MAX_DIGITS = 20  # of a JSON integer: int() of a long digit string is quadratic, then refused


class BodyTimeout(PxcError):
    """The client did not send its body in time (answered 408)."""


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise InvalidArgument(f"request body has a number of over {MAX_DIGITS} digits")
    return int(text)


def _no_constant(name: str) -> Any:
    raise InvalidArgument(f"request body has {name}: only finite numbers are taken")


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_int=_bounded_int, parse_constant=_no_constant)
    except RecursionError:
        # A deeply nested body ([[[[...) exhausts the decoder's stack before any field check.
        raise InvalidArgument("request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"request body is not valid JSON: {e}") from None


def _field(key: str) -> str:
    # A field name echoed in an error: quoted and cut short unless it is short and plain.
    return key if len(key) <= 60 and key.isprintable() else inputs.shown(key)


class Body:
    def __init__(self, fields: dict[str, Any]) -> None:
        self._fields = fields

    @classmethod
    async def read(cls, request: web.Request, allowed: frozenset[str]) -> Body:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise InvalidArgument(f"request body over {MAX_BODY} bytes")
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                raw = await request.read()
        except TimeoutError:
            raise BodyTimeout(f"request body not received within {BODY_TIMEOUT:g} s") from None
        if not raw.strip():
            return cls({})
        value = parse_json(raw)
        if not isinstance(value, dict):
            raise InvalidArgument("request body must be a JSON object")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise InvalidArgument(
                f"unknown field(s) {', '.join(_field(k) for k in unknown[:5])}; "
                f"allowed: {', '.join(sorted(allowed))}"
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

    def volume_name(self, key: str) -> str:
        return inputs.volume_name(self.required_string(key))

    def snapshot_name(self, key: str) -> str:
        return inputs.snapshot_name(self.required_string(key))

    def node_name(self, key: str, *, required: bool) -> str | None:
        value = self.string(key, required=required)
        return None if value is None else inputs.node_name(value)

    def boolean(self, key: str, default: bool) -> bool:
        return bool(self._get(key, bool, "true or false", default))

    def integer(self, key: str, default: int, *, low: int, high: int) -> int:
        value = int(self._get(key, int, "an integer", default))
        return inputs.integer(value, f"field {key!r}", low, high)

    def optional_integer(self, key: str, *, low: int, high: int) -> int | None:
        value = self._get(key, int, "an integer", None)
        return None if value is None else inputs.integer(int(value), f"field {key!r}", low, high)

    def optional_limit(self, key: str, *, high: int) -> int | None:
        value = self._get(key, int, "an integer", None)
        return None if value is None else inputs.limit(int(value), f"field {key!r}", high)

    def number(self, key: str, default: float, *, low: float, high: float) -> float:
        value = self._get(key, (int, float), "a number", default)
        # Compared before float(): float(10**400) raises OverflowError.
        infinite = isinstance(value, float) and not math.isfinite(value)
        if infinite or not low <= value <= high:
            raise InvalidArgument(f"field {key!r} must be between {low:g} and {high:g}")
        return float(value)

    def optional_rate(self, key: str, *, maximum: int) -> int | None:
        """Bytes/s as an integer or a string like 100M; 0 means unlimited."""
        value = self._get(key, (int, str), "bytes/s as an integer, or a string like 100M", None)
        if value is None:
            return None
        if isinstance(value, str):
            return parse_rate(value, maximum=maximum)
        return inputs.limit(value, f"field {key!r}", maximum)

    def size(self, key: str, *, maximum: int) -> int:
        value = self._get(
            key, (int, str), "a size: bytes as an integer, or a string like 512M", None
        )
        if value is None:
            raise InvalidArgument(f"field {key!r} is required")
        if isinstance(value, str):
            return parse_size(value, maximum=maximum)
        if value > maximum:
            raise InvalidArgument(f"field {key!r}: size {value} over the maximum {maximum}")
        # Zero and negative sizes are the service's to refuse (with its multiple-of-512 rule).
        return int(value)
