"""Rebuilds of stale replicas (invariant 6), run by the engine that serves the volume.

A pass starts one task per replica that is not in sync and whose node is alive; the task runs
`pxcluster.engine.rebuild.rebuild` and keeps the replica's state and its rebuild op in etcd
(`rebuilding`, then `in_sync`, both guarded by the volume's epoch). A failed rebuild is tried
again after a back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from membership.etcd import Etcd, EtcdUnavailable
from membership.keys import Keys
from membership.records import NodeRecord, RebuildOp, ReplicaState
from pxcluster.engine.rebuild import Progress, rebuild
from pxcluster.engine.volume import VolumeEngine
from pxcluster.node.metrics import Metrics
from pxcluster.node.peers import Peers
from pxcluster.service.core import Service, VolumeView
from replica.api import ReplicaAPI

log = logging.getLogger(__name__)


class Rebuilds:
    """The rebuild tasks of the engines on one node, by (volume id, replica node id)."""

    def __init__(
        self,
        etcd: Etcd,
        keys: Keys,
        service: Service,
        peers: Peers,
        metrics: Metrics,
        wake: asyncio.Event,
        *,
        bandwidth: int = 0,
        retry_after: float = 1.0,
    ) -> None:
        self.etcd = etcd
        self.keys = keys
        self.service = service
        self.peers = peers
        self.metrics = metrics
        self.wake = wake  # set when a rebuild ends: the agent's next pass looks again
        self.bandwidth = bandwidth  # bytes/s per rebuild, 0: unlimited
        self._retry_after = retry_after
        self.tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._backoff: dict[tuple[str, str], float] = {}

    def running(self, vid: str) -> bool:
        return any(k[0] == vid for k in self.tasks)

    async def reconcile(self, view: VolumeView, engine: VolumeEngine, alive: set[str]) -> bool:
        """Start a rebuild of every replica of the volume that needs one and can have one now.
        Returns whether any replica of the volume still waits for a rebuild or is in one."""
        vid = view.record.id
        now = asyncio.get_running_loop().time()
        pending = False
        nodes: dict[str, NodeRecord] | None = None
        for node_id, state in view.replicas.items():
            if state.state == "in_sync" or node_id not in alive:
                continue
            pending = True
            key = (vid, node_id)
            if key in self.tasks or node_id in engine.in_sync or node_id in engine.rebuilding:
                continue
            if now < self._backoff.get(key, 0.0):
                continue
            if nodes is None:
                nodes = {n.id: n for n in await self.service.nodes()}
            if node_id not in nodes:
                continue
            target = self.peers.get(nodes[node_id])
            self.tasks[key] = asyncio.create_task(
                self._rebuild(vid, engine, node_id, target), name=f"rebuild-{vid}-{node_id}"
            )
        return pending or self.running(vid)

    async def cancel(self, vid: str) -> None:
        """Stop the volume's rebuilds; a later pass starts them again where they were."""
        tasks = [t for k, t in self.tasks.items() if k[0] == vid]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _rebuild(
        self, vid: str, engine: VolumeEngine, node_id: str, target: ReplicaAPI
    ) -> None:
        key = (vid, node_id)
        op_key = self.keys.rebuild_op(vid, node_id)
        epoch = engine.epoch
        last_report = 0.0

        def op(state: str, p: Progress | None = None, error: str = "") -> bytes:
            d = p.to_dict() if p is not None else {}
            fields = {**d, "volume": vid, "node": node_id, "epoch": epoch, "state": state}
            return RebuildOp.from_dict({**fields, "error": error}).encode()

        async def report(p: Progress) -> None:
            nonlocal last_report
            now = time.monotonic()
            if now - last_report >= 0.5:
                last_report = now
                with contextlib.suppress(EtcdUnavailable):
                    await self.etcd.put(op_key, op("running", p))

        async def mark_in_sync() -> bool:
            txn = (
                self.etcd.txn()
                .value_is(self.keys.epoch(vid), str(epoch).encode())
                .present(self.keys.replica(vid, node_id))
                .put(
                    self.keys.replica(vid, node_id),
                    ReplicaState(node_id, "in_sync", epoch).encode(),
                )
                .put(op_key, op("done", progress_box[0]))
            )
            return await self.etcd.commit(txn)

        progress_box: list[Progress | None] = [None]

        async def track(p: Progress) -> None:
            progress_box[0] = p
            await report(p)

        async def mark_rebuilding() -> bool:
            state = ReplicaState(node_id, "rebuilding", epoch).encode()
            txn = (
                self.etcd.txn()
                .value_is(self.keys.epoch(vid), str(epoch).encode())
                .present(self.keys.replica(vid, node_id))
                .put(self.keys.replica(vid, node_id), state)
                .put(op_key, op("running"))
            )
            return await self.etcd.commit(txn)

        try:
            progress = await rebuild(
                engine,
                node_id,
                target,
                mark_in_sync=mark_in_sync,
                on_open=mark_rebuilding,
                on_progress=track,
                bandwidth=self.bandwidth,
            )
            self._backoff.pop(key, None)
            self.metrics.rebuilds.labels("done").inc()
            self.metrics.rebuild_bytes.inc(progress.bytes_done)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("volume %s: rebuild of replica %s failed: %s", engine.name, node_id, e)
            self.metrics.rebuilds.labels("failed").inc()
            self._backoff[key] = asyncio.get_running_loop().time() + self._retry_after * 2
            with contextlib.suppress(Exception):
                await self.etcd.put(op_key, op("failed", progress_box[0], str(e) or repr(e)))
        finally:
            self.tasks.pop(key, None)
            self.wake.set()
