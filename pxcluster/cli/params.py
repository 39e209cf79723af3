"""click parameter types for pxcluster's options and arguments.

Each converts and bounds one kind of value with the rules of pxcluster.inputs, so a bad value
is refused by click, before any command runs, in one line naming the option and the value
(the group in pxcluster.cli prints usage errors as one line)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import click

from membership.etcd import EtcdConfigError, parse_endpoints
from pxcluster import inputs
from pxcluster.errors import InvalidArgument, PxcError
from pxcluster.policy.schedule import parse_schedule
from pxcluster.units import MAX_SIZE, parse_rate, parse_size


class _Checked(click.ParamType[Any]):
    """A string checked (and possibly converted) by a function raising PxcError."""

    def __init__(self, name: str, check: Callable[[str], Any]) -> None:
        self.name = name
        self._check = check

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value  # a default already of the right type
        try:
            return self._check(value)
        except PxcError as e:
            self.fail(str(e), param, ctx)


def checked(name: str, check: Callable[[str], Any]) -> click.ParamType[Any]:
    """A type for a string `check` accepts (it raises PxcError with the reason otherwise)."""
    return _Checked(name, check)


MAX_SECRET = 4096  # bytes read from a password or key file: /dev/zero must not fill memory


def read_secret(path: str, option: str) -> bytes:
    """A small secret file, bounded; empty is refused (an empty key or password is a mistake,
    and taking it as "none given" would quietly fall back to something weaker)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET + 1)
    except OSError as e:
        raise InvalidArgument(f"cannot read {option} {path}: {e.strerror}") from None
    if len(data) > MAX_SECRET:
        raise InvalidArgument(f"{option} {path}: over {MAX_SECRET} bytes")
    if not data.strip():
        raise InvalidArgument(f"{option} {path} is empty")
    return data


def secret_file(option: str) -> click.ParamType[Any]:
    """The contents of a small secret file (read when the options are parsed, before any
    connection is made)."""
    return _Checked("file", lambda path: read_secret(path, option))


def size(maximum: int = MAX_SIZE) -> click.ParamType[Any]:
    return _Checked("size", lambda v: parse_size(v, maximum=maximum))


def rate(maximum: int) -> click.ParamType[Any]:
    """Bytes/s like 100M; 0 is unlimited."""
    return _Checked("rate", lambda v: parse_rate(v, maximum=maximum))


VOLUME = _Checked("volume", inputs.volume_name)
NODE = _Checked("node", inputs.node_name)
SNAPSHOT = _Checked("snapshot", inputs.snapshot_name)
CLUSTER = _Checked("cluster", inputs.cluster_name)
ZONE = _Checked("zone", lambda v: v if v == "" else inputs.dns_label(v, "zone"))


class Int(click.ParamType[Any]):
    """An integer in [low, high]; click.IntRange would echo a 5,000-digit value whole."""

    name = "integer"

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            number = value
        else:
            text = str(value).strip()
            if not text.lstrip("+-").isdigit() or len(text) > 20:
                self.fail(
                    f"{inputs.shown(value)} is not a whole number in {self.low}..{self.high}",
                    param,
                    ctx,
                )
            number = int(text)
        try:
            return inputs.integer(number, "value", self.low, self.high)
        except PxcError as e:
            self.fail(str(e), param, ctx)


PORT = Int(*inputs.PORT_RANGE)


def ip_address(what: str) -> click.ParamType[Any]:
    return _Checked("address", lambda v: inputs.ip_address(v, what))


class Limit(click.ParamType[Any]):
    """An integer I/O limit, 0 = unlimited, at most `high`."""

    name = "limit"

    def __init__(self, high: int) -> None:
        self.high = high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            number = value
        else:
            text = str(value).strip()
            # A bound on digits first: int() of a 5,000-digit string raises.
            if not text.lstrip("-").isdigit():
                self.fail(
                    f"{inputs.shown(value)}: limits are whole numbers, 0 = unlimited", param, ctx
                )
            if len(text) > 20:
                self.fail(f"{inputs.shown(value)}: too large, at most {self.high}", param, ctx)
            number = int(text)
        try:
            return inputs.limit(number, "limit", self.high)
        except PxcError as e:
            self.fail(str(e), param, ctx)


class Seconds(click.ParamType[Any]):
    """A finite number of seconds in [low, high]."""

    name = "seconds"

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            self.fail(f"{inputs.shown(value)} is not a number of seconds", param, ctx)
        try:
            return inputs.seconds(number, "duration", self.low, self.high)
        except PxcError as e:
            self.fail(str(e), param, ctx)


def _etcd_endpoints(value: str) -> str:
    """One or several comma-separated endpoints, each http(s)://HOST[:PORT] or HOST[:PORT]."""
    for endpoint in (u.strip() for u in value.split(",")):
        if not endpoint:
            continue
        shown = inputs.shown(endpoint)
        try:
            parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
            port = parts.port
        except ValueError as e:  # "Invalid IPv6 URL", "Port out of range 0-65535", ...
            raise EtcdConfigError(f"bad etcd endpoint {shown}: {e}") from None
        if parts.scheme.lower() not in ("http", "https"):
            raise EtcdConfigError(f"bad etcd endpoint {shown}: use http:// or https://")
        if not parts.hostname:
            raise EtcdConfigError(f"bad etcd endpoint {shown}: no host")
        if port == 0:
            raise EtcdConfigError(f"bad etcd endpoint {shown}: port 0")
    parse_endpoints(value)
    return value


class EtcdUrl(click.ParamType[Any]):
    name = "url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return _etcd_endpoints(str(value))
        except EtcdConfigError as e:
            self.fail(str(e), param, ctx)


ETCD_URL = EtcdUrl()


class TargetUrl(click.ParamType[Any]):
    """A backup target URL that parses (what it names is checked by pxcluster.backup)."""

    name = "url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = str(value)
        if len(text) > 4096:
            self.fail(f"{inputs.shown(text)}: over 4096 characters", param, ctx)
        try:
            urlsplit(text.strip())
        except ValueError as e:
            self.fail(f"{inputs.shown(text)}: {e}", param, ctx)
        return text


TARGET_URL = TargetUrl()


def schedule(value: str) -> str:
    """A snapshot/backup schedule as pxcluster.policy.schedule reads it, bounded: every 10 s to
    every 10 years, keeping 1 to 100,000."""

    if len(value) > 64:
        raise InvalidArgument(f"invalid schedule {inputs.shown(value)}: too long")
    parsed = parse_schedule(value)
    if parsed is not None:
        if parsed.interval > 10 * 366 * 86400:
            raise InvalidArgument(f"invalid schedule {value!r}: at most every 10 years")
        if parsed.keep > 100_000:
            raise InvalidArgument(f"invalid schedule {value!r}: keep at most 100000")
    return value


SCHEDULE = _Checked("schedule", schedule)
