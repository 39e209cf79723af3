"""Typed records stored in etcd, as JSON. `to_dict`/`from_dict` live here and nowhere else."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Self

NODE_STATES = ("active", "cordoned", "draining", "drained", "removed")
REPLICA_STATES = ("in_sync", "stale", "rebuilding")


class _Record:
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload, no-any-return]

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Self:
        return cls.from_dict(json.loads(raw))


@dataclass(frozen=True)
class ClusterRecord(_Record):
    name: str
    id: str
    created: float


@dataclass(frozen=True)
class DiskRecord(_Record):
    path: str
    disk_id: str
    capacity: int
    used: int


@dataclass(frozen=True)
class NodeRecord(_Record):
    id: str
    name: str
    address: str
    data_port: int
    nbd_port: int
    api_port: int
    zone: str = ""
    state: str = "active"
    disks: list[dict[str, Any]] = field(default_factory=list)
    capacity: int = 0
    used: int = 0
    boot_id: str = ""
    data_dir: str = ""
    rebuild_bandwidth: int = 0  # bytes/s per rebuild run by this node's engines, 0 = unlimited
    # Where NBD listens over TCP ("": on `address`, as nodes did before it was recorded) and,
    # when TLS is required there, the directory of its certificates (libnbd's layout).
    nbd_address: str = ""
    nbd_tls_dir: str = ""

    def disk_records(self) -> list[DiskRecord]:
        return [DiskRecord.from_dict(d) for d in self.disks]


@dataclass(frozen=True)
class VolumeRecord(_Record):
    id: str
    name: str
    size: int
    chunk_size: int
    repl: int
    replica_nodes: list[str]
    sync_writes: bool = False
    state: str = "ready"
    created: float = 0.0
    iops_limit: int = 0  # 0: unlimited
    bw_limit: int = 0  # bytes/s, 0: unlimited
    encrypted: bool = False  # AES-XTS in the engine; the key under secrets/<id>
    snapshot_schedule: str = ""  # "every 1h keep 24"; "" = none (run by the leader)
    backup_schedule: str = ""
    backup_target: str = ""  # where scheduled backups go (s3://... or file://...)


@dataclass(frozen=True)
class Attachment(_Record):
    node: str
    epoch: int
    state: str = "opening"  # opening -> serving
    # NBD clients can reach it (not only served for a rebuild or snapshot); None: written by a
    # node that predates this field (which exported every attachment for a user).
    exported: bool | None = None


@dataclass(frozen=True)
class AttachTarget(_Record):
    node: str
    # "user": attached for clients; "rebuild": attached by the leader only to rebuild replicas of
    # a detached volume (not exported over NBD, and a user's attach takes it over).
    reason: str = "user"
    # "host": a block device on the attach node's own host consumes it (pxcluster.host), so
    # the leader's automatic failover leaves it there; "": NBD clients anywhere.
    consumer: str = ""


@dataclass(frozen=True)
class FailoverRecord(_Record):
    """One move of an attachment, with wall-clock timestamps of each step."""

    source: str
    dest: str
    kind: str  # "automatic" (attach node lost) | "handoff" (clean, by hand) | "forced" | "drill"
    detected: float  # when the move was decided
    fenced: float = 0.0  # epoch bumped on the new node
    reconciled: float = 0.0  # dirty chunks identical everywhere
    serving: float = 0.0  # NBD export up
    epoch: int = 0
    reconciled_chunks: int = 0

    def timings(self) -> dict[str, float | None]:
        def since(t: float) -> float | None:
            return round(t - self.detected, 3) if t else None

        return {
            "fence_s": since(self.fenced),
            "reconcile_s": round(self.reconciled - self.fenced, 3)
            if self.reconciled and self.fenced
            else None,
            "serve_s": since(self.serving),
        }


@dataclass(frozen=True)
class RebuildOp(_Record):
    """Progress of one replica rebuild, under ops/ (written by the engine that runs it)."""

    volume: str
    node: str
    epoch: int
    state: str  # running | done | failed
    total_chunks: int = 0
    done_chunks: int = 0
    copied_chunks: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    passes: int = 0
    seconds: float = 0.0
    error: str = ""


@dataclass(frozen=True)
class ReplicaState(_Record):
    node: str
    state: str  # one of REPLICA_STATES
    since_epoch: int = 0


@dataclass(frozen=True)
class DrainOp(_Record):
    """A node drain under ops/: written by the CLI when it starts, advanced by the leader."""

    node: str
    state: str  # running | done | failed | cancelled
    force: bool = False
    started: float = 0.0
    finished: float = 0.0
    replicas_total: int = 0
    replicas_moved: int = 0
    attachments_total: int = 0
    attachments_moved: int = 0
    bytes_total: int = 0
    bytes_copied: int = 0
    message: str = ""
    moves: dict[str, str] = field(default_factory=dict)  # volume id -> node of its new replica


SNAPSHOT_STATES = ("creating", "ready", "deleting", "failed")


@dataclass(frozen=True)
class SnapshotRecord(_Record):
    """volumes/<id>/snapshots/<snap id>. `creating` and `deleting` are requests the engine
    serving the volume carries out; `ready` means every in-sync replica holds it."""

    id: str
    name: str
    state: str
    requested: float = 0.0
    created: float = 0.0  # when the engine took it
    error: str = ""


@dataclass(frozen=True)
class RevertRecord(_Record):
    snapshot: str  # snapshot id
    state: str = "pending"  # pending | failed
    error: str = ""


@dataclass(frozen=True)
class ScrubRecord(_Record):
    """volumes/<id>/scrub: a scrub asked for (pending), carried out by the serving engine."""

    state: str = "pending"  # pending | done | failed
    requested: float = 0.0
    finished: float = 0.0
    chunks: int = 0
    skipped: list[str] = field(default_factory=list)
    repaired: list[dict[str, Any]] = field(default_factory=list)
    unrepairable: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""


@dataclass(frozen=True)
class HydrationRecord(_Record):
    """volumes/<id>/hydration: a clone still copying its source snapshot. Chunks below
    `watermark` and those in `extra` are copied; the rest still read from the source."""

    source_volume: str
    snapshot: str  # snapshot id
    source_name: str = ""
    snapshot_name: str = ""
    chunks_total: int = 0
    watermark: int = 0
    extra: list[int] = field(default_factory=list)
    state: str = "running"  # running | done


@dataclass(frozen=True)
class ScheduleState(_Record):
    """volumes/<id>/schedule: what the leader's schedules last did for a volume."""

    last_snapshot: float = 0.0
    last_backup: float = 0.0
    last_backup_id: str = ""
    last_error: str = ""
