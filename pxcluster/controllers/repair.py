"""Keep every volume's redundancy: replace replicas whose node stayed down past the grace
period, and attach detached volumes that need a rebuild on a node that can run it."""

from __future__ import annotations

import logging
import time

from membership.records import AttachTarget, NodeRecord, ReplicaState, VolumeRecord
from pxcluster.controllers.view import PassView, guard_volume
from pxcluster.errors import PlacementError
from pxcluster.policy.placement import Candidate, pick_attach_node, place
from pxcluster.service.core import Service, VolumeView

log = logging.getLogger(__name__)


class RepairController:
    def __init__(self, service: Service, *, replace_after: float = 300.0) -> None:
        self.service = service
        self.replace_after = replace_after
        self._down_since: dict[str, float] = {}
        self._warned: dict[str, str] = {}

    async def run_pass(self, pass_view: PassView | None = None) -> None:
        seen = pass_view if pass_view is not None else PassView(self.service)
        alive = await seen.alive()
        nodes = {n.id: n for n in await seen.nodes()}
        now = time.monotonic()
        for node_id in nodes:
            if node_id in alive:
                self._down_since.pop(node_id, None)
            else:
                self._down_since.setdefault(node_id, now)
        for view in await seen.volumes():
            for node_id in list(view.replicas):
                since = self._down_since.get(node_id)
                if since is not None and now - since >= self.replace_after:
                    await self._replace(view, node_id, alive, nodes)
                    break
            else:
                await self._attach_for_rebuild(view, alive, nodes)

    async def _replace(
        self, view: VolumeView, lost: str, alive: set[str], nodes: dict[str, NodeRecord]
    ) -> None:
        svc = self.service
        keys = svc.keys
        rec = view.record
        if not any(r.state == "in_sync" for n, r in view.replicas.items() if n != lost):
            # The lost node may hold the only good copy: wait for it rather than give it up.
            return
        candidates = [Candidate(n, n.id in alive, n.capacity - n.used) for n in nodes.values()]
        try:
            (new,) = place(candidates, 1, rec.size, exclude=frozenset(view.replicas))
        except PlacementError as e:
            if self._warned.get(rec.id) != str(e):  # once per distinct reason, not every pass
                self._warned[rec.id] = str(e)
                log.warning("volume %s: cannot replace the replica on a lost node: %s", rec.name, e)
            return
        self._warned.pop(rec.id, None)
        # The in-sync copy that makes giving up the lost one safe is the one the pass view
        # showed: commit only if the record and every replica state are still as seen.
        txn = await guard_volume(svc, view)
        if txn is None:
            return
        replica_nodes = [n for n in rec.replica_nodes if n != lost] + [new]
        updated = VolumeRecord.from_dict(rec.to_dict() | {"replica_nodes": replica_nodes})
        txn = (
            txn.present(keys.replica(rec.id, lost))
            .put(keys.volume(rec.id), updated.encode())
            .delete(keys.replica(rec.id, lost))
            .put(keys.replica(rec.id, new), ReplicaState(new, "stale", view.epoch).encode())
            .put(keys.trash(lost, rec.id), rec.name.encode())
        )
        if await svc.etcd.commit(txn):
            log.warning(
                "volume %s: replica on lost node %s replaced by one on %s", rec.name, lost, new
            )

    async def _attach_for_rebuild(
        self, view: VolumeView, alive: set[str], nodes: dict[str, NodeRecord]
    ) -> None:
        if view.target is not None or view.attachment is not None:
            return
        needs = [n for n, r in view.replicas.items() if r.state != "in_sync" and n in alive]
        if not needs:
            return
        states = {n: r.state for n, r in view.replicas.items()}
        host = pick_attach_node(states, nodes, alive)
        if host is None or states.get(host) != "in_sync":
            return
        keys = self.service.keys
        vid = view.record.id
        # Absent, as the pass view showed: a user's attach since then wins.
        txn = (
            self.service.etcd.txn()
            .absent(keys.target(vid))
            .put(keys.target(vid), AttachTarget(host, "rebuild").encode())
        )
        await self.service.etcd.commit(txn)
