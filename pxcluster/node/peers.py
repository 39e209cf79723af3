"""The replica clients of a node: one per peer node, shared by every engine on the node."""

from __future__ import annotations

import ssl

from membership.records import NodeRecord
from replica.api import ReplicaAPI
from replica.client import ReplicaClient
from replica.service import ReplicaService


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
