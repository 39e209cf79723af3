"""Builds the aiohttp application a node serves on its API port.

`NodeView` is all the API sees of the node daemon, so the API can grow without the daemon's
wiring changing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from membership.etcd import Etcd
from pxcluster.metrics import Metrics


class NodeView(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def cluster(self) -> str: ...

    @property
    def etcd(self) -> Etcd: ...

    @property
    def metrics(self) -> Metrics: ...

    def lease_healthy(self) -> bool: ...

    def refresh_metrics(self) -> None:
        """Update gauges read at scrape time (capacity, lease health)."""
        ...


@dataclass(frozen=True)
class ApiConfig:
    token: str | None = None  # bearer token required for mutating calls, when set


def build_app(node: NodeView, config: ApiConfig) -> web.Application:
    app = web.Application()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "node": node.name})

    async def readyz(_: web.Request) -> web.Response:
        ok = node.lease_healthy()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        node.refresh_metrics()
        return web.Response(body=node.metrics.render(), content_type="text/plain", charset="utf-8")

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
