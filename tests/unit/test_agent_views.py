"""The node agent's pass reads from etcd only what its watch says changed (agent.py
`_relevant_views`, `_alive_nodes`, `_empty_trash`), on a real etcd with the real watch: an
idle pass reads nothing, a change is seen in the next pass, a reopened watch reads it all."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from membership.etcd import KV, Etcd
from membership.records import AttachTarget, NodeRecord
from pxcluster.agent import NodeAgent
from pxcluster.service import Service
from tests.harness.etcd import EtcdServer

NODES = ("n1", "n2", "n3")


class CountingEtcd(Etcd):
    def __init__(self, url: str, root: str) -> None:
        super().__init__(url)
        self.root = root
        self.ranges: collections.Counter[str] = collections.Counter()

    async def get(self, key: bytes) -> KV | None:
        self.ranges["get"] += 1
        return await super().get(key)

    async def get_prefix(self, prefix: bytes) -> list[KV]:
        self.ranges[prefix.decode().removeprefix(self.root).split("/")[0]] += 1
        return await super().get_prefix(prefix)


class LocalReplica:
    def __init__(self) -> None:
        self.deleted: list[str] = []

    async def delete(self, volume: str) -> None:
        self.deleted.append(volume)


@dataclasses.dataclass
class Peers:
    local: LocalReplica


@dataclasses.dataclass
class Watched:
    svc: Service
    etcd: CountingEtcd
    agent: NodeAgent
    wake: asyncio.Event

    async def changed(self, change: Any) -> None:
        """Make a change and wait until the agent's watch has seen it."""
        self.wake.clear()
        await change
        async with asyncio.timeout(10):
            await self.wake.wait()


@pytest.fixture
async def watched(etcd: EtcdServer) -> AsyncIterator[Watched]:
    """Three nodes; v0 and v3 attached on n1 (the agent's node), v1 on n2, v2 on n3."""
    client = CountingEtcd(etcd.url, "/pxc/t/")
    await client.connect()
    svc = Service(client, "t")
    for name in NODES:
        rec = NodeRecord(name, name, "127.0.0.1", 1, 2, 3, capacity=1 << 40)
        await client.put(svc.keys.node(name), rec.encode())
        await client.put(svc.keys.alive(name), b"1")
    for i in range(4):
        await svc.create_volume(f"v{i}", 1 << 30, 2)
        await svc.attach(f"v{i}", NODES[i % 3])
    agent = NodeAgent("n1", client, svc.keys, None, Peers(LocalReplica()), None)  # type: ignore[arg-type]
    wake = asyncio.Event()
    watch = asyncio.create_task(
        client.wake_on_changes(
            svc.keys.root.encode(),
            wake,
            on_event=agent._on_watch_event,
            on_open=agent._on_watch_open,
        )
    )
    try:
        async with asyncio.timeout(10):
            await wake.wait()  # the watch is open
        client.ranges.clear()
        yield Watched(svc, client, agent, wake)
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await client.close()


def names(views: dict[str, Any]) -> set[str]:
    return {v.record.name for v in views.values()}


async def test_an_idle_pass_reads_nothing_and_a_change_is_read_next_pass(w: Watched) -> None:
    views = await w.agent._relevant_views()  # the first pass: one full read
    assert names(views) == {"v0", "v3"}
    assert w.etcd.ranges == {"volumes": 1}
    assert await w.agent._alive_nodes() == set(NODES)
    await w.agent._empty_trash()
    w.etcd.ranges.clear()

    again = await w.agent._relevant_views()
    assert names(again) == {"v0", "v3"}
    assert await w.agent._alive_nodes() == set(NODES)
    await w.agent._empty_trash()
    assert w.etcd.ranges == {}  # nothing changed: nothing read

    # v0's record changes (an I/O limit): v0 alone is read again, and the view shows it.
    await w.changed(w.svc.set_limits("v0", 500, None))
    w.etcd.ranges.clear()  # set_limits' own reads
    views = await w.agent._relevant_views()
    v0 = next(v for v in views.values() if v.record.name == "v0")
    assert v0.record.iops_limit == 500
    assert w.etcd.ranges == {"volumes": 1, "get": 1}  # volume_by_id: its keys and its record
    w.etcd.ranges.clear()

    # v1 is moved here: it becomes one of this node's volumes, read in the next pass.
    v1 = await w.svc.volume("v1")
    target = AttachTarget("n1", "user").encode()
    await w.changed(w.etcd.put(w.svc.keys.target(v1.record.id), target))
    assert names(await w.agent._relevant_views()) == {"v0", "v1", "v3"}
    # A node dies: seen from the event, no read.
    await w.changed(w.etcd.delete(w.svc.keys.alive("n3")))
    assert await w.agent._alive_nodes() == {"n1", "n2"}
    assert w.etcd.ranges["alive"] == 0
    # A deleted volume leaves the views.
    v3 = next(v for v in views.values() if v.record.name == "v3")
    await w.changed(delete_volume_keys(w, v3.record.id))
    assert names(await w.agent._relevant_views()) == {"v0", "v1"}


async def delete_volume_keys(w: Watched, vid: str) -> None:
    for kv in await w.etcd.get_prefix(w.svc.keys.volume_sub_prefix(vid)):
        await w.etcd.delete(kv.key)
    await w.etcd.delete(w.svc.keys.volume(vid))


async def test_trash_is_looked_at_when_something_is_put_there(w: Watched) -> None:
    await w.agent._empty_trash()
    assert w.etcd.ranges == {"trash": 1}
    await w.agent._empty_trash()
    assert w.etcd.ranges == {"trash": 1}
    await w.changed(w.etcd.put(w.svc.keys.trash("n1", "vol-x"), b"old"))
    await w.agent._empty_trash()
    assert w.etcd.ranges == {"trash": 2}
    assert w.agent.peers.local.deleted == ["vol-x"]  # type: ignore[attr-defined]
    assert await w.etcd.get_prefix(w.svc.keys.trash_prefix("n1")) == []


async def test_a_reopened_watch_reads_everything_again(w: Watched) -> None:
    await w.agent._relevant_views()
    await w.agent._alive_nodes()
    w.agent._on_watch_open()  # what the watch calls when it opens again after a break
    w.etcd.ranges.clear()
    await w.agent._relevant_views()
    await w.agent._alive_nodes()
    assert w.etcd.ranges == {"volumes": 1, "alive": 1}


@pytest.fixture
def w(watched: Watched) -> Watched:
    return watched
