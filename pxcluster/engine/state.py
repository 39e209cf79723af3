"""What the engine writes to etcd, each write guarded by the engine's epoch (invariant 2)."""

from __future__ import annotations

from typing import Protocol

from membership.etcd import Etcd, EtcdUnavailable
from membership.keys import Keys
from membership.records import ReplicaState


class ReplicaStateWriter(Protocol):
    async def mark_stale(self, nodes: list[str]) -> bool:
        """True only if etcd recorded the replicas stale under this engine's epoch."""
        ...


class EtcdReplicaState:
    def __init__(self, etcd: Etcd, keys: Keys, volume_id: str, epoch: int) -> None:
        self.etcd = etcd
        self.keys = keys
        self.volume_id = volume_id
        self.epoch = epoch

    async def mark_stale(self, nodes: list[str]) -> bool:
        txn = self.etcd.txn().value_is(self.keys.epoch(self.volume_id), str(self.epoch).encode())
        for node in nodes:
            state = ReplicaState(node, "stale", self.epoch)
            txn.put(self.keys.replica(self.volume_id, node), state.encode())
        try:
            return await self.etcd.commit(txn)
        except EtcdUnavailable:
            return False
