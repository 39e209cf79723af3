"""Typed errors of backups. Each is a PxcError: the CLI prints `str(error)` as one line, exit 1.

Callers branch on the type, never on the text: a missing object in a target is `NotFound`; a
block a backup needs that the target does not hold is `BlockMissing`; a block whose bytes do
not match its name (header, decompression or sha256) is `BackupCorrupt`.
"""

from __future__ import annotations

from pxcluster.errors import InvalidArgument, PxcError


class BackupError(PxcError):
    """Anything that went wrong with a backup or its target."""


class InvalidTarget(BackupError, InvalidArgument):
    """A target URL that is not `file:///PATH` or `s3://BUCKET[/PREFIX]`, or is unusable."""


class TargetError(BackupError):
    """The target failed an operation (network, permissions, disk): the message says which."""


class NotFound(TargetError):
    """The target holds no object under this key."""

    def __init__(self, target: str, key: str) -> None:
        super().__init__(f"{target}: no object {key}")
        self.target = target
        self.key = key


class BackupNotFound(BackupError):
    def __init__(self, target: str, backup_id: str) -> None:
        super().__init__(f"no backup {backup_id} in {target}")
        self.backup_id = backup_id


class BadManifest(BackupError):
    """A manifest that cannot be parsed (or is of a newer format than this version reads)."""


class BlockProblem(BackupError):
    """A block of a backup that cannot be used; names the block and where the volume uses it."""

    what = "unusable"

    def __init__(
        self, backup_id: str, digest: str, chunk: int, offset: int, detail: str = ""
    ) -> None:
        self.backup_id = backup_id
        self.digest = digest
        self.chunk = chunk
        self.offset = offset
        self.detail = detail
        tail = f": {detail}" if detail else ""
        super().__init__(
            f"backup {backup_id}: block {digest} (chunk {chunk}, volume offset {offset}) "
            f"is {self.what}{tail}"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "block": self.digest,
            "chunk": self.chunk,
            "offset": self.offset,
            "problem": self.what,
            "detail": self.detail,
        }


class BlockMissing(BlockProblem):
    what = "missing"


class BackupCorrupt(BlockProblem):
    what = "corrupt"


class RestoreFailed(BackupError):
    """A restore stopped part way; the message says what became of the new volume."""
