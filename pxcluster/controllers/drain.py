"""Drains, run by the leader: hand off every attachment on the node, give every replica on it
a replacement elsewhere (rebuilt online by the serving engine), drop the node's replica once
the replacement is in sync, then mark the node drained. Every step is re-derived from etcd on
each pass, so a new leader resumes a drain where the old one stopped."""

from __future__ import annotations

import logging
import time

from membership.records import (
    AttachTarget,
    DrainOp,
    FailoverRecord,
    NodeRecord,
    RebuildOp,
    ReplicaState,
    VolumeRecord,
)
from pxcluster.controllers.view import PassView, guard_volume
from pxcluster.errors import PlacementError
from pxcluster.policy.placement import Candidate, pick_attach_node, place
from pxcluster.service.core import Service, VolumeView

log = logging.getLogger(__name__)


class DrainController:
    def __init__(self, service: Service) -> None:
        self.service = service

    async def run_pass(self, pass_view: PassView | None = None) -> None:
        seen = pass_view if pass_view is not None else PassView(self.service)
        svc = self.service
        keys = svc.keys
        ops = {
            DrainOp.decode(kv.value).node: (kv, DrainOp.decode(kv.value))
            for kv in await svc.etcd.get_prefix(keys.ops_prefix())
            if keys.split(kv.key)[-1].startswith("drain-")
        }
        running = {n: v for n, v in ops.items() if v[1].state == "running"}
        if not running:
            return
        nodes = {n.id: n for n in await seen.nodes()}
        if any(n not in nodes or nodes[n].state != "draining" for n in running):
            # The pass view's node list may predate a drain started since (its op was read
            # just now): finish or cancel a drain only on a node state newer than its op.
            nodes = {n.id: n for n in await svc.nodes()}
        for node_id, (kv, op) in running.items():
            node = nodes.get(node_id)
            if node is not None and node.state == "drained":  # finished, but not recorded
                await self._finish(kv.key, kv.mod_revision, op, "done", op.message)
                continue
            if node is None or node.state != "draining":
                await self._finish(kv.key, kv.mod_revision, op, "cancelled", "drain cancelled")
                continue
            await self._advance(node, kv.key, kv.mod_revision, op, nodes, seen)

    async def _advance(
        self,
        node: NodeRecord,
        op_key: bytes,
        rev: int,
        op: DrainOp,
        nodes: dict[str, NodeRecord],
        seen: PassView,
    ) -> None:
        svc = self.service
        alive = await seen.alive()
        views = await seen.volumes()
        moves = dict(op.moves)
        notes: list[str] = []
        moved = 0
        # Busy while anything is targeted or attached here (handed off, still detaching
        # cleanly) or has a replica here.
        busy = _holds(views, node.id)
        for v in views:
            t = v.target
            if t is not None and t.node == node.id:
                await self._hand_off(v, node, nodes, alive)
            if node.id in v.replicas:
                note = await self._move_replica(v, node, nodes, alive, moves, op.force)
                if note:
                    notes.append(note)
            elif v.record.id in moves:
                moved += 1
        copied = 0
        for vid, new in moves.items():
            kv = await svc.etcd.get(svc.keys.rebuild_op(vid, new))
            if kv is not None:
                copied += RebuildOp.decode(kv.value).bytes_done
        attachments_left = sum(1 for v in views if v.target and v.target.node == node.id)
        updated = DrainOp.from_dict(
            op.to_dict()
            | {
                "moves": moves,
                "replicas_moved": moved,
                "attachments_moved": max(0, op.attachments_total - attachments_left),
                "bytes_copied": copied,
                "message": "; ".join(notes) or op.message,
            }
        )
        if not busy:
            # The pass view may be older than this drain (read before its op was), so it can
            # miss what landed on the node just before it began draining, and no guard undoes
            # a drain's end: decide it on a read newer than the op. Nothing lands on a
            # draining node after that (attach and placement take active nodes only).
            if _holds(await svc.volumes(), node.id):
                return
            await svc.set_node_state(node.id, "drained", allowed_from=("draining",))
            await self._finish(op_key, rev, updated, "done", updated.message)
            log.warning("node %s drained", node.name)
            return
        if updated != op:
            txn = svc.etcd.txn().unchanged(op_key, rev).put(op_key, updated.encode())
            await svc.etcd.commit(txn)

    async def _hand_off(
        self, v: VolumeView, node: NodeRecord, nodes: dict[str, NodeRecord], alive: set[str]
    ) -> None:
        svc = self.service
        assert v.target is not None
        states = {n: r.state for n, r in v.replicas.items()}
        dest = pick_attach_node(states, nodes, alive, exclude=frozenset({node.id}))
        if dest is None:
            return
        vid = v.record.id
        txn = (  # guarded on the target the pass view showed
            svc.etcd.txn()
            .value_is(svc.keys.target(vid), v.target.encode())
            .put(svc.keys.target(vid), AttachTarget(dest, v.target.reason).encode())
        )
        if v.target.reason == "user":
            record = FailoverRecord(node.id, dest, "drain", time.time())
            txn.put(svc.keys.failover(vid), record.encode())
        if await svc.etcd.commit(txn):
            log.warning(
                "drain %s: volume %s handed off to %s", node.name, v.record.name, nodes[dest].name
            )

    async def _move_replica(
        self,
        v: VolumeView,
        node: NodeRecord,
        nodes: dict[str, NodeRecord],
        alive: set[str],
        moves: dict[str, str],
        force: bool,
    ) -> str:
        svc = self.service
        keys = svc.keys
        rec = v.record
        others = {n: r for n, r in v.replicas.items() if n != node.id}
        all_in_sync = bool(others) and all(r.state == "in_sync" for r in others.values())
        if len(others) >= rec.repl:
            # The replacement exists: once it (and every other replica) is in sync, the
            # node's replica can go without the volume ever dropping below its factor.
            if all_in_sync:
                await self._drop_replica(v, node)
            return ""
        if rec.id in moves:
            return ""  # placed earlier; its rebuild has not finished
        candidates = [Candidate(n, n.id in alive, n.capacity - n.used) for n in nodes.values()]
        try:
            (new,) = place(candidates, 1, rec.size, exclude=frozenset(v.replicas) | {node.id})
        except PlacementError as e:
            if force and all_in_sync:
                moves[rec.id] = ""
                await self._drop_replica(v, node)
                return f"{rec.name}: now {len(others)} replica(s) of {rec.repl} (--force)"
            return f"{rec.name}: waiting for room: {e}"
        txn = await guard_volume(svc, v)  # the record and replicas as the pass view showed
        if txn is None:
            return ""
        updated = VolumeRecord.from_dict(
            rec.to_dict() | {"replica_nodes": [*rec.replica_nodes, new]}
        )
        txn = (
            txn.absent(keys.replica(rec.id, new))
            .put(keys.volume(rec.id), updated.encode())
            .put(keys.replica(rec.id, new), ReplicaState(new, "stale", v.epoch).encode())
        )
        if await svc.etcd.commit(txn):
            moves[rec.id] = new
            log.warning(
                "drain %s: volume %s gets a new replica on %s", node.name, rec.name, nodes[new].name
            )
        return ""

    async def _drop_replica(self, v: VolumeView, node: NodeRecord) -> None:
        """The replacement is in sync: the node's replica leaves the volume (and its chunks
        are freed through the trash)."""
        svc = self.service
        keys = svc.keys
        rec = v.record
        # Every other replica was in sync in the pass view: commit only if they still are.
        txn = await guard_volume(svc, v)
        if txn is None:
            return
        updated = VolumeRecord.from_dict(
            rec.to_dict() | {"replica_nodes": [n for n in rec.replica_nodes if n != node.id]}
        )
        txn = (
            txn.present(keys.replica(rec.id, node.id))
            .put(keys.volume(rec.id), updated.encode())
            .delete(keys.replica(rec.id, node.id))
            .put(keys.trash(node.id, rec.id), rec.name.encode())
        )
        if await svc.etcd.commit(txn):
            log.warning("drain %s: replica of %s removed", node.name, rec.name)

    async def _finish(self, key: bytes, rev: int, op: DrainOp, state: str, message: str) -> None:
        done = DrainOp.from_dict(
            op.to_dict() | {"state": state, "finished": time.time(), "message": message}
        )
        svc = self.service
        await svc.etcd.commit(svc.etcd.txn().unchanged(key, rev).put(key, done.encode()))


def _holds(views: list[VolumeView], node_id: str) -> bool:
    """The node still serves, or holds a replica of, one of these volumes."""
    return any(
        (v.target is not None and v.target.node == node_id)
        or (v.attachment is not None and v.attachment.node == node_id)
        or node_id in v.replicas
        for v in views
    )
