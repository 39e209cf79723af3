"""A node's control plane, apart from its data plane: its membership in etcd and the loops
that act on the cluster's state.

`NodeControl` registers the node (its record, and `alive/<id>` bound to the node's lease),
keeps the lease alive, fences every engine and joins again with a new lease when the old one
expires, keeps the node record current, and runs the node agent, the leader election and the
leader's controllers. The node daemon (`daemon.py`) runs one over its disks, replica server and
NBD server; the scale simulation (bench/scale_node.py) runs the same over engines without data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from membership.election import Election
from membership.etcd import Etcd
from membership.keys import Keys
from membership.lease import LeaseKeeper
from membership.records import NodeRecord
from pxcluster.controllers.runner import ControllerRunner, leader_controllers
from pxcluster.node.agent import NodeAgent
from pxcluster.service.core import Service

log = logging.getLogger(__name__)


class NodeControl:
    def __init__(
        self,
        etcd: Etcd,
        keys: Keys,
        lease_ttl: int,
        record: Callable[[str], NodeRecord],
        *,
        replace_after: float = 300.0,
    ) -> None:
        self.etcd = etcd
        self.keys = keys
        self.record = record  # the node's record in a given state, as it is now
        self.lease = LeaseKeeper(etcd, lease_ttl, self._lease_lost)
        self.replace_after = replace_after  # s a replica's node may stay down (repair)
        self.node_id = ""
        self.agent: NodeAgent | None = None
        self.election: Election | None = None
        self.leases_lost = 0
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def register(self, node_id: str) -> None:
        """Write the node's record (in the state an earlier run left, unless removed) and its
        `alive/` key under a new lease."""
        self.node_id = node_id
        existing = await self.etcd.get(self.keys.node(node_id))
        state = "active"
        if existing is not None:
            state = NodeRecord.decode(existing.value).state
            if state == "removed":
                state = "active"
        await self.lease.grant()
        await self.etcd.put(self.keys.node(node_id), self.record(state).encode())
        await self.etcd.put(self.keys.alive(node_id), b"1", self.lease.lease_id)

    def start(self, agent: NodeAgent) -> None:
        """After `register`: keep the lease alive, and run the agent (built on `self.lease`),
        the election, the leader's controllers and the node record's refresh."""
        self.lease.start()
        self.agent = agent
        self.election = Election(self.etcd, self.keys, self.node_id, lambda: self.lease.lease_id)
        service = Service(self.etcd, self.keys.cluster)
        runner = ControllerRunner(
            self.etcd,
            self.keys.root.encode(),
            self.election,
            leader_controllers(service, replace_after=self.replace_after),
        )
        self._tasks = [
            asyncio.create_task(agent.run(), name="agent"),
            asyncio.create_task(self.election.run(), name="election"),
            asyncio.create_task(runner.run(), name="controllers"),
            asyncio.create_task(self._refresh_record(), name="node-status"),
        ]

    def cancel(self) -> None:
        """Stop at once: no rejoin after this, and every loop is cancelled."""
        self.stopping.set()
        for t in self._tasks:
            t.cancel()

    async def wait_stopped(self, timeout: float = 5.0) -> None:
        if not self._tasks:
            return
        _, stuck = await asyncio.wait(self._tasks, timeout=timeout)
        for t in stuck:
            log.error("task %s did not stop within %g s; leaving it", t.get_name(), timeout)

    async def stop(self) -> None:
        """Planned stop: the loops end, then every volume served here is handed to another
        node and detached cleanly. The lease is still held: the caller ends it last."""
        self.cancel()
        await self.wait_stopped()
        if self.agent is not None:
            await self.agent.hand_off_all()
            await self.agent.peers.close()

    async def _lease_lost(self) -> None:
        self.leases_lost += 1
        if self.agent is not None:
            await self.agent.fence_all("node lease expired")
        while not self.stopping.is_set():
            try:
                await self.lease.grant()
                await self.etcd.put(self.keys.alive(self.node_id), b"1", self.lease.lease_id)
                self.lease.start()
                log.warning("rejoined with a new lease %x", self.lease.lease_id)
                return
            except Exception as e:
                log.warning("rejoin failed: %s", e)
                await asyncio.sleep(1.0)

    async def _refresh_record(self) -> None:
        """Re-read the node record every 2 s; write it when what this node reports changed
        (capacity, usage), keeping the state an operator set."""
        while True:
            await asyncio.sleep(2.0)
            with contextlib.suppress(Exception):
                kv = await self.etcd.get(self.keys.node(self.node_id))
                if kv is None:
                    continue
                state = NodeRecord.decode(kv.value).state
                value = self.record(state).encode()
                # Against what etcd holds, not what this loop wrote last: another writer (a
                # cordon, a drain) may have put back an older view of the disks meanwhile.
                if value != kv.value:
                    txn = self.etcd.txn().unchanged(self.keys.node(self.node_id), kv.mod_revision)
                    await self.etcd.commit(txn.put(self.keys.node(self.node_id), value))
