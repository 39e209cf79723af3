"""Prometheus metrics of one node process, served at /metrics on its API port."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
# NBD request latency: 50 us (a local page-cache read) to 10 s (a replica timing out).
_LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    10,
)
LATENCY_OPS = ("read", "write", "flush")


class ServedVolume(Protocol):
    """What the collector reads of an engine (pxcluster.engine.volume.VolumeEngine)."""

    name: str
    counters: dict[str, int]

    @property
    def in_sync_count(self) -> int: ...

    @property
    def replica_count(self) -> int: ...

    @property
    def limit_settings(self) -> tuple[int, int]: ...


class _VolumeCollector(Collector):
    def __init__(self, volumes: Callable[[], Iterable[ServedVolume]]) -> None:
        self.volumes = volumes

    def collect(self) -> Iterator[Metric]:
        ops = CounterMetricFamily("pxc_volume_ops", "Requests served", labels=["volume", "op"])
        nbytes = CounterMetricFamily("pxc_volume_bytes", "Bytes served", labels=["volume", "op"])
        in_sync = GaugeMetricFamily(
            "pxc_volume_in_sync_replicas", "In-sync replicas", labels=["volume"]
        )
        stale = GaugeMetricFamily(
            "pxc_volume_stale_replicas", "Replicas not in sync (replication lag)", labels=["volume"]
        )
        limits = GaugeMetricFamily(
            "pxc_volume_limit", "I/O limits, 0 = none", labels=["volume", "kind"]
        )
        freed = CounterMetricFamily(
            "pxc_volume_chunks_freed",
            "Whole chunks trimmed, at once or in pieces that left them zeros (freed where held)",
            labels=["volume"],
        )
        for v in self.volumes():
            c = v.counters
            for op in ("read", "write", "trim"):
                ops.add_metric([v.name, op], c[f"{op}_ops"])
                nbytes.add_metric([v.name, op], c[f"{op}_bytes"])
            freed.add_metric([v.name], c["chunks_freed"])
            in_sync.add_metric([v.name], v.in_sync_count)
            stale.add_metric([v.name], v.replica_count - v.in_sync_count)
            iops, bw = v.limit_settings
            limits.add_metric([v.name, "iops"], iops)
            limits.add_metric([v.name, "bytes_per_second"], bw)
        yield from (ops, nbytes, freed, in_sync, stale, limits)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.failovers = Counter(
            "pxc_failovers", "Attachments moved onto this node", ["kind"], registry=r
        )
        self.failover_seconds = Histogram(
            "pxc_failover_seconds",
            "Seconds from the move's decision to each step on this node",
            ["phase"],
            buckets=_PHASE_BUCKETS,
            registry=r,
        )
        self.reconciled_chunks = Counter(
            "pxc_reconciled_chunks", "Dirty chunks made identical at attach", registry=r
        )
        self.rebuilds = Counter(
            "pxc_rebuilds", "Replica rebuilds run by engines on this node", ["result"], registry=r
        )
        self.rebuild_bytes = Counter(
            "pxc_rebuild_bytes", "Bytes copied by replica rebuilds", registry=r
        )
        self.attached_volumes = Gauge(
            "pxc_attached_volumes", "Volumes served by this node", registry=r
        )
        self.degraded_volumes = Gauge(
            "pxc_degraded_volumes",
            "Volumes served here with fewer in-sync replicas than replicas",
            registry=r,
        )
        self.capacity = Gauge("pxc_node_capacity_bytes", "Disk capacity", registry=r)
        self.used = Gauge("pxc_node_used_bytes", "Disk space in chunks", registry=r)
        self.group_commit_callers = Histogram(
            "pxc_journal_group_commit_callers",
            "flush() callers made durable by one fdatasync (group commit)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.group_commit_records = Histogram(
            "pxc_journal_group_commit_records",
            "Journal records written by one sync",
            buckets=(0, 1, 4, 16, 64, 256, 1024),
            registry=r,
        )
        self.lease_healthy = Gauge(
            "pxc_lease_healthy", "1 while the node's etcd lease is safely renewed", registry=r
        )
        self.volume_latency = Histogram(
            "pxc_volume_latency_seconds",
            "NBD request latency as its clients see it, from request to reply",
            ["volume", "op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._latency_children: dict[str, tuple[Histogram, Histogram, Histogram]] = {}

    def nbd_latency(self, volume: str) -> tuple[Histogram, Histogram, Histogram]:
        """The (read, write, flush) histograms of a volume, made once per volume and cached:
        the NBD server calls this when a connection binds to the volume, then only observes."""
        children = self._latency_children.get(volume)
        if children is None:
            h = self.volume_latency
            children = (
                h.labels(volume, "read"),
                h.labels(volume, "write"),
                h.labels(volume, "flush"),
            )
            self._latency_children[volume] = children
        return children

    def watch_volumes(self, volumes: Callable[[], Iterable[ServedVolume]]) -> None:
        self.registry.register(_VolumeCollector(volumes))

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
