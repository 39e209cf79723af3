"""Typed errors of the control path. The CLI prints `str(error)` as one line and exits 1."""

from __future__ import annotations


class PxcError(Exception):
    """An error meant for the operator: its message is the whole story, on one line."""


class InvalidArgument(PxcError):
    pass


class UnknownNode(PxcError):
    pass


class UnknownVolume(PxcError):
    pass


class DuplicateName(PxcError):
    pass


class PlacementError(PxcError):
    pass


class VolumeBusy(PxcError):
    pass


class NodeBusy(PxcError):
    pass


class OperationTimeout(PxcError):
    pass


class JoinRefused(PxcError):
    pass
