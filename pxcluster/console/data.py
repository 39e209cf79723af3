"""What each page shows, read through the service layer: the same views the REST API
answers with (`Service.inspect`, `node_list`, `cluster_status`), grouped for a page."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pxcluster.service import drain
from pxcluster.service.core import Service

HEALTHS = ("healthy", "degraded", "rebuilding", "detached", "failed")
SORT_KEYS = ("name", "size", "repl", "state", "health", "node", "epoch", "iops", "bw")
MAX_FAILOVERS = 10


def console_health(v: dict[str, Any]) -> str:
    """The API's health (healthy/degraded) split further for a glance: no in-sync replica
    left is failed, a rebuild under way is rebuilding, an idle healthy volume is detached."""
    replicas = v["replicas"]
    if replicas and not any(r["state"] == "in_sync" for r in replicas):
        return "failed"
    if any(r["state"] == "running" for r in v["rebuilds"]):
        return "rebuilding"
    if v["health"] != "healthy":
        return "degraded"
    if v["state"] == "detached":
        return "detached"
    return "healthy"


async def volumes(svc: Service) -> list[dict[str, Any]]:
    out = []
    for view in await svc.volumes():
        v = await svc.inspect(view)
        v["console_health"] = console_health(v)
        out.append(v)
    return out


async def nodes(svc: Service, vols: list[dict[str, Any]]) -> list[dict[str, Any]]:
    records = {n.id: n for n in await svc.nodes()}
    out = []
    for n in await svc.node_list():
        record = records[n["id"]]
        held = [v["name"] for v in vols if any(r["node_id"] == n["id"] for r in v["replicas"])]
        attached = [v["name"] for v in vols if v["attached_node"] == n["name"]]
        op = await drain.status(svc, record) if n["state"] in ("draining", "drained") else None
        out.append(
            n
            | {
                "disks": [d.to_dict() for d in record.disk_records()],
                "replicas_held": held,
                "attachments": attached,
                "drain": op.to_dict() if op is not None else None,
            }
        )
    return out


async def overview(svc: Service) -> dict[str, Any]:
    status = await svc.cluster_status()  # raises when etcd does not answer: the page says so
    vols = await volumes(svc)
    node_rows = await nodes(svc, vols)
    counts = Counter(v["console_health"] for v in vols)
    rebuilds = [
        {"volume": v["name"], **r} for v in vols for r in v["rebuilds"] if r["state"] == "running"
    ]
    failovers = sorted(
        ({"volume": v["name"], **v["last_failover"]} for v in vols if v["last_failover"]),
        key=lambda f: f["at"] or 0,
        reverse=True,
    )[:MAX_FAILOVERS]
    return {
        "status": status,
        "nodes": node_rows,
        "by_health": {h: counts.get(h, 0) for h in HEALTHS},
        "rebuilds": rebuilds,
        "drains": [n for n in node_rows if n["drain"] and n["drain"]["state"] == "running"],
        "failovers": failovers,
        "volume_count": len(vols),
    }


def filter_sort(
    vols: list[dict[str, Any]], query: str, health: str, sort: str, desc: bool
) -> list[dict[str, Any]]:
    q = query.strip().lower()
    rows = [
        v
        for v in vols
        if (not q or q in v["name"] or q in (v["attached_node"] or ""))
        and (not health or v["console_health"] == health)
    ]
    keys: dict[str, Any] = {
        "name": lambda v: v["name"],
        "size": lambda v: v["size"],
        "repl": lambda v: v["repl"],
        "state": lambda v: v["state"],
        "health": lambda v: HEALTHS.index(v["console_health"]),
        "node": lambda v: v["attached_node"] or "",
        "epoch": lambda v: v["epoch"],
        "iops": lambda v: v["iops_limit"],
        "bw": lambda v: v["bw_limit"],
    }
    return sorted(rows, key=keys.get(sort, keys["name"]), reverse=desc)
