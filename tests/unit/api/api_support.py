"""An API app over a real etcd, with node records written straight into etcd: the handlers
and the service layer run for real, only the node daemons are absent."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from membership.etcd import Etcd
from membership.keys import Keys
from membership.records import NodeRecord, RevertRecord, ScrubRecord, SnapshotRecord
from pxcluster.api.app import ApiConfig, build_app
from pxcluster.node.daemon import ensure_replica_key
from pxcluster.node.metrics import Metrics
from pxcluster.service.core import Service
from tests.harness.etcd import EtcdServer

CLUSTER = "apitest"
TOKEN = "s3cret-token"
READ_TOKEN = "r3ad-only-token"


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
        await ensure_replica_key(self.etcd, self.keys)  # as a joining node does
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


async def open_api(
    etcd: EtcdServer, token: str | None, read_token: str | None = None
) -> AsyncIterator[Api]:
    client = Etcd(etcd.url)
    await client.connect()
    node = FakeNode("n1", CLUSTER, client, Metrics())
    config = ApiConfig(token=token, read_token=read_token)
    tc: TestClient[Any, Any] = TestClient(TestServer(build_app(node, config)))
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
    async for a in open_api(etcd, TOKEN, READ_TOKEN):
        yield a


@dataclass
class FakeEngine:
    """What the engine serving a volume does with the requests that
    pxcluster.service.snapshots records in etcd: snapshots `creating` become `ready` (or
    `failed` if named in `fail`), `deleting` ones go, a pending revert is done (or failed), a
    pending scrub finishes with `report`."""

    etcd: Etcd
    cluster: str = CLUSTER
    fail: set[str] = field(default_factory=set)
    report: dict[str, Any] = field(default_factory=lambda: {"chunks": 4})

    async def step(self) -> None:
        svc = Service(self.etcd, self.cluster)
        for v in await svc.volumes():
            vid = v.record.id
            for r in v.snapshots.values():
                key = svc.keys.snapshot(vid, r.id)
                if r.state == "creating":
                    failed = r.name in self.fail
                    done = SnapshotRecord.from_dict(
                        r.to_dict()
                        | {
                            "state": "failed" if failed else "ready",
                            "created": 0.0 if failed else time.time(),
                            "error": "replica n2 refused" if failed else "",
                        }
                    )
                    await self.etcd.put(key, done.encode())
                elif r.state == "deleting":
                    await self.etcd.delete(key)
            if v.revert is not None and v.revert.state == "pending":
                snap = v.snapshots.get(v.revert.snapshot)
                if snap is not None and snap.name in self.fail:
                    bad = RevertRecord(v.revert.snapshot, "failed", "replica n2 refused")
                    await self.etcd.put(svc.keys.revert(vid), bad.encode())
                else:
                    await self.etcd.delete(svc.keys.revert(vid))
            pending = any(r.state in ("creating", "deleting") for r in v.snapshots.values())
            pending |= v.revert is not None and v.revert.state == "pending"
            pending |= v.scrub is not None and v.scrub.state == "pending"
            pending |= v.hydration is not None and v.hydration.state == "running"
            if not pending and v.target is not None and v.target.reason == "snapshot":
                # Served only for these requests, and none is left: the engine is released.
                await self.etcd.delete(svc.keys.target(vid))
            if v.scrub is not None and v.scrub.state == "pending":
                done_scrub = ScrubRecord.from_dict(
                    v.scrub.to_dict()
                    | {"state": "done", "finished": v.scrub.requested + 0.5}
                    | self.report
                )
                await self.etcd.put(svc.keys.scrub(vid), done_scrub.encode())

    async def settle(self, timeout: float = 5.0) -> None:
        """Until the volumes served only for these requests are let go, as the node agent
        does some moments after the work is done (a revert meanwhile is refused)."""
        svc = Service(self.etcd, self.cluster)
        deadline = time.monotonic() + timeout
        while any(
            v.target is not None and v.target.reason == "snapshot" for v in await svc.volumes()
        ):
            assert time.monotonic() < deadline, "the fake engine did not settle"
            await asyncio.sleep(0.02)

    async def run(self) -> None:
        while True:
            await self.step()
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def fake_engine(a: Api, **kwargs: Any) -> AsyncIterator[FakeEngine]:
    engine = FakeEngine(a.etcd, **kwargs)
    task = asyncio.create_task(engine.run())
    try:
        yield engine
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass
class FakeSnapshotReader:
    """Stands in for pxcluster.service.transfer.SnapshotReader (no replica servers here)."""

    chunks: int

    async def generations(self) -> dict[int, tuple[int, int]]:
        return {i: (1, 1) for i in range(self.chunks)}
