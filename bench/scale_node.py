"""A worker process of `bench/scale.py`: many simulated storage nodes as asyncio tasks.

Each simulated node runs its own etcd client (`membership.etcd.Etcd`) and the control plane of
`pxcluster.node.daemon.Node`, `pxcluster.node.control.NodeControl`: the node record and
`alive/<id>` bound to a `LeaseKeeper`'s lease, the rejoin when the lease is lost, the
node-record refresh, an `Election`, a `ControllerRunner` with the leader's controllers, and the
real `pxcluster.node.agent.NodeAgent`. Only the data path is replaced: the agent builds
`SimEngine`s instead of `VolumeEngine`s (no replica connections, no NBD server), and the node
has no disks.

Two agents:
  * `real`: `NodeAgent.run` unchanged (a full read of every volume on every change under the
    cluster prefix and at least once a second, on every node).
  * `lite` (default): `LiteAgent`, which watches `volumes/` and acts only on the attach targets
    naming its node, then calls the real `NodeAgent.attach`/`detach`. So the writes an attach
    makes (epoch bump + `opening` attachment bound to the lease, stale marks for unreachable
    replicas, the failover record, the `serving`/exported attachment) are the real code's.

`SimEngine.open` reads `alive/` and treats a replica as reachable iff its node is alive; the
unreachable ones are marked stale through the real `EtcdReplicaState` (invariant 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

from membership.etcd import Etcd, EtcdUnavailable
from membership.keys import Keys
from membership.records import Attachment, AttachTarget, DiskRecord, NodeRecord
from pxcluster.engine.errors import Fenced, NoInSyncReplica
from pxcluster.engine.state import EtcdReplicaState
from pxcluster.engine.volume import VOLUME_COUNTERS, OpenReport, VolumeSpec
from pxcluster.nbd.export import Export, ExportRegistry
from pxcluster.node.agent import MakeEngine, NodeAgent
from pxcluster.node.control import NodeControl
from pxcluster.node.daemon import boot_id
from pxcluster.node.peers import Peers
from replica.api import ReplicaAPI

log = logging.getLogger("scale")

NODE_CAPACITY = 4 << 40  # what each simulated node's one (absent) disk reports


# --- the replaced data path


class _NoLimits:
    def set(self, iops: int, bandwidth: int) -> None:
        pass


class SimEngine:
    """What `NodeAgent` uses of a `VolumeEngine`, without replicas or I/O."""

    def __init__(
        self,
        spec: VolumeSpec,
        epoch: int,
        replicas: dict[str, ReplicaAPI],
        *,
        local_node: str,
        state: EtcdReplicaState,
        lease_ok: Callable[[], bool],
        on_fenced: Callable[[], Awaitable[None]],
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.size = spec.size
        self.epoch = epoch
        self.local_node = local_node
        self._all = dict(replicas)
        self._state = state
        self._lease_ok = lease_ok
        self.in_sync: dict[str, ReplicaAPI] = {}
        self.rebuilding: dict[str, Any] = {}
        self.snapshots: list[Any] = []
        self.fenced = False
        self.cipher: Any = None
        self.hydration: Any = None
        self.limits = _NoLimits()
        self.counters = dict.fromkeys(VOLUME_COUNTERS, 0)

    @property
    def in_sync_count(self) -> int:
        return len(self.in_sync)

    @property
    def replica_count(self) -> int:
        return len(self._all)

    @property
    def limit_settings(self) -> tuple[int, int]:
        return (0, 0)

    async def open(self, snapshots: list[str] | None = None) -> OpenReport:
        # The real engine connects to each replica; here a replica answers iff its node is up.
        st = self._state
        alive = {
            st.keys.split(kv.key)[-1] for kv in await st.etcd.get_prefix(st.keys.alive_prefix())
        }
        opened = sorted(n for n in self._all if n in alive)
        failed = sorted(n for n in self._all if n not in alive)
        if not opened:
            raise NoInSyncReplica(f"volume {self.name}: no in-sync replica could be opened")
        if failed and not await st.mark_stale(failed):
            raise Fenced(f"volume {self.name}: epoch {self.epoch} is no longer current")
        self.in_sync = {n: self._all[n] for n in opened}
        return OpenReport(opened, failed, 0)

    def start_cleaner(self, after: float) -> None:
        pass

    def stop_hydration(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def grow(self, size: int) -> None:
        self.size = size

    async def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        pass

    async def flush(self) -> None:
        pass

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        pass

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        pass


class SimPeers(Peers):
    """No replica connections: a replica is named by its node id only."""

    def get(self, node: NodeRecord) -> ReplicaAPI:
        return node.id  # type: ignore[return-value]


@dataclass
class Served:
    """One stretch of time a node exported a volume (in the registry NBD clients would use)."""

    volume: str
    node: str
    epoch: int
    start: float
    end: float = 0.0


class TrackingRegistry(ExportRegistry):
    def __init__(self, node_id: str, log_to: list[Served]) -> None:
        super().__init__()
        self.node_id = node_id
        self.log = log_to
        self.open: dict[str, Served] = {}

    def add(self, export: Export) -> None:
        super().add(export)
        engine: SimEngine = export  # type: ignore[assignment]
        s = Served(engine.spec.id, self.node_id, engine.epoch, time.time())
        self.open[export.name] = s
        self.log.append(s)

    async def remove(self, name: str, *, timeout: float = 30.0) -> None:
        s = self.open.pop(name, None)
        if s is not None:
            s.end = time.time()
        await super().remove(name, timeout=timeout)

    def close_all(self, at: float) -> None:
        for s in self.open.values():
            s.end = at
        self.open.clear()


# --- the lite agent


class LiteAgent(NodeAgent):
    """Acts on the attach targets naming this node (seen on a watch of `volumes/`) instead of
    re-reading every volume on every change; attach and detach are the real agent's."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.wanted: set[str] = set()
        self.kick = asyncio.Event()
        self.watch_events = 0

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self._watch_loop(), name="lite-watch"),
            asyncio.create_task(self._attach_loop(), name="lite-attach"),
            asyncio.create_task(self._fence_loop(), name="lite-fence"),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _resync(self) -> None:
        """After (re)opening the watch: one full read, as the real agent's every pass is."""
        wanted = set()
        for view in await self.service.volumes():
            if view.target is not None and view.target.node == self.node_id:
                wanted.add(view.record.id)
        self.wanted = wanted
        for vid in [v for v in self.engines if v not in wanted]:
            await self.detach(vid)
        self.kick.set()

    async def _watch_loop(self) -> None:
        prefix = self.keys.volumes_prefix()
        while True:
            try:
                watch = await self.etcd._call(lambda: self.etcd._client.watch_prefix(prefix))
                try:
                    await self._resync()
                    async for ev in watch:
                        self.watch_events += 1
                        await self._on_event(ev)
                finally:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(self.etcd.timeout):
                            await watch.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("node %s: target watch failed: %s", self.node_id, e)
                await asyncio.sleep(1.0)

    async def _on_event(self, ev: Any) -> None:
        parts = self.keys.split(ev.kv.key)
        if len(parts) != 3:
            return
        vid, leaf = parts[1], parts[2]
        put = ev.kind == "PUT"
        if leaf == "target":
            mine = put and AttachTarget.decode(ev.kv.value).node == self.node_id
            if mine:
                self.wanted.add(vid)
                self.kick.set()
            else:
                self.wanted.discard(vid)
                if vid in self.engines:
                    await self.detach(vid)
        elif leaf == "attachment":
            engine = self.engines.get(vid)
            if engine is not None:
                held = Attachment.decode(ev.kv.value) if put else None
                if held is None or held.node != self.node_id or held.epoch != engine.epoch:
                    await self._drop(vid, engine, reason="attachment lost")  # type: ignore[arg-type]
            if not put and vid in self.wanted:
                self.kick.set()  # the old holder's lease expired: the volume is free now

    async def _attach_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._pass_interval):
                    await self.kick.wait()
            self.kick.clear()
            if not self.lease.healthy():
                continue
            for vid in sorted(self.wanted - set(self.engines)):
                now = asyncio.get_running_loop().time()
                if now < self._failures.get(vid, 0.0):
                    continue
                try:
                    view = await self.service.volume_by_id(vid)
                    if view.target is not None and view.target.node == self.node_id:
                        await self.attach(view)
                except EtcdUnavailable as e:
                    log.warning("node %s: attach of %s skipped: %s", self.node_id, vid, e)
                except Exception:
                    log.exception("node %s: attach of %s failed", self.node_id, vid)

    async def _fence_loop(self) -> None:
        """Self-fencing (invariant 4): what the real agent's pass does first."""
        while True:
            await asyncio.sleep(0.25)
            if self.engines and not self.lease.healthy():
                await self.fence_all("node lease at risk")


