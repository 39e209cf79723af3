"""The node daemon: `pxcluster cluster join` runs one in the foreground.

Wiring only: it opens (or formats) the disks, starts the replica server, the NBD server and
the REST/metrics endpoint, and runs the node's control plane over them (`control.py`: the node's
record and lease in etcd, the agent, the leader election and the controllers). SIGTERM/SIGINT
stop it gracefully: volumes attached here are detached cleanly (flushed, chunks marked clean)
before the lease is revoked, so a planned stop is never an unclean failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from membership.etcd import Etcd, EtcdSettings
from membership.keys import Keys
from membership.records import ClusterRecord, DiskRecord, NodeRecord
from pxcluster.api import access
from pxcluster.api.app import ApiConfig, build_app, serve
from pxcluster.errors import JoinRefused
from pxcluster.nbd.export import ExportRegistry
from pxcluster.nbd.server import NbdServer
from pxcluster.nbd.tls import nbd_server_context
from pxcluster.node.agent import NodeAgent
from pxcluster.node.control import NodeControl
from pxcluster.node.metrics import Metrics
from pxcluster.node.paths import check_data_dir, inside
from pxcluster.node.peers import Peers
from pxcluster.service.core import is_loopback
from replica import auth
from replica.chunkstore import ChunkStore
from replica.errors import ForeignDisk, NotFormatted, UnjustifiedEpoch
from replica.fileio import OSFile
from replica.server import ReplicaServer
from replica.service import ReplicaService
from replica.tls import TlsFiles, client_context, server_context

log = logging.getLogger(__name__)


@dataclass
class NodeConfig:
    name: str
    address: str
    disks: list[str]
    etcd_url: str
    cluster: str
    zone: str = ""
    data_port: int = 9002
    nbd_port: int = 10809
    api_port: int = 9001
    data_dir: str = ""
    lease_ttl: int = 5
    wipe: bool = False
    chunk_size: int = 4 << 20
    replace_after: float = 300.0  # s a replica's node may stay down before it is replaced
    rebuild_bandwidth: int = 0  # bytes/s per rebuild, 0 = unlimited
    clean_after: float = 2.0  # s a chunk stays idle before it leaves the dirty-chunk log
    api_token_file: str = ""  # admin bearer token for the REST API
    api_read_token_file: str = ""  # read-only bearer token for the REST API
    api_address: str = ""  # REST listen address (empty: --address if loopback, else 127.0.0.1)
    api_insecure: bool = False  # allow a non-loopback REST listener without a token
    nbd_expose: bool = False  # also serve NBD over TCP on --address (needs nbd_tls_dir)
    nbd_tls_dir: str = ""  # NBD TLS: ca-cert.pem, server-cert.pem, server-key.pem (libnbd layout)
    docker_plugin_socket: str = ""  # serve the Docker volume plugin here (empty: off)
    etcd_settings: EtcdSettings = field(default_factory=EtcdSettings)  # etcd TLS, user
    data_tls: TlsFiles | None = None  # replica port TLS with client certificates (None: off)


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


async def ensure_cluster(etcd: Etcd, keys: Keys) -> ClusterRecord:
    record = ClusterRecord(keys.cluster, uuid.uuid4().hex, time.time())
    key = keys.cluster_record()
    await etcd.commit(etcd.txn().absent(key).put(key, record.encode()))
    kv = await etcd.get(key)
    assert kv is not None
    return ClusterRecord.decode(kv.value)


async def ensure_replica_key(etcd: Etcd, keys: Keys) -> bytes:
    """The cluster key of the replica port: made by the first node to join, read by the rest."""
    key = keys.replica_key()
    await etcd.commit(etcd.txn().absent(key).put(key, auth.new_key()))
    kv = await etcd.get(key)
    assert kv is not None
    return auth.check_key(bytes(kv.value))


def dump_tasks() -> None:
    """SIGUSR1: log every asyncio task's stack, to see what a stuck daemon waits on."""
    for task in asyncio.all_tasks():
        frames = task.get_stack(limit=8)
        where = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames))
        log.warning("task %s: %s", task.get_name(), where or "(no frames)")


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.keys = Keys(config.cluster)
        self.etcd = Etcd(config.etcd_url, settings=config.etcd_settings, spread_by=config.name)
        self.stores: list[ChunkStore] = []
        self.disk_paths: list[str] = []
        self.node_id = ""
        self.cluster_id = ""
        self.registry = ExportRegistry()
        # An empty or unreadable token file refuses the start: read as "no token" it would
        # leave the API open.
        self.api_tokens = access.read_tokens(config.api_token_file, config.api_read_token_file)
        self.metrics = Metrics()
        self.control = NodeControl(
            self.etcd,
            self.keys,
            config.lease_ttl,
            self.node_record,
            replace_after=config.replace_after,
        )
        self.replica_server: ReplicaServer | None = None
        self.nbd: NbdServer | None = None
        self.api: web.AppRunner | None = None
        self.service: ReplicaService | None = None

    # --- join

    def _observe_sync(self, callers: int, records: int) -> None:
        self.metrics.group_commit_callers.observe(callers)
        self.metrics.group_commit_records.observe(records)

    async def open_disks(self) -> None:
        """Recognise this cluster's disks, format new ones, refuse foreign ones (invariant 7)."""
        files = []
        try:
            ids: set[str] = set()
            fresh: list[int] = []
            for i, path in enumerate(self.config.disks):
                f = OSFile.open(path)
                files.append(f)
                try:
                    sb = ChunkStore.read_superblock(f)
                except NotFormatted:
                    fresh.append(i)
                    continue
                if sb.cluster_id != self.cluster_id:
                    if not self.config.wipe:
                        raise ForeignDisk(
                            f"disk {path} belongs to another cluster ({sb.cluster_id}); "
                            "pass --wipe to erase it"
                        )
                    fresh.append(i)
                    continue
                ids.add(sb.node_id)
            if len(ids) > 1:
                raise JoinRefused(f"disks belong to different nodes ({', '.join(sorted(ids))})")
            self.node_id = ids.pop() if ids else await self._new_node_id()
            for i in fresh:
                ChunkStore.format(
                    files[i],
                    cluster_id=self.cluster_id,
                    node_id=self.node_id,
                    disk_id=uuid.uuid4().hex[:12],
                    chunk_size=self.config.chunk_size,
                )
            for f in files:
                self.stores.append(
                    ChunkStore.open(f, cluster_id=self.cluster_id, boot_id=boot_id())
                )
            self.disk_paths = list(self.config.disks)
        except BaseException:
            for f in files[len(self.stores) :]:
                f.close()
            raise

    async def _new_node_id(self) -> str:
        for kv in await self.etcd.get_prefix(self.keys.nodes_prefix()):
            other = NodeRecord.decode(kv.value)
            if other.name == self.config.name and other.state != "removed":
                raise JoinRefused(
                    f"node name {self.config.name!r} belongs to node {other.id}, whose disks "
                    "these are not; remove that node first (pxcluster node remove)"
                )
        return uuid.uuid4().hex[:12]

    async def check_identity(self) -> None:
        """Refuse a name used by another live node; take over our own id's stale lease."""
        alive = {
            self.keys.split(kv.key)[-1]: kv.lease
            for kv in await self.etcd.get_prefix(self.keys.alive_prefix())
        }
        for kv in await self.etcd.get_prefix(self.keys.nodes_prefix()):
            other = NodeRecord.decode(kv.value)
            if other.id != self.node_id and other.name == self.config.name and other.id in alive:
                raise JoinRefused(f"node name {self.config.name!r} is in use by a live node")
        old_lease = alive.get(self.node_id)
        if old_lease:
            # We hold the disks' locks, so the process behind that lease is gone: its
            # attachments must go with it before we attach anything at a new epoch.
            log.warning("revoking lease %x of this node's previous run", old_lease)
            await self.etcd.revoke_lease(old_lease)

    def node_record(self, state: str) -> NodeRecord:
        disks = []
        for path, store in zip(self.disk_paths, self.stores, strict=True):
            st = store.stats()
            disks.append(DiskRecord(path, store.superblock.disk_id, st.capacity, st.used).to_dict())
        c = self.config
        return NodeRecord(
            id=self.node_id,
            name=c.name,
            address=c.address,
            data_port=c.data_port,
            nbd_port=c.nbd_port,
            api_port=c.api_port,
            zone=c.zone,
            state=state,
            disks=disks,
            capacity=sum(d["capacity"] for d in disks),
            used=sum(d["used"] for d in disks),
            boot_id=boot_id(),
            data_dir=c.data_dir,
            rebuild_bandwidth=c.rebuild_bandwidth,
            nbd_address=self.nbd_address,
            nbd_tls_dir=c.nbd_tls_dir,
        )

    # --- run

    async def start(self) -> None:
        c = self.config
        if c.nbd_expose and not c.nbd_tls_dir and not is_loopback(c.address):
            raise JoinRefused(
                f"--nbd-expose serves NBD on {c.address}, a network address: "
                "it needs --nbd-tls-dir (clients then prove a certificate from its CA)"
            )
        await self.etcd.connect()
        self.cluster_id = (await ensure_cluster(self.etcd, self.keys)).id
        replica_key = await ensure_replica_key(self.etcd, self.keys)
        await self.open_disks()
        await self.check_identity()
        c.data_dir = check_data_dir(c.data_dir)
        self.service = ReplicaService(self.stores, epoch_guard=self._justify_epoch)
        for store in self.stores:
            store.on_sync = self._observe_sync
        self.replica_server = ReplicaServer(self.service, replica_key)
        tls = c.data_tls
        await self.replica_server.start(
            c.address, c.data_port, tls=server_context(tls) if tls else None
        )
        self.nbd = NbdServer(self.registry, latency=self.metrics.nbd_latency)
        nbd_tls = nbd_server_context(c.nbd_tls_dir) if c.nbd_tls_dir else None
        await self.nbd.start_tcp(self.nbd_address, c.nbd_port, tls=nbd_tls)
        if c.data_dir:
            sock = inside(c.data_dir, "nbd.sock")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)
            await self.nbd.start_unix(sock)
        await self._start_api()
        if c.docker_plugin_socket:
            from pxcluster.api.docker_plugin import start_plugin

            # Held: under uvloop an unreferenced server is collected and stops listening.
            self.docker_plugin = await start_plugin(
                c.docker_plugin_socket, self, c.name, c.data_dir
            )
        await self.control.register(self.node_id)
        peers = Peers(
            self.node_id,
            self.service,
            key=replica_key,
            tls=client_context(tls) if tls else None,
        )
        agent = NodeAgent(
            self.node_id,
            self.etcd,
            self.keys,
            self.control.lease,
            peers,
            self.registry,
            rebuild_bandwidth=c.rebuild_bandwidth,
            clean_after=c.clean_after,
            metrics=self.metrics,
        )
        self.control.start(agent)
        log.info(
            "node %s (%s) joined cluster %s: data %s:%d nbd %s:%d%s",
            c.name,
            self.node_id,
            c.cluster,
            c.address,
            c.data_port,
            self.nbd_address,
            c.nbd_port,
            " (TLS required)" if c.nbd_tls_dir else "",
        )

    async def _justify_epoch(self, volume: str, epoch: int) -> None:
        """A replica's epoch is raised only to one the cluster handed out (invariant 4): an
        epoch above the volume's in etcd was never given to an engine, and would fence every
        real engine for good."""
        kv = await self.etcd.get(self.keys.epoch(volume))
        current = int(kv.value) if kv is not None else -1
        if epoch > current:
            raise UnjustifiedEpoch(
                f"volume {volume!r}: epoch {epoch} is above the cluster's ({current})"
            )

    async def _start_api(self) -> None:
        c, tokens = self.config, self.api_tokens
        host = access.listen_address(c.address, c.api_address)
        access.check_exposure(host, tokens, c.api_insecure)
        app = build_app(self, ApiConfig(token=tokens.admin, read_token=tokens.read))
        self.api = await serve(app, host, c.api_port)
        log.info(
            "REST API on %s:%d (%s)",
            host,
            c.api_port,
            "tokens required" if tokens.any else "open: no token configured",
        )

    @property
    def nbd_address(self) -> str:
        """NBD is for the consumer on this host: loopback unless exposed on purpose (then
        with TLS, checked at join)."""
        c = self.config
        return c.address if c.nbd_expose or is_loopback(c.address) else "127.0.0.1"

    # --- what the API sees of the node (pxcluster.api.app.NodeView)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def cluster(self) -> str:
        return self.config.cluster

    def lease_healthy(self) -> bool:
        return self.control.lease.healthy()

    def refresh_metrics(self) -> None:
        m = self.metrics
        m.lease_healthy.set(1 if self.control.lease.healthy() else 0)
        stats = [st.stats() for st in self.stores]
        m.capacity.set(sum(x.capacity for x in stats))
        m.used.set(sum(x.used for x in stats))

    async def stop(self) -> None:
        await self.control.stop()
        if self.nbd is not None:
            await self.nbd.close()
        if self.replica_server is not None:
            await self.replica_server.close()
        if self.api is not None:
            await self.api.cleanup()
        await self.control.lease.stop(revoke=True)
        for store in self.stores:
            await store.close()
        await self.etcd.close()

    async def run_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.control.stopping.set)
        loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
        print(f"node {self.config.name} ({self.node_id}) is up", flush=True)
        await self.control.stopping.wait()
        log.info("stopping node %s", self.config.name)
        await self.stop()
