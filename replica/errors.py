"""Typed errors of the replica layer.

Every error carries a stable `code` so it can cross the wire (replica/protocol.py) and be
rebuilt as the same type on the client side. Callers branch on types, never on messages.
"""

from __future__ import annotations


class ReplicaError(Exception):
    code = "EIO"


class StaleEpoch(ReplicaError):
    """A request carried an epoch below the highest the volume was opened with (invariant 4)."""

    code = "STALE_EPOCH"


class NoSpace(ReplicaError):
    code = "ENOSPC"


class OutOfRange(ReplicaError):
    code = "EINVAL"


class UnknownVolume(ReplicaError):
    code = "UNKNOWN_VOLUME"


class ChecksumMismatch(ReplicaError):
    """Data on the disk does not match its checksum: it is never returned as data."""

    code = "CHECKSUM"


class UnknownSnapshot(ReplicaError):
    code = "UNKNOWN_SNAPSHOT"


class NotOpen(ReplicaError):
    """The volume was not opened since this replica process started: an engine must open it
    again (and learn of the restart) before it may trust this replica's data."""

    code = "NOT_OPEN"


class ReplicaUnavailable(ReplicaError):
    """The replica could not be reached or did not answer in time."""

    code = "UNAVAILABLE"


class AuthFailed(ReplicaUnavailable):
    """The peer did not prove it holds the cluster's key (or we could not prove it to the
    peer): no request goes over such a connection. To the engine it is an unreachable replica."""

    code = "AUTH"


class UnjustifiedEpoch(ReplicaError):
    """An open or delete carried an epoch above the volume's epoch in etcd: no engine was
    given that epoch, so honouring it would fence the real engine for good."""

    code = "UNJUSTIFIED_EPOCH"


class ProtocolError(ReplicaError):
    code = "PROTOCOL"


class DiskError(ReplicaError):
    """A disk cannot be used as it is."""

    code = "DISK"


class NotFormatted(DiskError):
    code = "NOT_FORMATTED"


class CorruptSuperblock(DiskError):
    code = "CORRUPT_SUPERBLOCK"


class UnsupportedFormat(DiskError):
    code = "UNSUPPORTED_FORMAT"


class ForeignDisk(DiskError):
    """The disk was formatted for another cluster."""

    code = "FOREIGN_DISK"


class DiskInUse(DiskError):
    code = "DISK_IN_USE"


_BY_CODE: dict[str, type[ReplicaError]] = {
    cls.code: cls
    for cls in (
        ReplicaError,
        StaleEpoch,
        NoSpace,
        OutOfRange,
        UnknownVolume,
        UnknownSnapshot,
        ChecksumMismatch,
        NotOpen,
        ReplicaUnavailable,
        AuthFailed,
        UnjustifiedEpoch,
        ProtocolError,
        DiskError,
        NotFormatted,
        CorruptSuperblock,
        UnsupportedFormat,
        ForeignDisk,
        DiskInUse,
    )
}


def error_from_code(code: str, message: str) -> ReplicaError:
    return _BY_CODE.get(code, ReplicaError)(message)
