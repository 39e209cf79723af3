"""Prometheus metrics of one node process, served at /metrics on its API port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


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
        self.lease_healthy = Gauge(
            "pxc_lease_healthy", "1 while the node's etcd lease is safely renewed", registry=r
        )

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
