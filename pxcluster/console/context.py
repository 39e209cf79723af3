"""What every console handler reaches through the app: the node, the service layer, the
gate, the live feed, the latency history and the backup listings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from pxcluster.console.backups import BackupLister
from pxcluster.console.gate import Gate
from pxcluster.console.latency import LatencyHistory
from pxcluster.console.live import Hub
from pxcluster.service.core import Service

if TYPE_CHECKING:
    from pxcluster.api.app import NodeView


@dataclass(frozen=True)
class Console:
    node: NodeView
    svc: Service
    gate: Gate
    hub: Hub
    latency: LatencyHistory
    backups: BackupLister


CONSOLE = web.AppKey("console", Console)
