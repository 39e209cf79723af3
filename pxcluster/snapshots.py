"""Snapshots, reverts and clones as the CLI and the API ask for them.

The engine serving a volume does the work (a write barrier, then every in-sync replica freezes
its data); these functions record the request in etcd, make sure some engine serves the volume
(a detached one is served, not exported, by a node holding an in-sync replica), and wait for
the outcome. Snapshot data is read straight from the replicas: snapshots never change.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from membership.records import (
    AttachTarget,
    HydrationRecord,
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
from pxcluster.nbdclient import NbdClient
from pxcluster.placement import pick_attach_node
from pxcluster.service import Service, VolumeView, nbd_uri
from replica.client import ReplicaClient
from replica.errors import ReplicaError

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
    await _ensure_served(svc, view)
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
    await _ensure_served(svc, view)
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
    txn = svc.etcd.txn().absent(svc.keys.target(view.record.id))
    if view.revert is None:
        txn.absent(key)
    else:
        txn.value_is(key, view.revert.encode())
    txn.put(key, RevertRecord(rec.id).encode())
    if not await svc.etcd.commit(txn):
        raise VolumeBusy(f"volume {volume!r} changed while reverting (attached?); try again")
    await _ensure_served(svc, view)

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


async def _ensure_served(svc: Service, view: VolumeView) -> None:
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
        got = check(await svc.volume(volume))
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise OperationTimeout(
                f"volume {volume!r}: not done after {timeout:.0f}s; the serving node will finish "
                "it (see 'volume snapshot list')"
            )
        await asyncio.sleep(0.1)


# --- reading a snapshot, writing a new volume (clone, backup, restore)


@dataclass
class SnapshotReader:
    """A snapshot's data, read from the volume's in-sync replicas (any of them will do)."""

    volume: str
    volume_id: str
    snapshot: str
    snapshot_id: str
    size: int
    chunk_size: int
    encrypted: bool
    clients: list[ReplicaClient]

    async def _any(self, call: Callable[[ReplicaClient], Awaitable[T]]) -> T:
        last: Exception | None = None
        for client in self.clients:
            try:
                return await call(client)
            except (ReplicaError, OSError) as e:
                last = e
        raise SnapshotFailed(f"no replica could serve snapshot {self.snapshot!r}: {last}")

    async def generations(self) -> dict[int, tuple[int, int]]:
        return await self._any(lambda c: c.snapshot_generations(self.volume_id, self.snapshot_id))

    async def read_chunk(self, chunk: int) -> bytes:
        n = min(self.chunk_size, self.size - chunk * self.chunk_size)
        return await self._any(
            lambda c: c.read(self.volume_id, 0, chunk, 0, n, snapshot=self.snapshot_id)
        )

    async def close(self) -> None:
        for c in self.clients:
            await c.close()


@contextlib.asynccontextmanager
async def open_reader(svc: Service, volume: str, snapshot: str) -> AsyncIterator[SnapshotReader]:
    view = await svc.volume(volume)
    rec = find(view, snapshot)
    nodes = {n.id: n for n in await svc.nodes()}
    alive = await svc.alive()
    holders = [
        nodes[n]
        for n, st in sorted(view.replicas.items())
        if st.state == "in_sync" and n in alive and n in nodes
    ]
    if not holders:
        raise SnapshotFailed(f"volume {volume!r}: no in-sync replica is up")
    r = view.record
    reader = SnapshotReader(
        volume,
        r.id,
        rec.name,
        rec.id,
        r.size,
        r.chunk_size,
        r.encrypted,
        [ReplicaClient(n.address, n.data_port) for n in holders],
    )
    try:
        yield reader
    finally:
        await reader.close()


@contextlib.asynccontextmanager
async def temporary_snapshot(svc: Service, volume: str) -> AsyncIterator[str]:
    name = f"tmp-{secrets.token_hex(4)}"
    await create(svc, volume, name)
    try:
        yield name
    finally:
        with contextlib.suppress(PxcError):
            await delete(svc, volume, name)


class VolumeWriter:
    """Fills a new volume through its NBD export: attached on a node, written, flushed,
    detached. All-zero chunks are skipped (a new volume reads as zeros)."""

    def __init__(self, svc: Service, name: str, chunk_size: int, client: NbdClient) -> None:
        self.svc = svc
        self.name = name
        self.chunk_size = chunk_size
        self.client = client
        self.bytes_written = 0

    async def write_chunk(self, chunk: int, data: bytes) -> None:
        if data.count(0) == len(data):
            return
        step = 1 << 20
        offset = chunk * self.chunk_size
        for i in range(0, len(data), step):
            await self.client.write(offset + i, data[i : i + step])
        self.bytes_written += len(data)


@contextlib.asynccontextmanager
async def new_volume_writer(
    svc: Service,
    name: str,
    size: int,
    repl: int,
    *,
    encrypted: bool = False,
    key: bytes | None = None,
    chunk_size: int | None = None,
    timeout: float = 60.0,
) -> AsyncIterator[VolumeWriter]:
    """Create volume `name` and yield a writer of `chunk_size`-byte chunks (default: the
    volume's). On an error inside, the volume is deleted."""
    view = await svc.create_volume(name, size, repl, encrypted=encrypted)
    vid = view.record.id
    if key is not None:
        await svc.etcd.put(svc.keys.secret(vid), base64.b64encode(key))
    try:
        nodes = {n.id: n for n in await svc.nodes()}
        states = {n: st.state for n, st in view.replicas.items()}
        node_id = pick_attach_node(states, nodes, await svc.alive())
        if node_id is None:
            raise VolumeBusy("no node is up to write the new volume")
        node = nodes[node_id]
        await svc.attach(name, node.name)
        await svc.wait_attached(name, node_id, timeout)
        client = await NbdClient.connect(nbd_uri(node, name))
        try:
            writer = VolumeWriter(svc, name, chunk_size or view.record.chunk_size, client)
            yield writer
            await client.flush()
        finally:
            await client.close()
        await svc.detach(name)
        await svc.wait_detached(name, timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            await svc.detach(name)
            await svc.wait_detached(name, timeout)
            await svc.delete_volume(name)
        raise


async def clone(
    svc: Service, volume: str, snapshot: str, new: str, repl: int | None
) -> dict[str, Any]:
    """A new, independent volume with the snapshot's data, usable at once: its engine serves
    chunks not yet copied from the snapshot's replicas and copies them in the background (an
    engine is started for it, not exported, if nobody attaches it)."""
    view = await svc.volume(volume)
    rec = find(view, snapshot)
    key = await svc.volume_key(view.record.id) if view.record.encrypted else None
    async with open_reader(svc, volume, snapshot) as reader:
        total = len(await reader.generations())
    created = await svc.create_volume(
        new, view.record.size, repl or view.record.repl, encrypted=view.record.encrypted
    )
    vid = created.record.id
    hydration = HydrationRecord(
        view.record.id, rec.id, volume, rec.name, chunks_total=total, watermark=0
    )
    txn = (
        svc.etcd.txn()
        .present(svc.keys.volume(vid))
        .put(svc.keys.hydration(vid), hydration.encode())
    )
    if key is not None:
        # The same key and block numbers: the copied ciphertext reads as the same plaintext.
        txn.put(svc.keys.secret(vid), base64.b64encode(key))
    if not await svc.etcd.commit(txn):
        raise VolumeBusy(f"volume {new!r} changed while cloning; try again")
    await _ensure_served(svc, await svc.volume(new))
    return await svc.inspect(await svc.volume(new))


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


@contextlib.asynccontextmanager
async def backup_source(
    svc: Service, volume: str, snapshot: str | None
) -> AsyncIterator[SnapshotReader]:
    """What a backup reads: the named snapshot, or a temporary one removed afterwards."""
    if snapshot is not None:
        async with open_reader(svc, volume, snapshot) as reader:
            yield reader
        return
    async with temporary_snapshot(svc, volume) as name, open_reader(svc, volume, name) as reader:
        yield reader


@contextlib.asynccontextmanager
async def restore_sink(
    svc: Service, name: str, size: int, chunk_size: int, repl: int | None, encrypted: bool
) -> AsyncIterator[VolumeWriter]:
    if encrypted:
        raise InvalidArgument(
            "this backup is of an encrypted volume: its blocks are ciphertext, and restoring "
            "one needs the volume's key, which this version cannot take yet"
        )
    if repl is None:
        repl = max(1, min(3, len(await svc.alive())))
    async with new_volume_writer(svc, name, size, repl, chunk_size=chunk_size) as writer:
        yield writer


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
    await _ensure_served(svc, view)

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
