"""`pxcluster volume snapshot`: create, list, delete."""

from __future__ import annotations

import time

import click

from pxcluster.cli import output
from pxcluster.cli.context import with_service
from pxcluster.cli.params import (
    SNAPSHOT,
    VOLUME,
)
from pxcluster.service import snapshots
from pxcluster.service.core import Service


@click.group()
def snapshot() -> None:
    """Snapshots of a volume (crash-consistent, online)."""


@snapshot.command("create")
@click.argument("name", type=VOLUME)
@click.option("--name", "snap", required=True, type=SNAPSHOT, help="the snapshot's name")
@click.option("--json", "as_json", is_flag=True)
@with_service
async def snapshot_create(svc: Service, name: str, snap: str, as_json: bool) -> None:
    """Snapshot volume NAME: every write acknowledged before this returns is in it."""

    info = await snapshots.create(svc, name, snap)
    if as_json:
        output.emit_json(info)
    else:
        click.echo(f"snapshot {snap} of volume {name} created")


@snapshot.command("list")
@click.argument("name", type=VOLUME)
@click.option("--json", "as_json", is_flag=True)
@with_service
async def snapshot_list(svc: Service, name: str, as_json: bool) -> None:
    """List the snapshots of volume NAME, oldest first."""

    snaps = await snapshots.list_snapshots(svc, name)
    if as_json:
        output.emit_json(snaps)
        return
    rows = [
        [x["name"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(x["created"])), x["state"]]
        for x in snaps
    ]
    output.table(None, ["snapshot", "created", "state"], rows)


@snapshot.command("delete")
@click.argument("name", type=VOLUME)
@click.argument("snap", type=SNAPSHOT)
@with_service
async def snapshot_delete(svc: Service, name: str, snap: str) -> None:
    """Delete snapshot SNAP of volume NAME; what only it held is freed."""

    await snapshots.delete(svc, name, snap)
    click.echo(f"snapshot {snap} of volume {name} deleted")
