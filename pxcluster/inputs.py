"""What operators and API clients may hand us: names, ports, addresses and numeric limits.

The one place these bounds live; the CLI (pxcluster.cli.params) and the REST API
(pxcluster.api.body) both check against them, so a value refused by one is refused by the
other, with the same words. Each check returns the value or raises InvalidArgument naming it.
"""

from __future__ import annotations

import ipaddress
import math
import re

from pxcluster.errors import InvalidArgument

MAX_NAME = 63  # bytes: a DNS label's limit, also what etcd keys and NBD export names carry well
# Volume, node and cluster names: they end up in etcd keys, NBD export names, file names
# and URIs, so no '/', no '..', no whitespace, no upper case.
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# Snapshot names also take upper case, '.' and '_' (scheduled ones are auto-<UTC time>).
_SNAPSHOT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")

MAX_VOLUME_SIZE = 1 << 50  # bytes (pxcluster.service.core refuses larger volumes too)
MAX_IOPS = 10**9  # ops/s per volume: far above any device, far below a float's range
MAX_BANDWIDTH = 1 << 50  # bytes/s per volume or per rebuild
PORT_RANGE = (1, 65535)


def shown(value: object) -> str:
    """A value quoted for a one-line error, cut short so a huge value cannot flood it."""
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def dns_label(value: str, what: str) -> str:
    if not _DNS_LABEL.fullmatch(value):
        raise InvalidArgument(
            f"invalid {what} {shown(value)}: use a DNS label "
            f"(a-z, 0-9, '-' inside, 1..{MAX_NAME} characters)"
        )
    return value


def volume_name(value: str) -> str:
    return dns_label(value, "volume name")


def node_name(value: str) -> str:
    """A node's name, or its id (12 hex digits, a DNS label too)."""
    return dns_label(value, "node name")


def cluster_name(value: str) -> str:
    return dns_label(value, "cluster name")


def snapshot_name(value: str) -> str:
    if not _SNAPSHOT.fullmatch(value):
        raise InvalidArgument(
            f"invalid snapshot name {shown(value)}: letters, digits, '.', '_', '-', "
            f"starting with a letter or digit, at most {MAX_NAME}"
        )
    return value


def port(value: int, what: str) -> int:
    low, high = PORT_RANGE
    if not low <= value <= high:
        raise InvalidArgument(f"invalid {what} {shown(value)}: a TCP port is {low}..{high}")
    return value


def ip_address(value: str, what: str) -> str:
    """An IP address (v4 or v6), normalised; host names are refused: every listener binds on
    exactly the address given, and whether it is loopback must be known without DNS."""
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise InvalidArgument(f"invalid {what} {shown(value)}: not an IP address") from None


def is_loopback(address: str) -> bool:
    """127.0.0.0/8 or ::1 (a host name is not: it may resolve anywhere)."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def integer(value: int, what: str, low: int, high: int) -> int:
    if not low <= value <= high:
        if high - low < 5:
            *head, last = (str(n) for n in range(low, high + 1))
            allowed = f"{', '.join(head)} or {last}" if head else last
        else:
            allowed = f"{low}..{high}"
        raise InvalidArgument(f"invalid {what} {shown(value)}: must be {allowed}")
    return value


def limit(value: int, what: str, high: int) -> int:
    """An I/O limit: 0 is unlimited."""
    if not 0 <= value <= high:
        raise InvalidArgument(
            f"invalid {what} {shown(value)}: limits must be 0 (unlimited) or positive, "
            f"at most {high}"
        )
    return value


def seconds(value: float, what: str, low: float, high: float) -> float:
    """A finite number of seconds in [low, high] (NaN and infinities compare false and would
    pass a plain range test)."""
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidArgument(f"invalid {what} {shown(value)}: must be {low:g}..{high:g} s")
    return value