# --- a simulated node


class SimNode:
    def __init__(
        self,
        node_id: str,
        name: str,
        zone: str,
        cfg: dict[str, Any],
        served: list[Served],
    ) -> None:
        self.node_id = node_id
        self.name = name
        self.zone = zone
        self.cfg = cfg
        self.keys = Keys(cfg["cluster"])
        self.etcd = Etcd(cfg["etcd"], spread_by=name)
        self.control = NodeControl(self.etcd, self.keys, cfg["ttl"], self.record)
        self.registry = TrackingRegistry(node_id, served)
        self.dead = False

    def record(self, state: str) -> NodeRecord:
        disk = DiskRecord(f"/sim/{self.name}/disk0", self.node_id[:12], NODE_CAPACITY, 0)
        return NodeRecord(
            id=self.node_id,
            name=self.name,
            address="127.0.0.1",
            data_port=9002,
            nbd_port=10809,
            api_port=9001,
            zone=self.zone,
            state=state,
            disks=[disk.to_dict()],
            capacity=NODE_CAPACITY,
            used=0,
            boot_id=boot_id(),
        )

    async def start(self) -> None:
        await self.etcd.connect()
        await self.control.register(self.node_id)
        agent_cls = LiteAgent if self.cfg["agent"] == "lite" else NodeAgent
        agent = agent_cls(
            self.node_id,
            self.etcd,
            self.keys,
            self.control.lease,
            SimPeers(self.node_id, None, key=b""),  # type: ignore[arg-type]
            self.registry,
            make_engine=cast(MakeEngine, SimEngine),
        )
        self.control.start(agent)

    async def kill(self) -> float:
        """As SIGKILL looks to etcd: everything stops at once, the lease is not revoked."""
        self.dead = True
        at = time.time()
        self.control.cancel()
        self.registry.close_all(at)
        await self.control.lease.stop(revoke=False)
        await self.control.wait_stopped()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.etcd.close()
        return at

    async def stop(self) -> None:
        if not self.dead:
            await self.kill()


