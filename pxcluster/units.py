"""Sizes as operators write them: 512M, 10G, 4096."""

from __future__ import annotations

import re

from pxcluster.errors import InvalidArgument

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
# At most 19 digits: int() of a 5,000-digit string raises (Python's int_max_str_digits) and
# nothing we size comes near 10**19 bytes anyway.
_SIZE = re.compile(r"\s*(\d{1,19})\s*([KMGTP]?)(?:I?B)?\s*", re.IGNORECASE)
MAX_SIZE = 1 << 60  # 1 EiB: larger than any disk, volume or rate we take


def _shown(text: str) -> str:
    """`text` quoted for an error line, cut short: a 5,000-character value must not make the
    one error line 5,000 characters long."""
    return repr(text if len(text) <= 40 else text[:40] + "...")


def parse_size(text: str, *, maximum: int = MAX_SIZE) -> int:
    m = _SIZE.fullmatch(text)
    if m is None:
        raise InvalidArgument(
            f"invalid size {_shown(text)}: use a number with K, M, G, T or P (e.g. 512M)"
        )
    value = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if value <= 0:
        raise InvalidArgument(f"invalid size {_shown(text)}: must be greater than zero")
    if value > maximum:
        raise InvalidArgument(
            f"invalid size {_shown(text)}: at most {format_size(maximum)} ({maximum} bytes)"
        )
    return value


def parse_rate(text: str, *, maximum: int = MAX_SIZE) -> int:
    """Bytes/s like 100M; "0" means unlimited."""
    if text.strip() == "0":
        return 0
    return parse_size(text, maximum=maximum)


def format_size(n: int) -> str:
    for unit in ("P", "T", "G", "M", "K"):
        scale = _UNITS[unit]
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    for unit in ("P", "T", "G", "M", "K"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.1f}{unit}"
    return str(n)
