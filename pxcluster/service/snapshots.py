"""Snapshots, reverts and scrubs as the CLI and the API ask for them.

The engine serving a volume does the work (a write barrier, then every in-sync replica freezes
its data); these functions record the request in etcd, make sure some engine serves the volume
(a detached one is served, not exported, by a node holding an in-sync replica), and wait for
the outcome. Snapshot data is read straight from the replicas: snapshots never change.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar

from membership.records import (
    AttachTarget,
    RevertRecord,
    ScrubRecord,
    SnapshotRecord,
)
from pxcluster.errors import (
    DuplicateName,
    InvalidArgument,
    OperationTimeout,
    PxcError,
    VolumeBusy,
)
from pxcluster.policy.placement import pick_attach_node
from pxcluster.service.core import Service, VolumeView

_SNAP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
T = TypeVar("T")


class UnknownSnapshot(PxcError):
    pass


class SnapshotFailed(PxcError):
    pass


def snapshot_json(volume: str, r: SnapshotRecord) -> dict[str, Any]:
    return {"id": r.id, "name": r.name, "volume": volume, "created": r.created, "state": r.state}


def find(view: VolumeView, name: str) -> SnapshotRecord:
    for r in view.snapshots.values():
        if r.name == name and r.state in ("ready", "deleting"):
            return r
    raise UnknownSnapshot(f"volume {view.record.name!r} has no snapshot {name!r}")


async def create(svc: Service, volume: str, name: str, *, timeout: float = 60.0) -> dict[str, Any]:
    if not _SNAP_NAME.match(name):
        raise InvalidArgument(
            f"invalid snapshot name {name!r}: letters, digits, '.', '_', '-', at most 63"
        )
    view = await svc.volume(volume)
    if any(r.name == name for r in view.snapshots.values()):
        raise DuplicateName(f"volume {volume!r} already has a snapshot named {name!r}")
    vid = view.record.id
    snap_id = f"{time.time_ns():x}-{secrets.token_hex(3)}"
    rec = SnapshotRecord(snap_id, name, "creating", requested=time.time())
    key = svc.keys.snapshot(vid, snap_id)
    txn = svc.etcd.txn().present(svc.keys.volume(vid)).absent(key).put(key, rec.encode())
    if not await svc.etcd.commit(txn):
        raise VolumeBusy(f"volume {volume!r} changed while snapshotting; try again")
    await ensure_served(svc, view)
    done = await _wait(svc, volume, timeout, lambda v: _settled(v, snap_id))
    assert done is not None
    if done.state != "ready":
        await svc.etcd.delete(key)  # the serving engine drops any partial copy
        raise SnapshotFailed(f"snapshot {name!r} of volume {volume!r} failed: {done.error}")
    return snapshot_json(volume, done)


async def list_snapshots(svc: Service, volume: str) -> list[dict[str, Any]]:
    view = await svc.volume(volume)
    recs = sorted(view.snapshots.values(), key=lambda r: (r.created or r.requested, r.id))
    return [snapshot_json(volume, r) for r in recs]


async def delete(svc: Service, volume: str, name: str, *, timeout: float = 60.0) -> None:
    view = await svc.volume(volume)
    rec = find(view, name)
    busy = clones_of(await svc.volumes(), view.record.id, rec.id)
    if busy:
        raise VolumeBusy(
            f"snapshot {name!r} of volume {volume!r}: clone {', '.join(busy)} is still copying it"
        )
    key = svc.keys.snapshot(view.record.id, rec.id)
    if rec.state != "deleting":
        gone = SnapshotRecord.from_dict(rec.to_dict() | {"state": "deleting"})
        txn = svc.etcd.txn().value_is(key, rec.encode()).put(key, gone.encode())
        if not await svc.etcd.commit(txn):
            raise VolumeBusy(f"snapshot {name!r} changed meanwhile; try again")
    await ensure_served(svc, view)
    await _wait(svc, volume, timeout, lambda v: True if rec.id not in v.snapshots else None)


async def revert(svc: Service, volume: str, name: str, *, timeout: float = 120.0) -> None:
    view = await svc.volume(volume)
    rec = find(view, name)
    if view.target is not None and view.target.reason == "user":
        raise VolumeBusy(f"volume {volume!r} is attached; detach it before reverting")
    newer = [r.name for r in view.ready_snapshots() if (r.created, r.id) > (rec.created, rec.id)]
    if newer:
        raise VolumeBusy(
            f"volume {volume!r} has snapshots newer than {name!r} ({', '.join(newer)}); "
            "delete them first"
        )
    key = svc.keys.revert(view.record.id)
    txn = svc.etcd.txn()
    if view.target is None:
        txn.absent(svc.keys.target(view.record.id))
    else:  # served, not exported, for earlier snapshot work: that engine reverts it
        txn.value_is(svc.keys.target(view.record.id), view.target.encode())
    if view.revert is None:
        txn.absent(key)
    else:
        txn.value_is(key, view.revert.encode())
    txn.put(key, RevertRecord(rec.id).encode())
    if not await svc.etcd.commit(txn):
        raise VolumeBusy(f"volume {volume!r} changed while reverting (attached?); try again")
    await ensure_served(svc, view)

    def outcome(v: VolumeView) -> RevertRecord | bool | None:
        if v.revert is None:
            return True
        return v.revert if v.revert.state == "failed" else None

    got = await _wait(svc, volume, timeout, outcome)
    if isinstance(got, RevertRecord):
        await svc.etcd.delete(key)
        raise SnapshotFailed(f"revert of volume {volume!r} failed: {got.error}")


def _settled(view: VolumeView, snap_id: str) -> SnapshotRecord | None:
    rec = view.snapshots.get(snap_id)
    if rec is None:
        return SnapshotRecord(snap_id, "", "failed", error="the request was withdrawn")
    return rec if rec.state in ("ready", "failed") else None


async def ensure_served(svc: Service, view: VolumeView) -> None:
    """A detached volume gets an engine (not exported) on a node with an in-sync replica."""
    if view.target is not None:
        return
    nodes = {n.id: n for n in await svc.nodes()}
    states = {n: st.state for n, st in view.replicas.items()}
    node = pick_attach_node(states, nodes, await svc.alive())
    if node is None:
        raise VolumeBusy(f"volume {view.record.name!r}: no node is up to serve it")
    vid = view.record.id
    target = AttachTarget(node, reason="snapshot").encode()
    txn = svc.etcd.txn().present(svc.keys.volume(vid)).absent(svc.keys.target(vid))
    await svc.etcd.commit(txn.put(svc.keys.target(vid), target))


async def _wait(
    svc: Service, volume: str, timeout: float, check: Callable[[VolumeView], T | None]
) -> T | None:
    deadline = time.monotonic() + timeout
    while True:
        view = await svc.volume(volume)
        got = check(view)
        if got is not None:
            return got
        if view.target is None:
            # The engine started for earlier work let go just before this request arrived:
            # start one again (the request is still waiting in etcd).
            await ensure_served(svc, view)
        if time.monotonic() > deadline:
            raise OperationTimeout(
                f"volume {volume!r}: not done after {timeout:.0f}s; the serving node will finish "
                "it (see 'volume snapshot list')"
            )
        await asyncio.sleep(0.1)


def clones_of(views: list[VolumeView], volume_id: str, snap_id: str | None = None) -> list[str]:
    """Clones still copying from the volume (or from that snapshot of it)."""
    return [
        v.record.name
        for v in views
        if v.hydration is not None
        and v.hydration.state == "running"
        and v.hydration.source_volume == volume_id
        and (snap_id is None or v.hydration.snapshot == snap_id)
    ]


async def scrub(svc: Service, volume: str, *, timeout: float = 600.0) -> dict[str, Any]:
    """Ask the engine serving `volume` (or one started for it) to scrub; wait for its report."""
    view = await svc.volume(volume)
    key = svc.keys.scrub(view.record.id)
    if view.scrub is not None and view.scrub.state == "pending":
        raise VolumeBusy(f"volume {volume!r}: a scrub is already running")
    request = ScrubRecord(requested=time.time())
    txn = svc.etcd.txn().present(svc.keys.volume(view.record.id))
    if view.scrub is None:
        txn.absent(key)
    else:
        txn.value_is(key, view.scrub.encode())
    if not await svc.etcd.commit(txn.put(key, request.encode())):
        raise VolumeBusy(f"volume {volume!r} changed while starting a scrub; try again")
    await ensure_served(svc, view)

    def finished(v: VolumeView) -> ScrubRecord | None:
        return v.scrub if v.scrub is not None and v.scrub.state != "pending" else None

    done = await _wait(svc, volume, timeout, finished)
    assert done is not None
    if done.state == "failed":
        raise SnapshotFailed(f"scrub of volume {volume!r} failed: {done.error}")
    return {
        "volume": volume,
        "chunks": done.chunks,
        "skipped": done.skipped,
        "repaired": done.repaired,
        "unrepairable": done.unrepairable,
        "seconds": round(done.finished - done.requested, 3),
    }