# --- the worker process


@dataclass
class LoopLag:
    samples: list[float] = field(default_factory=list)

    async def run(self, period: float = 0.1) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(period)
            self.samples.append(max(0.0, loop.time() - t - period))

    def summary(self) -> dict[str, float]:
        s = sorted(self.samples) or [0.0]
        return {
            "p50_ms": round(s[len(s) // 2] * 1000, 1),
            "p99_ms": round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1000, 1),
            "max_ms": round(s[-1] * 1000, 1),
        }


class Worker:
    def __init__(self, conn: Connection, cfg: dict[str, Any]) -> None:
        self.conn = conn
        self.cfg = cfg
        self.served: list[Served] = []
        self.nodes: dict[str, SimNode] = {
            n["id"]: SimNode(n["id"], n["name"], n["zone"], cfg, self.served) for n in cfg["nodes"]
        }
        self.lag = LoopLag()
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()

    def reply(self, what: str, data: Any) -> None:
        self.conn.send((what, data))

    def stats(self) -> dict[str, Any]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "cpu_s": ru.ru_utime + ru.ru_stime,
            "max_rss_mb": ru.ru_maxrss // 1024,
            "lag": self.lag.summary(),
            "lease_lost": {n.node_id: n.control.leases_lost for n in self.nodes.values()},
            "leaders": [
                n.node_id
                for n in self.nodes.values()
                if not n.dead and n.control.election is not None and n.control.election.is_leader
            ],
            "watch_events": sum(
                n.control.agent.watch_events
                for n in self.nodes.values()
                if isinstance(n.control.agent, LiteAgent)
            ),
            "attached": sum(
                len(n.control.agent.engines) for n in self.nodes.values() if n.control.agent
            ),
        }

    async def start_all(self) -> None:
        sem = asyncio.Semaphore(16)

        async def one(n: SimNode) -> None:
            async with sem:
                await n.start()

        await asyncio.gather(*(one(n) for n in self.nodes.values()))

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.conn.fileno(), lambda: self.inbox.put_nowait(self.conn.recv()))
        lag = asyncio.create_task(self.lag.run())
        try:
            while True:
                cmd, arg = await self.inbox.get()
                if cmd == "start":
                    await self.start_all()
                    self.reply("started", len(self.nodes))
                elif cmd == "kill":
                    victims = [self.nodes[i] for i in arg if i in self.nodes]
                    times = await asyncio.gather(*(n.kill() for n in victims))
                    self.reply(
                        "killed", {n.node_id: t for n, t in zip(victims, times, strict=True)}
                    )
                elif cmd == "reset":
                    self.lag.samples.clear()
                    self.reply("reset", self.stats())
                elif cmd == "stats":
                    self.reply("stats", self.stats())
                elif cmd == "served":
                    self.reply("served", [s.__dict__ for s in self.served])
                elif cmd == "stop":
                    await asyncio.gather(*(n.stop() for n in self.nodes.values()))
                    self.reply("stopped", None)
                    return
        finally:
            lag.cancel()
            loop.remove_reader(self.conn.fileno())


def worker_main(conn: Connection, cfg: dict[str, Any]) -> None:
    import uvloop

    logging.basicConfig(
        level=logging.ERROR if cfg.get("quiet", True) else logging.WARNING,
        format=f"[w{cfg['index']}] %(asctime)s %(name)s %(levelname)s %(message)s",
    )
    uvloop.run(Worker(conn, cfg).main())
