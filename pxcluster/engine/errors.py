"""Errors the engine returns to a frontend; `errno` is what an NBD client sees."""

from __future__ import annotations

import errno as errno_codes


class VolumeIOError(Exception):
    errno = errno_codes.EIO


class Fenced(VolumeIOError):
    """This engine may no longer serve: its lease is at risk or a newer epoch exists."""

    errno = errno_codes.ESHUTDOWN


class NoInSyncReplica(VolumeIOError):
    pass


class OutOfBounds(VolumeIOError):
    errno = errno_codes.EINVAL
