"""An API app over a real etcd, with node records written straight into etcd: the handlers
and the service layer run for real, only the node daemons are absent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from membership.etcd import Etcd
from membership.keys import Keys
from membership.records import NodeRecord
from pxcluster.api.app import ApiConfig, build_app
from pxcluster.metrics import Metrics
from tests.harness.etcd import EtcdServer

CLUSTER = "apitest"
TOKEN = "s3cret-token"


@dataclass
class FakeNode:
    """What the API sees of a node daemon (pxcluster.api.app.NodeView)."""

    name: str
    cluster: str
    etcd: Etcd
    metrics: Metrics

    def lease_healthy(self) -> bool:
        return True

    def refresh_metrics(self) -> None:
        pass


@dataclass
class Api:
    client: TestClient[Any, Any]
    etcd: Etcd
    keys: Keys

    async def add_node(self, name: str, *, up: bool = True, capacity: int = 8 << 30) -> None:
        record = NodeRecord(
            id=f"id-{name}",
            name=name,
            address="127.0.0.9",
            data_port=1,
            nbd_port=2,
            api_port=3,
            capacity=capacity,
        )
        await self.etcd.put(self.keys.node(record.id), record.encode())
        if up:
            await self.etcd.put(self.keys.alive(record.id), b"1")

    async def call(
        self, method: str, path: str, body: Any = None, *, token: str | None = TOKEN
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kwargs: dict[str, Any] = {"headers": headers}
        if isinstance(body, bytes | str):
            kwargs["data"] = body
        elif body is not None:
            kwargs["json"] = body
        resp = await self.client.request(method, path, **kwargs)
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()


async def open_api(etcd: EtcdServer, token: str | None) -> AsyncIterator[Api]:
    client = Etcd(etcd.url)
    await client.connect()
    node = FakeNode("n1", CLUSTER, client, Metrics())
    tc: TestClient[Any, Any] = TestClient(TestServer(build_app(node, ApiConfig(token=token))))
    await tc.start_server()
    try:
        yield Api(tc, client, Keys(CLUSTER))
    finally:
        await tc.close()
        await client.close()


@pytest_asyncio.fixture
async def api(etcd: EtcdServer) -> AsyncIterator[Api]:
    async for a in open_api(etcd, None):
        yield a


@pytest_asyncio.fixture
async def api_auth(etcd: EtcdServer) -> AsyncIterator[Api]:
    async for a in open_api(etcd, TOKEN):
        yield a
