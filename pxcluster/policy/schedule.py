"""Snapshot and backup schedules: "every 1h keep 24" means one every hour, the newest 24 kept."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pxcluster.errors import InvalidArgument

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_FORM = re.compile(r"^\s*every\s+(\d+)\s*([smhdw])\s+keep\s+(\d+)\s*$")
AUTO_PREFIX = "auto-"  # names of the snapshots a schedule takes (and prunes)


@dataclass(frozen=True)
class Schedule:
    interval: int  # seconds
    keep: int

    def __str__(self) -> str:
        for unit in ("w", "d", "h", "m"):
            if self.interval % _UNITS[unit] == 0:
                return f"every {self.interval // _UNITS[unit]}{unit} keep {self.keep}"
        return f"every {self.interval}s keep {self.keep}"


def parse_schedule(text: str) -> Schedule | None:
    """None for "" or "none" (no schedule). InvalidArgument with the expected form otherwise."""
    if text.strip().lower() in ("", "none", "off"):
        return None
    m = _FORM.match(text.lower())
    if m is None:
        raise InvalidArgument(
            f"invalid schedule {text!r}: use 'every N{{s|m|h|d|w}} keep K', e.g. 'every 1h keep 24'"
        )
    interval = int(m.group(1)) * _UNITS[m.group(2)]
    keep = int(m.group(3))
    if interval < 10 or keep < 1:
        raise InvalidArgument(f"invalid schedule {text!r}: at least every 10s, keep at least 1")
    return Schedule(interval, keep)
