"""The node agent: makes this node's engines match what etcd asks for.

It attaches volumes whose target is this node (invariant 3: epoch bump and attachment bound to
this node's lease, in one transaction, before the engine opens the replicas), detaches those no
longer targeted here, fences every engine when the lease is at risk, and frees the chunks of
deleted volumes. State is re-read on every pass, so a missed event or a CLI that died half way
costs one pass, never a stuck volume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable

from membership.etcd import Etcd, EtcdUnavailable
from membership.keys import Keys
from membership.lease import LeaseKeeper
from membership.records import (
    Attachment,
    AttachTarget,
    FailoverRecord,
    HydrationRecord,
    NodeRecord,
    RebuildOp,
    ReplicaState,
    RevertRecord,
    ScrubRecord,
    SnapshotRecord,
)
from pxcluster.engine.crypt import BlockCipher
from pxcluster.engine.errors import VolumeIOError
from pxcluster.engine.hydrate import Hydration
from pxcluster.engine.rebuild import Progress, rebuild
from pxcluster.engine.scrub import scrub
from pxcluster.engine.state import EtcdReplicaState
from pxcluster.engine.volume import VolumeEngine, VolumeSpec
from pxcluster.errors import PxcError, UnknownVolume
from pxcluster.nbd.export import ExportRegistry
from pxcluster.node.metrics import Metrics
from pxcluster.service.core import Service, VolumeView
from replica.api import ReplicaAPI
from replica.client import ReplicaClient
from replica.service import ReplicaService

log = logging.getLogger(__name__)


class Peers:
    """One replica client per peer node, reused by every engine on this node."""

    def __init__(
        self,
        local_id: str,
        local: ReplicaService,
        *,
        key: bytes,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.local_id = local_id
        self.local = local
        self.key = key  # the cluster key every peer's replica server asks us to prove
        self.tls = tls  # replica port TLS (replica.tls.client_context), None: plain TCP
        self._clients: dict[str, tuple[tuple[str, int], ReplicaClient]] = {}

    def get(self, node: NodeRecord) -> ReplicaAPI:
        if node.id == self.local_id:
            return self.local
        where = (node.address, node.data_port)
        known = self._clients.get(node.id)
        if known is None or known[0] != where:
            client = ReplicaClient(node.address, node.data_port, tls=self.tls, key=self.key)
            self._clients[node.id] = (where, client)
            return client
        return known[1]

    async def close(self) -> None:
        for _, client in self._clients.values():
            await client.close()
        self._clients.clear()


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
        self.rebuild_bandwidth = rebuild_bandwidth
        self.clean_after = clean_after
        self.metrics = metrics or Metrics()
        self.metrics.watch_volumes(lambda: list(self.engines.values()))
        self.rebuilds: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._rebuild_backoff: dict[tuple[str, str], float] = {}
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
                await self._apply_snapshots(view, engine)
                await self._apply_scrub(view, engine)
                await self._reconcile_rebuilds(view, engine, alive)
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
        engine = VolumeEngine(
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
                await self._start_hydration(view, engine, view.hydration)
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
        await self._cancel_rebuilds(vid)
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
        await self._cancel_rebuilds(vid)
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

    # --- rebuilds (invariant 6), run by the engine that serves the volume

    async def _reconcile_rebuilds(
        self, view: VolumeView, engine: VolumeEngine, alive: set[str]
    ) -> None:
        vid = view.record.id
        now = asyncio.get_running_loop().time()
        pending = False
        nodes: dict[str, NodeRecord] | None = None
        for node_id, state in view.replicas.items():
            if state.state == "in_sync" or node_id not in alive:
                continue
            pending = True
            key = (vid, node_id)
            if key in self.rebuilds or node_id in engine.in_sync or node_id in engine.rebuilding:
                continue
            if now < self._rebuild_backoff.get(key, 0.0):
                continue
            if nodes is None:
                nodes = {n.id: n for n in await self.service.nodes()}
            if node_id not in nodes:
                continue
            target = self.peers.get(nodes[node_id])
            self.rebuilds[key] = asyncio.create_task(
                self._rebuild(vid, engine, node_id, target), name=f"rebuild-{vid}-{node_id}"
            )
        if (
            not pending
            and not any(k[0] == vid for k in self.rebuilds)
            and view.target is not None
            and view.target.reason in ("rebuild", "snapshot")
            and not _snapshot_work(view)
        ):
            # Attached here only to rebuild it or to work on its snapshots: done, let it go.
            txn = self.etcd.txn().value_is(self.keys.target(vid), view.target.encode())
            await self.etcd.commit(txn.delete(self.keys.target(vid)))

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
                bandwidth=self.rebuild_bandwidth,
            )
            self._rebuild_backoff.pop(key, None)
            self.metrics.rebuilds.labels("done").inc()
            self.metrics.rebuild_bytes.inc(progress.bytes_done)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("volume %s: rebuild of replica %s failed: %s", engine.name, node_id, e)
            self.metrics.rebuilds.labels("failed").inc()
            self._rebuild_backoff[key] = asyncio.get_running_loop().time() + self._retry_after * 2
            with contextlib.suppress(Exception):
                await self.etcd.put(op_key, op("failed", progress_box[0], str(e) or repr(e)))
        finally:
            self.rebuilds.pop(key, None)
            self.wake.set()

    # --- snapshots, taken and dropped by the engine that serves the volume

    async def _apply_snapshots(self, view: VolumeView, engine: VolumeEngine) -> None:
        vid = view.record.id
        for rec in sorted(view.snapshots.values(), key=lambda r: (r.requested, r.id)):
            key = self.keys.snapshot(vid, rec.id)
            if rec.state == "creating":
                await self._cancel_rebuilds(vid)  # they restart, copying the snapshot too
                try:
                    created = time.time()
                    await engine.snapshot(rec.id, rec.name, created)
                    done = SnapshotRecord.from_dict(
                        rec.to_dict() | {"state": "ready", "created": created}
                    )
                    log.info("volume %s: snapshot %s taken", engine.name, rec.name)
                except (VolumeIOError, PxcError) as e:
                    done = SnapshotRecord.from_dict(
                        rec.to_dict() | {"state": "failed", "error": str(e)}
                    )
                    log.warning("volume %s: snapshot %s failed: %s", engine.name, rec.name, e)
                txn = self.etcd.txn().value_is(key, rec.encode()).put(key, done.encode())
                await self.etcd.commit(txn)
            elif rec.state in ("deleting", "failed"):
                await self._cancel_rebuilds(vid)
                try:
                    await engine.delete_snapshot(rec.id)
                except (VolumeIOError, PxcError) as e:
                    log.warning("volume %s: deleting snapshot %s: %s", engine.name, rec.name, e)
                    continue
                if rec.state == "deleting":
                    await self.etcd.commit(self.etcd.txn().value_is(key, rec.encode()).delete(key))
        known = set(view.snapshots)
        for snap in [x for x in engine.snapshots if x.id not in known]:
            with contextlib.suppress(VolumeIOError, PxcError):
                await engine.delete_snapshot(snap.id)
        rv = view.revert
        if rv is not None and rv.state == "pending" and view.target is not None:
            key = self.keys.revert(vid)
            if view.target.reason == "user":
                failed = RevertRecord(rv.snapshot, "failed", "the volume is attached for clients")
                txn = self.etcd.txn().value_is(key, rv.encode()).put(key, failed.encode())
                await self.etcd.commit(txn)
                return
            await self._cancel_rebuilds(vid)
            try:
                await engine.revert(rv.snapshot)
            except (VolumeIOError, PxcError) as e:
                failed = RevertRecord(rv.snapshot, "failed", str(e))
                txn = self.etcd.txn().value_is(key, rv.encode()).put(key, failed.encode())
                await self.etcd.commit(txn)
                return
            log.info("volume %s: reverted to snapshot %s", engine.name, rv.snapshot)
            await self.etcd.commit(self.etcd.txn().value_is(key, rv.encode()).delete(key))

    async def _start_hydration(
        self, view: VolumeView, engine: VolumeEngine, rec: HydrationRecord
    ) -> None:
        src = await self.service.volume_by_id(rec.source_volume)
        alive = await self.service.alive()
        nodes = {n.id: n for n in await self.service.nodes()}
        sources = [
            self.peers.get(nodes[n])
            for n, st in sorted(src.replicas.items(), key=lambda x: x[0] != self.node_id)
            if st.state == "in_sync" and n in alive and n in nodes
        ]
        gens: dict[int, tuple[int, int]] | None = None
        for s in sources:
            try:
                gens = await s.snapshot_generations(rec.source_volume, rec.snapshot)
                break
            except Exception as e:
                log.warning("volume %s: clone source replica: %s", view.record.name, e)
        if gens is None:
            raise VolumeIOError("no replica of the source snapshot is reachable")
        extra = set(rec.extra)
        pending = {c for c in gens if c >= rec.watermark and c not in extra}
        key = self.keys.hydration(view.record.id)

        async def update(change: Callable[[HydrationRecord], HydrationRecord]) -> None:
            for _ in range(20):
                kv = await self.etcd.get(key)
                if kv is None:
                    return
                new = change(HydrationRecord.decode(kv.value))
                txn = self.etcd.txn().unchanged(key, kv.mod_revision).put(key, new.encode())
                if await self.etcd.commit(txn):
                    return
            raise VolumeIOError("clone copy progress could not be recorded")

        async def record_extra(chunk: int) -> None:
            await update(
                lambda r: HydrationRecord.from_dict(
                    r.to_dict() | {"extra": sorted({*r.extra, chunk})}
                )
            )

        async def record_watermark(mark: int) -> None:
            await update(
                lambda r: HydrationRecord.from_dict(
                    r.to_dict() | {"watermark": max(r.watermark, mark)}
                )
            )

        async def done() -> None:
            await update(
                lambda r: HydrationRecord.from_dict(
                    r.to_dict() | {"state": "done", "watermark": r.chunks_total}
                )
            )
            self.wake.set()

        engine.start_hydration(
            Hydration(
                rec.source_volume,
                rec.snapshot,
                sources,
                pending,
                record_extra,
                record_watermark,
                bandwidth=self.rebuild_bandwidth,
            ),
            done,
        )

    async def _apply_scrub(self, view: VolumeView, engine: VolumeEngine) -> None:
        rec = view.scrub
        if rec is None or rec.state != "pending":
            return
        key = self.keys.scrub(view.record.id)
        try:
            report = await scrub(engine)
            done = ScrubRecord.from_dict(
                rec.to_dict() | report.to_dict() | {"state": "done", "finished": time.time()}
            )
            log.info(
                "volume %s: scrubbed %d chunks, repaired %d, unrepairable %d",
                engine.name,
                report.chunks,
                len(report.repaired),
                len(report.unrepairable),
            )
        except (VolumeIOError, PxcError) as e:
            done = ScrubRecord.from_dict(
                rec.to_dict() | {"state": "failed", "error": str(e), "finished": time.time()}
            )
        txn = self.etcd.txn().value_is(key, rec.encode()).put(key, done.encode())
        await self.etcd.commit(txn)

    async def _cancel_rebuilds(self, vid: str) -> None:
        tasks = [t for k, t in self.rebuilds.items() if k[0] == vid]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

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
