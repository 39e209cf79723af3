"""Automatic failover: a volume whose attach node is down moves to a node holding an in-sync
replica (invariant 3 happens on that node's agent: epoch bump, then open, reconcile, serve)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable

from membership.records import AttachTarget, FailoverRecord, NodeRecord
from pxcluster.controllers.view import PassView
from pxcluster.policy.placement import pick_attach_node
from pxcluster.service.core import Service, VolumeView

log = logging.getLogger(__name__)

_PARALLEL_MOVES = 32


class FailoverController:
    def __init__(self, service: Service) -> None:
        self.service = service
        self._told: set[str] = set()  # volumes already logged as left to their host

    def _left_alone(self, name: str) -> None:
        if name not in self._told:
            self._told.add(name)
            log.warning(
                "volume %s: attach node down; it has a device on that host, so it is not "
                "failed over automatically (take it over with 'volume mount --node')",
                name,
            )

    async def run_pass(self, pass_view: PassView | None = None) -> None:
        seen = pass_view if pass_view is not None else PassView(self.service)
        alive = await seen.alive()
        views = await seen.volumes()
        if not any(v.target is not None and v.target.node not in alive for v in views):
            return
        nodes = {n.id: n for n in await seen.nodes()}
        moves: list[Awaitable[None]] = []
        for view in views:
            target = view.target
            if target is None or target.node in alive:
                continue
            if view.attachment is not None and view.attachment.node == target.node:
                continue  # its lease has not expired yet: the old engine may still be fencing
            if target.consumer == "host":
                # Its consumer is a device (a mounted filesystem) on the dead node's host:
                # moving the export serves no one. It stays put: the node serves it again if it
                # comes back, or `volume mount --node` elsewhere takes it over.
                self._left_alone(view.record.name)
                continue
            states = {n: r.state for n, r in view.replicas.items()}
            dest = pick_attach_node(states, nodes, alive, exclude=frozenset({target.node}))
            if dest is None:
                log.warning(
                    "volume %s: attach node down and no node to fail over to", view.record.name
                )
                continue
            moves.append(self._move(view, target, dest, nodes))
        # Side by side, a bounded number at once: one node's death moves all its volumes, and
        # one commit after another made the last of 100 wait for 99 round trips.
        limit = asyncio.Semaphore(_PARALLEL_MOVES)

        async def bounded(move: Awaitable[None]) -> None:
            async with limit:
                await move

        await asyncio.gather(*(bounded(m) for m in moves))

    async def _move(
        self, view: VolumeView, target: AttachTarget, dest: str, nodes: dict[str, NodeRecord]
    ) -> None:
        svc = self.service
        keys = svc.keys
        vid = view.record.id
        record = FailoverRecord(
            source=target.node, dest=dest, kind="automatic", detected=time.time()
        )
        # Guarded on the target the pass view showed: if it moved since, this does nothing.
        txn = (
            svc.etcd.txn()
            .value_is(keys.target(vid), target.encode())
            .put(keys.target(vid), AttachTarget(dest, target.reason).encode())
        )
        if target.reason == "user":
            txn.put(keys.failover(vid), record.encode())
        if await svc.etcd.commit(txn):
            log.warning(
                "volume %s: node %s is down, failing over to %s",
                view.record.name,
                nodes[target.node].name if target.node in nodes else target.node,
                nodes[dest].name,
            )
