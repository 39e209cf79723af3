"""Typed errors of the host layer: each message is the whole story, on one line."""

from __future__ import annotations

from pxcluster.errors import PxcError


class HostError(PxcError):
    pass


class NoBlockPath(HostError):
    """Neither the kernel NBD client nor nbdfuse with a loop device can be used here."""


class PathBusy(HostError):
    """The mount path is already a mount point, or not an empty directory."""


class ForeignFilesystem(HostError):
    """The volume holds data that is not the filesystem asked for: never formatted over."""


class DeviceInUse(HostError):
    """The filesystem or the device is still in use: nothing was changed."""


class NotMapped(HostError):
    pass


class CommandFailed(HostError):
    pass
