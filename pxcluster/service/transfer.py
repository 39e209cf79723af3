"""Volume data moving between volumes and out of the cluster: a snapshot read straight off the
replicas (snapshots never change), a new volume written through its NBD export, and clones
(a new volume whose engine copies the source snapshot in the background).

What a backup reads and a restore writes (`pxcluster.backup.ports`) are these.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from membership.records import HydrationRecord
from pxcluster.errors import InvalidArgument, PxcError, VolumeBusy
from pxcluster.nbd.client import NbdClient
from pxcluster.policy.placement import pick_attach_node
from pxcluster.service.core import Service, nbd_uri
from pxcluster.service.snapshots import SnapshotFailed, create, delete, ensure_served, find
from replica.client import ReplicaClient
from replica.errors import ReplicaError

T = TypeVar("T")


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
    key = await svc.replica_key()
    r = view.record
    reader = SnapshotReader(
        volume,
        r.id,
        rec.name,
        rec.id,
        r.size,
        r.chunk_size,
        r.encrypted,
        [ReplicaClient(n.address, n.data_port, key=key) for n in holders],
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

    def __init__(self, chunk_size: int, client: NbdClient) -> None:
        self.chunk_size = chunk_size
        self.client = client

    async def write_chunk(self, chunk: int, data: bytes) -> None:
        if data.count(0) == len(data):
            return
        step = 1 << 20
        offset = chunk * self.chunk_size
        for i in range(0, len(data), step):
            await self.client.write(offset + i, data[i : i + step])


def on_this_host(address: str) -> bool:
    """Whether `address` is one of this host's (it can be bound here)."""
    try:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


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
        alive = await svc.alive()
        # NBD is served to the node's own host only (docs/SECURITY.md): write through a node
        # on this host when there is one.
        here = {i: n for i, n in nodes.items() if on_this_host(n.address)}
        node_id = pick_attach_node(states, here, alive) or pick_attach_node(states, nodes, alive)
        if node_id is None:
            raise VolumeBusy("no node is up to write the new volume")
        node = nodes[node_id]
        await svc.attach(name, node.name)
        await svc.wait_attached(name, node_id, timeout)
        client = await NbdClient.connect(nbd_uri(node, name))
        try:
            writer = VolumeWriter(chunk_size or view.record.chunk_size, client)
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
    await ensure_served(svc, await svc.volume(new))
    return await svc.inspect(await svc.volume(new))


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


class VolumeTransfer:
    """The cluster as the backup commands see it (pxcluster.backup.ports.BackupHooks)."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc

    def backup_source(
        self, volume: str, snapshot: str | None
    ) -> contextlib.AbstractAsyncContextManager[SnapshotReader]:
        return backup_source(self.svc, volume, snapshot)

    def restore_sink(
        self, name: str, size: int, chunk_size: int, repl: int | None, encrypted: bool
    ) -> contextlib.AbstractAsyncContextManager[VolumeWriter]:
        return restore_sink(self.svc, name, size, chunk_size, repl, encrypted)
