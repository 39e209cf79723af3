"""The one service layer behind the CLI and the REST API: reads and writes desired state in
etcd. Node agents and controllers reconcile it; nothing here talks to a replica directly."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from membership.election import current_leader
from membership.etcd import Etcd
from membership.keys import Keys
from membership.records import (
    Attachment,
    AttachTarget,
    ClusterRecord,
    FailoverRecord,
    HydrationRecord,
    NodeRecord,
    RebuildOp,
    ReplicaState,
    RevertRecord,
    ScrubRecord,
    SnapshotRecord,
    VolumeRecord,
)
from pxcluster.engine.crypt import BLOCK as CRYPT_BLOCK
from pxcluster.engine.crypt import derive_key, random_key
from pxcluster.errors import (
    DuplicateName,
    InvalidArgument,
    NodeBusy,
    OperationTimeout,
    PlacementError,
    UnknownNode,
    UnknownVolume,
    VolumeBusy,
)
from pxcluster.policy.placement import Candidate, pick_attach_node, place
from pxcluster.policy.schedule import parse_schedule

DEFAULT_CHUNK_SIZE = 4 << 20
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAX_VOLUME_SIZE = 1 << 50


@dataclass(frozen=True)
class VolumeView:
    """A volume with everything etcd says about it, read at one moment."""

    record: VolumeRecord
    epoch: int
    attachment: Attachment | None
    target: AttachTarget | None
    replicas: dict[str, ReplicaState]
    failover: FailoverRecord | None = None
    snapshots: dict[str, SnapshotRecord] = field(default_factory=dict)
    revert: RevertRecord | None = None
    scrub: ScrubRecord | None = None
    hydration: HydrationRecord | None = None

    def ready_snapshots(self) -> list[SnapshotRecord]:
        ready = [r for r in self.snapshots.values() if r.state in ("ready", "deleting")]
        return sorted(ready, key=lambda r: (r.created, r.id))


class Service:
    def __init__(self, etcd: Etcd, cluster: str) -> None:
        self.etcd = etcd
        self.keys = Keys(cluster)

    # --- nodes

    async def cluster_record(self) -> ClusterRecord | None:
        kv = await self.etcd.get(self.keys.cluster_record())
        return None if kv is None else ClusterRecord.decode(kv.value)

    async def nodes(self) -> list[NodeRecord]:
        kvs = await self.etcd.get_prefix(self.keys.nodes_prefix())
        return sorted((NodeRecord.decode(kv.value) for kv in kvs), key=lambda n: n.name)

    async def alive(self) -> set[str]:
        kvs = await self.etcd.get_prefix(self.keys.alive_prefix())
        return {self.keys.split(kv.key)[-1] for kv in kvs}

    async def find_node(self, name_or_id: str) -> NodeRecord:
        for n in await self.nodes():
            if name_or_id in (n.name, n.id) and n.state != "removed":
                return n
        raise UnknownNode(f"unknown node {name_or_id!r}")

    async def node_list(self) -> list[dict[str, Any]]:
        alive = await self.alive()
        return [
            {
                "id": n.id,
                "name": n.name,
                "address": n.address,
                "state": n.state,
                "up": n.id in alive,
                "capacity": n.capacity,
                "used": n.used,
                "zone": n.zone,
                "data_port": n.data_port,
                "nbd_port": n.nbd_port,
                "api_port": n.api_port,
            }
            for n in await self.nodes()
            if n.state != "removed"
        ]

    async def cluster_status(self) -> dict[str, Any]:
        record = await self.cluster_record()
        nodes = await self.node_list()
        leader_id = await current_leader(self.etcd, self.keys)
        names = {n["id"]: n["name"] for n in nodes}
        volumes = await self.etcd.get_prefix(self.keys.volumes_prefix())
        return {
            "cluster": self.keys.cluster,
            "id": record.id if record else None,
            "etcd": self.etcd.url,
            "leader": names.get(leader_id or "", leader_id),
            "nodes_up": sum(1 for n in nodes if n["up"]),
            "nodes_total": len(nodes),
            "capacity": sum(n["capacity"] for n in nodes),
            "used": sum(n["used"] for n in nodes),
            "volumes": sum(1 for kv in volumes if len(self.keys.split(kv.key)) == 2),
        }

    async def set_node_state(self, name: str, state: str, *, allowed_from: tuple[str, ...]) -> None:
        for _ in range(10):
            node = await self.find_node(name)
            kv = await self.etcd.get(self.keys.node(node.id))
            assert kv is not None
            if node.state == state:
                return
            if node.state not in allowed_from:
                raise NodeBusy(f"node {node.name} is {node.state}; cannot make it {state}")
            updated = NodeRecord.from_dict({**node.to_dict(), "state": state})
            txn = self.etcd.txn().unchanged(self.keys.node(node.id), kv.mod_revision)
            if await self.etcd.commit(txn.put(self.keys.node(node.id), updated.encode())):
                return
        raise OperationTimeout(f"node {name} kept changing; try again")

    async def remove_node(self, name: str) -> None:
        node = await self.find_node(name)
        if node.id in await self.alive():
            raise NodeBusy(f"node {node.name} is up; stop it (or drain it) before removing it")
        holders = [v.record.name for v in await self.volumes() if node.id in v.replicas]
        if holders:
            held = ", ".join(sorted(holders))
            raise NodeBusy(f"node {node.name} still holds replicas of {held}; drain it first")
        await self.etcd.delete(self.keys.node(node.id))

    # --- volumes

    async def replica_key(self) -> bytes:
        """The cluster key that replica connections prove (made by the first node to join)."""
        kv = await self.etcd.get(self.keys.replica_key())
        if kv is None:
            raise VolumeBusy(f"cluster {self.keys.cluster}: no node has joined it yet")
        return bytes(kv.value)

    async def volume_key(self, volume_id: str) -> bytes:
        kv = await self.etcd.get(self.keys.secret(volume_id))
        if kv is None:
            raise VolumeBusy(f"volume {volume_id}: encrypted, but its key is missing from etcd")
        return base64.b64decode(kv.value)

    async def volume_id(self, name: str) -> str:
        kv = await self.etcd.get(self.keys.name(name))
        if kv is None:
            raise UnknownVolume(f"unknown volume {name!r}")
        return kv.value.decode()

    async def volume(self, name: str) -> VolumeView:
        return await self.volume_by_id(await self.volume_id(name), name)

    async def volume_by_id(self, vid: str, name: str = "") -> VolumeView:
        kvs = await self.etcd.get_prefix(self.keys.volume_sub_prefix(vid))
        record_kv = await self.etcd.get(self.keys.volume(vid))
        if record_kv is None:
            raise UnknownVolume(f"unknown volume {name or vid!r}")
        return self._view(VolumeRecord.decode(record_kv.value), kvs)

    def _view(self, record: VolumeRecord, kvs: list[Any]) -> VolumeView:
        epoch, attachment, target, failover = 0, None, None, None
        replicas: dict[str, ReplicaState] = {}
        snapshots: dict[str, SnapshotRecord] = {}
        revert = None
        scrub = None
        hydration = None
        for kv in kvs:
            parts = self.keys.split(kv.key)[2:]
            if parts == ["epoch"]:
                epoch = int(kv.value)
            elif parts == ["attachment"]:
                attachment = Attachment.decode(kv.value)
            elif parts == ["target"]:
                target = AttachTarget.decode(kv.value)
            elif parts == ["failover"]:
                failover = FailoverRecord.decode(kv.value)
            elif len(parts) == 2 and parts[0] == "replicas":
                replicas[parts[1]] = ReplicaState.decode(kv.value)
            elif len(parts) == 2 and parts[0] == "snapshots":
                snapshots[parts[1]] = SnapshotRecord.decode(kv.value)
            elif parts == ["revert"]:
                revert = RevertRecord.decode(kv.value)
            elif parts == ["scrub"]:
                scrub = ScrubRecord.decode(kv.value)
            elif parts == ["hydration"]:
                hydration = HydrationRecord.decode(kv.value)
        return VolumeView(
            record,
            epoch,
            attachment,
            target,
            replicas,
            failover,
            snapshots,
            revert,
            scrub,
            hydration,
        )

    async def volumes(self) -> list[VolumeView]:
        kvs = await self.etcd.get_prefix(self.keys.volumes_prefix())
        by_id: dict[str, list[Any]] = {}
        records: dict[str, VolumeRecord] = {}
        for kv in kvs:
            parts = self.keys.split(kv.key)
            if len(parts) == 2:
                records[parts[1]] = VolumeRecord.decode(kv.value)
            else:
                by_id.setdefault(parts[1], []).append(kv)
        views = [self._view(rec, by_id.get(vid, [])) for vid, rec in records.items()]
        return sorted(views, key=lambda v: v.record.name)

    async def create_volume(
        self,
        name: str,
        size: int,
        repl: int = 1,
        *,
        sync_writes: bool = False,
        encrypted: bool = False,
        key_material: bytes | None = None,
    ) -> VolumeView:
        if not _DNS_LABEL.match(name):
            raise InvalidArgument(
                f"invalid volume name {name!r}: use a DNS label (a-z, 0-9, '-', at most 63)"
            )
        if not 1 <= repl <= 3:
            raise InvalidArgument(f"invalid --repl {repl}: must be 1, 2 or 3")
        if size <= 0 or size > MAX_VOLUME_SIZE or size % 512:
            raise InvalidArgument(f"invalid size {size}: a positive multiple of 512 bytes")
        if encrypted and size % CRYPT_BLOCK:
            raise InvalidArgument(f"an encrypted volume's size must be a multiple of {CRYPT_BLOCK}")
        if key_material is not None and not encrypted:
            raise InvalidArgument("a key was given for a volume that is not --encrypted")
        if await self.etcd.get(self.keys.name(name)) is not None:
            raise DuplicateName(f"volume {name!r} already exists")
        nodes = await self.nodes()
        alive = await self.alive()
        candidates = [Candidate(n, n.id in alive, n.capacity - n.used) for n in nodes]
        placed = place([c for c in candidates if c.node.state != "removed"], repl, size)
        vid = uuid.uuid4().hex[:16]
        record = VolumeRecord(
            id=vid,
            name=name,
            size=size,
            chunk_size=DEFAULT_CHUNK_SIZE,
            repl=repl,
            replica_nodes=placed,
            sync_writes=sync_writes,
            created=time.time(),
            encrypted=encrypted,
        )
        txn = (
            self.etcd.txn()
            .absent(self.keys.name(name))
            .put(self.keys.name(name), vid.encode())
            .put(self.keys.volume(vid), record.encode())
            .put(self.keys.epoch(vid), b"0")
        )
        for node_id in placed:
            txn.put(self.keys.replica(vid, node_id), ReplicaState(node_id, "in_sync", 0).encode())
        if encrypted:
            try:
                key = derive_key(key_material, vid) if key_material else random_key()
            except ValueError as e:
                raise InvalidArgument(f"encryption key: {e}") from None
            txn.put(self.keys.secret(vid), base64.b64encode(key))
        if not await self.etcd.commit(txn):
            raise DuplicateName(f"volume {name!r} already exists")
        return await self.volume_by_id(vid, name)

    async def delete_volume(self, name: str) -> None:
        view = await self.volume(name)
        vid = view.record.id
        for other in await self.volumes():
            h = other.hydration
            if h is not None and h.state == "running" and h.source_volume == vid:
                raise VolumeBusy(
                    f"volume {name!r}: clone {other.record.name!r} is still copying from it"
                )
        if view.attachment is not None or view.target is not None:
            where = await self._node_name(view.attachment.node if view.attachment else "")
            raise VolumeBusy(f"volume {name!r} is attached{where}; detach it first")
        txn = (
            self.etcd.txn()
            .absent(self.keys.attachment(vid))
            .absent(self.keys.target(vid))
            .delete(self.keys.name(name))
            .delete(self.keys.volume(vid))
            .delete_prefix(self.keys.volume_sub_prefix(vid))
            .delete(self.keys.secret(vid))
        )
        # Each replica node frees its chunks when it sees its trash entry, even if it is down now.
        for node_id in view.replicas:
            txn.put(self.keys.trash(node_id, vid), name.encode())
        if not await self.etcd.commit(txn):
            raise VolumeBusy(f"volume {name!r} changed while deleting (attached?); try again")

    async def _node_name(self, node_id: str) -> str:
        for n in await self.nodes():
            if n.id == node_id:
                return f" on {n.name}"
        return ""

    async def attach(self, name: str, node_name: str) -> VolumeView:
        view = await self.volume(name)
        node = await self.find_node(node_name)
        vid = view.record.id
        takeover = view.target is not None and view.target.reason in ("rebuild", "snapshot")
        if view.target is not None and view.target.node != node.id and not takeover:
            other = await self._node_name(view.target.node)
            raise VolumeBusy(
                f"volume {name!r} is attached{other}; detach it or use 'volume failover' first"
            )
        if node.state not in ("active",) and not (view.target and view.target.node == node.id):
            raise NodeBusy(f"node {node.name} is {node.state}: no new attachments land there")
        if node.id not in await self.alive():
            raise NodeBusy(f"node {node.name} is down")
        txn = self.etcd.txn().present(self.keys.volume(vid))
        if view.target is None:
            txn.absent(self.keys.target(vid))
        else:
            txn.value_is(self.keys.target(vid), view.target.encode())
        if await self.etcd.commit(txn.put(self.keys.target(vid), AttachTarget(node.id).encode())):
            return await self.volume(name)
        raise VolumeBusy(f"volume {name!r} changed while attaching; try again")

    async def failover(self, name: str, to: str | None, *, drill: bool = False) -> NodeRecord:
        """Move the attachment: a clean hand-off when the attach node is up, forced (fenced by
        the epoch bump) when it is down. Returns the destination; the caller waits for it."""
        view = await self.volume(name)
        vid = view.record.id
        if view.target is None or view.target.reason != "user":
            raise VolumeBusy(f"volume {name!r} is not attached; attach it instead")
        source = view.target.node
        nodes = {n.id: n for n in await self.nodes()}
        alive = await self.alive()
        if to is not None:
            dest = await self.find_node(to)
            if dest.id == source:
                raise InvalidArgument(f"volume {name!r} is already attached on {dest.name}")
            if dest.id not in alive:
                raise NodeBusy(f"node {dest.name} is down")
            if dest.state != "active":
                raise NodeBusy(f"node {dest.name} is {dest.state}: no new attachments land there")
        else:
            states = {n: r.state for n, r in view.replicas.items()}
            picked = pick_attach_node(states, nodes, alive, exclude=frozenset({source}))
            if picked is None:
                raise PlacementError(f"volume {name!r}: no other up, active node to move it to")
            dest = nodes[picked]
        kind = "drill" if drill else "handoff" if source in alive else "forced"
        record = FailoverRecord(source=source, dest=dest.id, kind=kind, detected=time.time())
        txn = (
            self.etcd.txn()
            .value_is(self.keys.target(vid), view.target.encode())
            .put(self.keys.target(vid), AttachTarget(dest.id).encode())
            .put(self.keys.failover(vid), record.encode())
        )
        if kind == "forced":
            # The dead node's lease would free the attachment within a TTL; dropping it now is
            # safe because the new engine's epoch fences every replica it opens (invariant 4).
            kv = await self.etcd.get(self.keys.attachment(vid))
            if kv is not None:
                txn.unchanged(self.keys.attachment(vid), kv.mod_revision)
                txn.delete(self.keys.attachment(vid))
        if not await self.etcd.commit(txn):
            raise VolumeBusy(f"volume {name!r} changed during the failover; try again")
        return dest

    async def resize(self, name: str, size: int) -> VolumeView:
        """Grow a volume, online: the serving engine extends every replica, then new NBD
        connections see the new size."""
        return await self._update_record(name, lambda r: _grown(r, size))

    async def set_limits(self, name: str, iops: int | None, bandwidth: int | None) -> VolumeView:
        if (iops is not None and iops < 0) or (bandwidth is not None and bandwidth < 0):
            raise InvalidArgument("limits must be 0 (unlimited) or positive")

        def change(r: VolumeRecord) -> VolumeRecord:
            return VolumeRecord.from_dict(
                r.to_dict()
                | ({} if iops is None else {"iops_limit": iops})
                | ({} if bandwidth is None else {"bw_limit": bandwidth})
            )

        return await self._update_record(name, change)

    async def set_schedules(
        self,
        name: str,
        snapshot_schedule: str | None,
        backup_schedule: str | None,
        backup_target: str | None,
    ) -> VolumeView:

        changes: dict[str, str] = {}
        if snapshot_schedule is not None:
            s = parse_schedule(snapshot_schedule)
            changes["snapshot_schedule"] = str(s) if s else ""
        if backup_schedule is not None:
            b = parse_schedule(backup_schedule)
            changes["backup_schedule"] = str(b) if b else ""
        if backup_target is not None:
            if backup_target and not backup_target.startswith(("s3://", "file:///")):
                raise InvalidArgument(
                    f"invalid backup target {backup_target!r}: s3://BUCKET/PREFIX or file:///PATH"
                )
            changes["backup_target"] = backup_target
        view = await self.volume(name)
        if changes.get("backup_schedule", view.record.backup_schedule) and not changes.get(
            "backup_target", view.record.backup_target
        ):
            raise InvalidArgument("a backup schedule needs --backup-target URL")

        def change(r: VolumeRecord) -> VolumeRecord:
            return VolumeRecord.from_dict(r.to_dict() | changes)

        return await self._update_record(name, change)

    async def _update_record(
        self, name: str, change: Callable[[VolumeRecord], VolumeRecord]
    ) -> VolumeView:
        for _ in range(10):
            vid = await self.volume_id(name)
            kv = await self.etcd.get(self.keys.volume(vid))
            if kv is None:
                raise UnknownVolume(f"unknown volume {name!r}")
            updated = change(VolumeRecord.decode(kv.value))
            txn = self.etcd.txn().unchanged(self.keys.volume(vid), kv.mod_revision)
            if await self.etcd.commit(txn.put(self.keys.volume(vid), updated.encode())):
                return await self.volume(name)
        raise OperationTimeout(f"volume {name!r} kept changing; try again")

    async def detach(self, name: str) -> VolumeView:
        view = await self.volume(name)
        await self.etcd.delete(self.keys.target(view.record.id))
        return await self.volume(name)

    async def wait_attached(self, name: str, node_id: str, timeout: float) -> VolumeView:
        deadline = time.monotonic() + timeout
        while True:
            view = await self.volume(name)
            a = view.attachment
            if (
                a is not None
                and a.node == node_id
                and a.state == "serving"
                and a.exported is not False
            ):
                return view
            if view.target is None or view.target.node != node_id:
                raise VolumeBusy(f"volume {name!r}: attach to this node was cancelled")
            if time.monotonic() > deadline:
                raise OperationTimeout(
                    f"volume {name!r} not serving after {timeout:.0f}s (attach still pending)"
                )
            await asyncio.sleep(0.1)

    async def wait_detached(self, name: str, timeout: float) -> VolumeView:
        deadline = time.monotonic() + timeout
        while True:
            view = await self.volume(name)
            if view.attachment is None:
                return view
            if time.monotonic() > deadline:
                raise OperationTimeout(f"volume {name!r} still attached after {timeout:.0f}s")
            await asyncio.sleep(0.1)

    async def inspect(self, view: VolumeView) -> dict[str, Any]:
        nodes = {n.id: n for n in await self.nodes()}
        a = view.attachment
        attached = nodes.get(a.node) if a is not None and a.state == "serving" else None
        if view.target is not None and view.target.reason in ("rebuild", "snapshot"):
            # Served only to rebuild replicas or work on snapshots: not for clients.
            state, attached = "detached", None
        elif attached is not None:
            state = "attached"
        elif view.target is not None:
            state = "attaching"
        elif a is not None:
            state = "detaching"
        else:
            state = "detached"
        replicas = [
            {
                "node": nodes[r.node].name if r.node in nodes else r.node,
                "node_id": r.node,
                "state": r.state,
                "since_epoch": r.since_epoch,
            }
            for r in sorted(view.replicas.values(), key=lambda r: r.node)
        ]
        return {
            "id": view.record.id,
            "name": view.record.name,
            "size": view.record.size,
            "repl": view.record.repl,
            "state": state,
            "health": "healthy"
            if all(r.state == "in_sync" for r in view.replicas.values())
            and len(view.replicas) >= view.record.repl
            else "degraded",
            "attached_node": attached.name if attached else None,
            "nbd_uri": nbd_uri(attached, view.record.name) if attached else None,
            "epoch": view.epoch,
            "sync_writes": view.record.sync_writes,
            "encrypted": view.record.encrypted,
            "chunk_size": view.record.chunk_size,
            "iops_limit": view.record.iops_limit,
            "bw_limit": view.record.bw_limit,
            "replicas": replicas,
            "snapshots": len(view.ready_snapshots()),
            "clone_of": _clone_of(view),
            "snapshot_schedule": view.record.snapshot_schedule,
            "backup_schedule": view.record.backup_schedule,
            "backup_target": view.record.backup_target,
            "last_failover": self._failover_view(view.failover, nodes),
            "rebuilds": await self._rebuilds(view, nodes),
        }

    @staticmethod
    def _failover_view(
        f: FailoverRecord | None, nodes: dict[str, NodeRecord]
    ) -> dict[str, Any] | None:
        if f is None:
            return None
        name = {n.id: n.name for n in nodes.values()}
        return {
            "from": name.get(f.source, f.source),
            "to": name.get(f.dest, f.dest),
            "kind": f.kind,
            "at": f.detected,
            "epoch": f.epoch,
            "reconciled_chunks": f.reconciled_chunks,
            "done": bool(f.serving),
            **f.timings(),
        }

    async def _rebuilds(
        self, view: VolumeView, nodes: dict[str, NodeRecord]
    ) -> list[dict[str, Any]]:
        out = []
        for node_id, r in sorted(view.replicas.items()):
            if r.state == "in_sync":
                continue
            kv = await self.etcd.get(self.keys.rebuild_op(view.record.id, node_id))
            if kv is None:
                continue
            op = RebuildOp.decode(kv.value)
            out.append(
                {
                    "node": nodes[node_id].name if node_id in nodes else node_id,
                    "state": op.state,
                    "bytes_done": op.bytes_done,
                    "bytes_total": op.bytes_total,
                    "chunks_done": op.done_chunks,
                    "chunks_total": op.total_chunks,
                    "error": op.error,
                }
            )
        return out


def _grown(record: VolumeRecord, size: int) -> VolumeRecord:
    if size < record.size:
        raise InvalidArgument(
            f"volume {record.name!r} is {record.size} bytes: shrinking to {size} is refused"
        )
    if size > MAX_VOLUME_SIZE or size % 512:
        raise InvalidArgument(f"invalid size {size}: a positive multiple of 512 bytes")
    return VolumeRecord.from_dict(record.to_dict() | {"size": size})


def _clone_of(view: VolumeView) -> dict[str, Any] | None:
    h = view.hydration
    if h is None:
        return None
    done = h.chunks_total if h.state == "done" else min(h.chunks_total, h.watermark + len(h.extra))
    return {
        "volume": h.source_name,
        "snapshot": h.snapshot_name,
        "state": "copying" if h.state == "running" else "done",
        "chunks_total": h.chunks_total,
        "chunks_copied": done,
    }


def nbd_uri(node: NodeRecord, volume_name: str) -> str:
    """A libnbd URI that works as-is for root on the node's host: TLS where the node requires
    it, plain TCP where the node lives on a loopback address (a dev or test cluster), else the
    node's unix socket (root's only), else NBD's loopback listener."""
    host = node.nbd_address or node.address
    if node.nbd_tls_dir:
        return (
            f"nbds://{_uri_host(host)}:{node.nbd_port}/{volume_name}"
            f"?tls-certificates={quote(node.nbd_tls_dir)}"
        )
    if is_loopback(node.address) or not node.data_dir:
        return f"nbd://{_uri_host(host)}:{node.nbd_port}/{volume_name}"
    sock = quote(os.path.join(node.data_dir, "nbd.sock"))
    return f"nbd+unix:///{volume_name}?socket={sock}"


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"
