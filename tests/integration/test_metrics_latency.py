"""Per-volume NBD latency histograms in /metrics."""

from __future__ import annotations

import re
import urllib.request

import pytest

from pxcluster.nbd.client import NbdClient
from pxcluster.nbd.export import ExportRegistry
from pxcluster.nbd.memory import MemoryExport
from pxcluster.nbd.server import NbdServer
from pxcluster.node.metrics import Metrics
from tests.harness.cluster import Cluster


def bucket_counts(text: str, volume: str, op: str) -> dict[str, float]:
    labels = f'op="{op}",volume="{re.escape(volume)}"'
    pattern = re.compile(
        r'^pxc_volume_latency_seconds_bucket\{le="([^"]+)",' + labels + r"\} (\S+)$", re.M
    )
    return {le: float(v) for le, v in pattern.findall(text)}


@pytest.mark.timeout(30)
async def test_nbd_server_observes_each_request_once() -> None:
    metrics = Metrics()
    registry = ExportRegistry()
    registry.add(MemoryExport("m1", 1 << 20))
    server = NbdServer(registry, latency=metrics.nbd_latency)
    port = await server.start_tcp("127.0.0.1", 0)
    try:
        client = await NbdClient.connect(f"nbd://127.0.0.1:{port}/m1")
        for i in range(5):
            await client.write(i * 4096, b"x" * 4096)
        for i in range(3):
            assert await client.read(i * 4096, 4096) == b"x" * 4096
        await client.flush()
        await client.close()
    finally:
        await server.close()
    text = metrics.render().decode()
    for op, n in (("write", 5), ("read", 3), ("flush", 1)):
        counts = bucket_counts(text, "m1", op)
        assert counts["+Inf"] == n, (op, counts)
        assert re.search(
            rf'pxc_volume_latency_seconds_count\{{op="{op}",volume="m1"\}} {n}\.0', text
        )
    # One set of children per volume, made once.
    assert metrics.nbd_latency("m1") is metrics.nbd_latency("m1")


@pytest.mark.timeout(90)
def test_metrics_endpoint_has_latency_buckets_after_io(cluster: Cluster) -> None:
    from tests.integration.test_replica_tls import tool

    n = cluster.add_node("n1")
    cluster.cli_json("volume", "create", "lat", "--size", "16M", "--repl", "1")
    uri = cluster.attach("lat", "n1")
    tool("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "read 0 1M", "-c", "flush", uri)
    with urllib.request.urlopen(f"http://{n.address}:{n.ports['api']}/metrics", timeout=10) as r:
        text = r.read().decode()
    for op in ("read", "write", "flush"):
        counts = bucket_counts(text, "lat", op)
        assert len(counts) >= 10 and counts["+Inf"] >= 1, (op, counts)
        # Cumulative buckets: never decreasing.
        values = list(counts.values())
        assert values == sorted(values)
    # Group commit, observed: every sync made at least one flush() caller durable.
    m = re.search(r"^pxc_journal_group_commit_callers_count (\S+)$", text, re.M)
    assert m is not None and float(m.group(1)) >= 1, text[-2000:]
    assert re.search(r'^pxc_journal_group_commit_records_bucket\{le="\+Inf"\} ', text, re.M)
