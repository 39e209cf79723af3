"""The node agent: makes this node's engines match what etcd asks for.

It attaches volumes whose target is this node (invariant 3: epoch bump and attachment bound to
this node's lease, in one transaction, before the engine opens the replicas), detaches those no
longer targeted here, fences every engine when the lease is at risk, and frees the chunks of
deleted volumes. State is re-read on every pass, so a missed event or a CLI that died half way
costs one pass, never a stuck volume.

The work an attached engine does besides serving is in modules of its own, which the agent
drives from its passes: rebuilds (`rebuilds.py`), clone copies (`hydration.py`), snapshot
requests (`snapshot_apply.py`) and scrubs (`scrub_apply.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from membership.etcd import Etcd, EtcdUnavailable
from membership.keys import Keys
from membership.lease import LeaseKeeper
from membership.records import Attachment, AttachTarget, FailoverRecord
from pxcluster.engine.crypt import BlockCipher
from pxcluster.engine.errors import VolumeIOError
from pxcluster.engine.state import EtcdReplicaState
from pxcluster.engine.volume import VolumeEngine, VolumeSpec
from pxcluster.errors import PxcError, UnknownVolume
from pxcluster.nbd.export import ExportRegistry
from pxcluster.node.hydration import Hydrations
from pxcluster.node.metrics import Metrics
from pxcluster.node.peers import Peers
from pxcluster.node.rebuilds import Rebuilds
from pxcluster.node.scrub_apply import apply_scrub
from pxcluster.node.snapshot_apply import SnapshotApplier
from pxcluster.service.core import Service, VolumeView
from replica.api import ReplicaAPI

log = logging.getLogger(__name__)


class MakeEngine(Protocol):
    """What the agent builds a volume's engine with: `VolumeEngine`, or a stand-in with its
    constructor (the scale simulation, bench/scale_node.py)."""

    def __call__(
        self,
        spec: VolumeSpec,
        epoch: int,
        replicas: dict[str, ReplicaAPI],
        *,
        local_node: str,
        state: EtcdReplicaState,
        lease_ok: Callable[[], bool],
        on_fenced: Callable[[], Coroutine[Any, Any, None]],
    ) -> VolumeEngine: ...


_RELIST_EVERY = 30.0
_PARALLEL_ATTACHES = 8


class NodeAgent:
    def __init__(
        self,
        node_id: str,
        etcd: Etcd,
        keys: Keys,
        lease: LeaseKeeper,
        peers: Peers,
        registry: ExportRegistry,
        *,
        retry_after: float = 1.0,
        pass_interval: float = 1.0,
        rebuild_bandwidth: int = 0,
        clean_after: float = 2.0,
        metrics: Metrics | None = None,
        make_engine: MakeEngine = VolumeEngine,
    ) -> None:
        self.node_id = node_id
        self.etcd = etcd
        self.keys = keys
        self.service = Service(etcd, keys.cluster)
        self.lease = lease
        self.peers = peers
        self.registry = registry
        self.engines: dict[str, VolumeEngine] = {}
        self.wake = asyncio.Event()
        self._retry_after = retry_after
        self._pass_interval = pass_interval
        self._failures: dict[str, float] = {}
        self.clean_after = clean_after
        self.make_engine = make_engine
        self.metrics = metrics or Metrics()
        self.metrics.watch_volumes(lambda: list(self.engines.values()))
        self.rebuilds = Rebuilds(
            etcd,
            keys,
            self.service,
            peers,
            self.metrics,
            self.wake,
            bandwidth=rebuild_bandwidth,
            retry_after=retry_after,
        )
        self.hydrations = Hydrations(
            node_id, etcd, keys, self.service, peers, self.wake, bandwidth=rebuild_bandwidth
        )
        self.snapshots = SnapshotApplier(etcd, keys, self.rebuilds)
        # Volumes whose attach target names this node, kept from the watch's events: a pass
        # reads only these and the ones served here, not every volume of the cluster (at 200
        # nodes and 2000 volumes, a full read per pass per node was ~400 MB/s out of etcd).
        self._targeted: set[str] = set()
        self._relist_at = 0.0  # monotonic time of the next full read; 0: at the next pass

    def _on_watch_event(self, key: bytes, value: bytes | None) -> None:
        parts = self.keys.split(key)
        if len(parts) != 3 or parts[0] != "volumes" or parts[2] != "target":
            return
        if value is not None and AttachTarget.decode(value).node == self.node_id:
            self._targeted.add(parts[1])
        else:
            self._targeted.discard(parts[1])

    def _on_watch_open(self) -> None:
        self._relist_at = 0.0  # changes while no watch was open were not seen

    async def run(self) -> None:
        watcher = asyncio.create_task(
            self.etcd.wake_on_changes(
                self.keys.root.encode(),
                self.wake,
                on_event=self._on_watch_event,
                on_open=self._on_watch_open,
            )
        )
        try:
            while True:
                # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a cancellation
                # that races with the event (gh-86296), and the node could never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._pass_interval):
                        await self.wake.wait()
                self.wake.clear()
                try:
                    await self.reconcile()
                except EtcdUnavailable as e:
                    log.warning("agent pass skipped: %s", e)
                except Exception:
                    log.exception("agent pass failed")
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def reconcile(self) -> None:
        if not self.lease.healthy():
            await self.fence_all("node lease at risk")
            return
        views = await self._relevant_views()
        for vid, engine in list(self.engines.items()):
            view = views.get(vid)
            mine = view is not None and view.target is not None and view.target.node == self.node_id
            attached = (
                view is not None
                and view.attachment is not None
                and view.attachment.node == self.node_id
                and view.attachment.epoch == engine.epoch
            )
            if view is not None:
                # A replica the leader removed (drained away, replaced) leaves the fan-out.
                for n in [n for n in engine.in_sync if n not in view.replicas]:
                    if len(engine.in_sync) > 1:
                        del engine.in_sync[n]
                for n in [n for n in engine.rebuilding if n not in view.replicas]:
                    del engine.rebuilding[n]
            if engine.fenced or not attached:
                await self._drop(
                    vid, engine, reason="fenced" if engine.fenced else "attachment lost"
                )
            elif not mine:
                await self.detach(vid)
            elif (
                view is not None
                and view.target is not None
                and view.target.reason == "user"
                and self.registry.get(engine.name) is not engine
            ):
                # Served here for a rebuild or a snapshot, now attached by a user on this
                # same node: the engine goes on, and clients may now reach it.
                self.registry.add(engine)
                attachment = Attachment(self.node_id, engine.epoch, "serving", True).encode()
                txn = (
                    self.etcd.txn()
                    .value_is(self.keys.epoch(vid), str(engine.epoch).encode())
                    .put(self.keys.attachment(vid), attachment, self.lease.lease_id)
                )
                await self.etcd.commit(txn)
                log.info("volume %s: exported (attached for clients)", engine.name)
        now = asyncio.get_running_loop().time()
        to_attach = [
            view
            for vid, view in views.items()
            if view.target is not None
            and view.target.node == self.node_id
            and vid not in self.engines
            and now >= self._failures.get(vid, 0.0)
        ]
        if to_attach:
            # Side by side: a node that takes over several volumes of a dead node opens them
            # (fence, reconcile, serve) at once, not each after the one before.
            limit = asyncio.Semaphore(_PARALLEL_ATTACHES)

            async def attach(view: VolumeView) -> None:
                async with limit:
                    await self.attach(view)

            results = await asyncio.gather(*(attach(v) for v in to_attach), return_exceptions=True)
            for view, result in zip(to_attach, results, strict=True):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if isinstance(result, BaseException):
                    log.error("volume %s: attach failed: %r", view.record.name, result)
        alive = await self.service.alive()
        for vid, engine in list(self.engines.items()):
            view = views.get(vid)
            if view is not None:
                await self.snapshots.apply(view, engine)
                await apply_scrub(self.etcd, self.keys, view, engine)
                if not await self.rebuilds.reconcile(view, engine, alive):
                    await self._let_go_if_done(view)
                await self._apply_settings(view, engine)
        self.metrics.attached_volumes.set(len(self.engines))
        self.metrics.degraded_volumes.set(
            sum(1 for vid, e in self.engines.items() if len(e.in_sync) < len(views[vid].replicas))
        )
        await self._empty_trash()

    async def _relevant_views(self) -> dict[str, VolumeView]:
        """Views of the volumes served here or targeted here, read now (linearizable reads):
        every decision of a pass is made on them. Which volumes are targeted here comes from
        the watch; a full read rebuilds that set when the watch (re)opens, and every
        `_RELIST_EVERY` seconds in case an event was lost."""
        now = time.monotonic()
        if now >= self._relist_at:
            every = {v.record.id: v for v in await self.service.volumes()}
            self._targeted = {
                vid
                for vid, v in every.items()
                if v.target is not None and v.target.node == self.node_id
            }
            self._relist_at = now + _RELIST_EVERY
            return {
                vid: v for vid, v in every.items() if vid in self._targeted or vid in self.engines
            }
        vids = sorted(self._targeted | self.engines.keys())
        found = await asyncio.gather(
            *(self.service.volume_by_id(vid) for vid in vids), return_exceptions=True
        )
        views: dict[str, VolumeView] = {}
        for vid, view in zip(vids, found, strict=True):
            if isinstance(view, UnknownVolume):
                continue  # deleted since: a pass without it drops its engine
            if isinstance(view, BaseException):
                raise view
            views[vid] = view
        return views

    async def attach(self, view: VolumeView) -> None:
        rec = view.record
        vid = rec.id
        if view.attachment is not None and view.attachment.node != self.node_id:
            return  # still held by another node; its lease or its detach will free it
        epoch_kv = await self.etcd.get(self.keys.epoch(vid))
        held = await self.etcd.get(self.keys.attachment(vid))
        if epoch_kv is None:
            return
        epoch = int(epoch_kv.value) + 1
        txn = self.etcd.txn().unchanged(self.keys.epoch(vid), epoch_kv.mod_revision)
        if held is None:
            txn.absent(self.keys.attachment(vid))
        else:
            # Our own attachment, left by an engine this node stopped (its lease was at
            # risk): take it over at a new epoch, which fences that engine's replicas too.
            if Attachment.decode(held.value).node != self.node_id:
                return
            txn.unchanged(self.keys.attachment(vid), held.mod_revision)
        txn = txn.put(self.keys.epoch(vid), str(epoch).encode()).put(
            self.keys.attachment(vid),
            Attachment(self.node_id, epoch, "opening").encode(),
            self.lease.lease_id,
        )
        if not await self.etcd.commit(txn):
            return
        fenced_at = time.time()
        nodes = {n.id: n for n in await self.service.nodes()}
        replicas = {
            node_id: self.peers.get(nodes[node_id])
            for node_id, state in view.replicas.items()
            if state.state == "in_sync" and node_id in nodes
        }
        engine = self.make_engine(
            VolumeSpec(vid, rec.name, rec.size, rec.chunk_size, rec.sync_writes),
            epoch,
            replicas,
            local_node=self.node_id,
            state=EtcdReplicaState(self.etcd, self.keys, vid, epoch),
            lease_ok=self.lease.healthy,
            on_fenced=lambda: self._on_engine_fenced(vid),
        )
        try:
            if rec.encrypted:
                engine.cipher = BlockCipher(await self.service.volume_key(vid))
            report = await engine.open([r.id for r in view.ready_snapshots()])
        except Exception as e:
            log.error("volume %s: attach at epoch %d failed: %s", rec.name, epoch, e)
            self._failures[vid] = asyncio.get_running_loop().time() + self._retry_after
            await self._release(vid, epoch)
            return
        reconciled_at = time.time()
        self._failures.pop(vid, None)
        self.engines[vid] = engine
        engine.start_cleaner(self.clean_after)
        if view.hydration is not None and view.hydration.state == "running":
            try:
                await self.hydrations.start(view, engine, view.hydration)
            except Exception as e:
                log.error("volume %s: clone copy cannot start: %s", rec.name, e)
                await self._drop(vid, engine, reason=f"clone source unavailable: {e}")
                await self._release(vid, epoch)
                self._failures[vid] = asyncio.get_running_loop().time() + self._retry_after
                return
        if view.target is None or view.target.reason == "user":
            self.registry.add(engine)
        await self._record_failover(vid, epoch, fenced_at, reconciled_at, report.reconciled_chunks)
        exported = view.target is None or view.target.reason == "user"
        serving = Attachment(self.node_id, epoch, "serving", exported).encode()
        txn = (
            self.etcd.txn()
            .value_is(self.keys.epoch(vid), str(epoch).encode())
            .put(self.keys.attachment(vid), serving, self.lease.lease_id)
        )
        if not await self.etcd.commit(txn):
            await self._drop(vid, engine, reason="epoch moved on while opening")
            return
        log.info(
            "volume %s attached at epoch %d (replicas %s, stale %s, reconciled %d chunks)",
            rec.name,
            epoch,
            report.opened,
            report.marked_stale,
            report.reconciled_chunks,
        )

    async def detach(self, vid: str) -> None:
        await self.rebuilds.cancel(vid)
        engine = self.engines.pop(vid)
        engine.stop_hydration()
        await self.registry.remove(engine.name)
        try:
            await engine.close()
        except Exception as e:
            log.error("volume %s: clean detach failed (%s); chunks stay dirty", engine.name, e)
        await self._release(vid, engine.epoch)
        log.info("volume %s detached (epoch %d)", engine.name, engine.epoch)

    async def detach_all(self) -> None:
        for vid in list(self.engines):
            await self.detach(vid)

    async def hand_off_all(self) -> None:
        """Planned stop: point every volume served here at another node first, so the move is
        a clean hand-off (flushed, chunks clean, no reconcile) rather than a failover."""
        for engine in list(self.engines.values()):
            try:
                await self.service.failover(engine.name, None)
            except (PxcError, EtcdUnavailable) as e:
                log.warning("volume %s: no hand-off before stopping: %s", engine.name, e)
        await self.detach_all()

    async def fence_all(self, reason: str) -> None:
        for vid, engine in list(self.engines.items()):
            await self._drop(vid, engine, reason=reason)

    async def _drop(self, vid: str, engine: VolumeEngine, *, reason: str) -> None:
        """Stop serving without touching the replicas: another engine may own them now."""
        self.engines.pop(vid, None)
        engine.fenced = True
        engine.stop_hydration()
        await self.rebuilds.cancel(vid)
        await self.registry.remove(engine.name)
        log.warning("volume %s epoch %d: stopped serving: %s", engine.name, engine.epoch, reason)

    async def _on_engine_fenced(self, vid: str) -> None:
        engine = self.engines.get(vid)
        if engine is not None:
            await self._drop(vid, engine, reason="fenced")
        self.wake.set()

    async def _release(self, vid: str, epoch: int) -> None:
        txn = (
            self.etcd.txn()
            .value_is(self.keys.epoch(vid), str(epoch).encode())
            .delete(self.keys.attachment(vid))
        )
        with contextlib.suppress(EtcdUnavailable):
            await self.etcd.commit(txn)

    async def _apply_settings(self, view: VolumeView, engine: VolumeEngine) -> None:
        rec = view.record
        engine.limits.set(rec.iops_limit, rec.bw_limit)
        if rec.size > engine.size:
            try:
                await engine.grow(rec.size)
                log.info("volume %s grown to %d bytes", rec.name, rec.size)
            except VolumeIOError as e:
                log.warning("volume %s: growing to %d failed: %s", rec.name, rec.size, e)

    async def _record_failover(
        self, vid: str, epoch: int, fenced: float, reconciled: float, chunks: int
    ) -> None:
        kv = await self.etcd.get(self.keys.failover(vid))
        if kv is None:
            return
        rec = FailoverRecord.decode(kv.value)
        if rec.dest != self.node_id or rec.serving:
            return
        done = FailoverRecord.from_dict(
            rec.to_dict()
            | {
                "fenced": fenced,
                "reconciled": reconciled,
                "serving": time.time(),
                "epoch": epoch,
                "reconciled_chunks": chunks,
            }
        )
        txn = self.etcd.txn().unchanged(self.keys.failover(vid), kv.mod_revision)
        await self.etcd.commit(txn.put(self.keys.failover(vid), done.encode()))
        m = self.metrics
        m.failovers.labels(rec.kind).inc()
        m.reconciled_chunks.inc(chunks)
        m.failover_seconds.labels("fence").observe(max(0.0, fenced - rec.detected))
        m.failover_seconds.labels("reconcile").observe(max(0.0, reconciled - fenced))
        m.failover_seconds.labels("serve").observe(max(0.0, done.serving - rec.detected))

    async def _let_go_if_done(self, view: VolumeView) -> None:
        """Called once no replica of the volume waits for a rebuild: a volume attached here
        only to rebuild it or to work on its snapshots is let go when that work is done."""
        target = view.target
        if target is None or target.reason not in ("rebuild", "snapshot") or _snapshot_work(view):
            return
        key = self.keys.target(view.record.id)
        await self.etcd.commit(self.etcd.txn().value_is(key, target.encode()).delete(key))

    async def _empty_trash(self) -> None:
        for kv in await self.etcd.get_prefix(self.keys.trash_prefix(self.node_id)):
            vid = self.keys.split(kv.key)[-1]
            await self.peers.local.discard(vid)
            await self.etcd.delete(kv.key)
            log.info("volume %s (%s): chunks freed", kv.value.decode(), vid)


def _snapshot_work(view: VolumeView) -> bool:
    """Snapshot requests still waiting for the engine that serves the volume."""
    busy = any(r.state in ("creating", "deleting") for r in view.snapshots.values())
    busy = busy or (view.scrub is not None and view.scrub.state == "pending")
    busy = busy or (view.hydration is not None and view.hydration.state == "running")
    return busy or (view.revert is not None and view.revert.state == "pending")
