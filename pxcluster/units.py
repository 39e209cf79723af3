"""Sizes as operators write them: 512M, 10G, 4096."""

from __future__ import annotations

import re

from pxcluster.errors import InvalidArgument

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if m is None:
        raise InvalidArgument(
            f"invalid size {text!r}: use a number with K, M, G, T or P (e.g. 512M)"
        )
    value = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if value <= 0:
        raise InvalidArgument(f"invalid size {text!r}: must be greater than zero")
    return value


def format_size(n: int) -> str:
    for unit in ("P", "T", "G", "M", "K"):
        scale = _UNITS[unit]
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    for unit in ("P", "T", "G", "M", "K"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.1f}{unit}"
    return str(n)
