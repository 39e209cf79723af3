"""Leader election on a lease: the leader key exists iff its holder's lease is alive."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from membership.etcd import Etcd, EtcdUnavailable
from membership.keys import Keys


class Election:
    def __init__(self, etcd: Etcd, keys: Keys, node_id: str, lease_id: Callable[[], int]) -> None:
        self.etcd = etcd
        self.keys = keys
        self.node_id = node_id
        # Read at every attempt: after its lease expired the node holds a new one, and a
        # campaign with the old id would fail forever (no leader, no failover).
        self.lease_id = lease_id
        self.is_leader = False
        self.changed = asyncio.Event()

    async def run(self, poll: float = 0.5) -> None:
        key = self.keys.leader()
        while True:
            with contextlib.suppress(EtcdUnavailable):
                # Read first, campaign only when the key is gone: etcd sends every transaction
                # with a put through raft even when its compare fails, and a campaign from
                # every node at every poll was ~2 raft writes/s per node (bench/scale.py).
                current = await self.etcd.get(key)
                if current is None:
                    txn = self.etcd.txn().absent(key)
                    await self.etcd.commit(txn.put(key, self.node_id.encode(), self.lease_id()))
                    current = await self.etcd.get(key)
                leader = current is not None and current.value.decode() == self.node_id
                if leader != self.is_leader:
                    self.is_leader = leader
                    self.changed.set()
            await asyncio.sleep(poll)


async def current_leader(etcd: Etcd, keys: Keys) -> str | None:
    kv = await etcd.get(keys.leader())
    return None if kv is None else kv.value.decode()
