"""`pxcluster dev`: the embedded local cluster (etcd plus N nodes on 127.0.0.1)."""

from __future__ import annotations

import click

from pxcluster.cli import output
from pxcluster.cli.cluster import status
from pxcluster.cli.context import EXPECTED, Ctx
from pxcluster.cli.params import (
    Int,
    size,
)

# --- dev


@click.group()
def dev() -> None:
    """The embedded local cluster: etcd plus N nodes on 127.0.0.1."""


@dev.command("up")
@click.option("--nodes", default=3, show_default=True, type=Int(1, 16))
@click.option("--dir", "directory", default=".pxc-dev", show_default=True)
@click.option(
    "--disk-size", default="4G", show_default=True, type=size(), help="sparse disk file per node"
)
@click.pass_obj
def dev_up(ctx: Ctx, nodes: int, directory: str, disk_size: int) -> None:
    """Start etcd and N nodes in the background, wait until all are up."""
    from pxcluster.tools import devcluster

    try:
        devcluster.up(ctx.etcd_url, ctx.cluster, nodes, directory, disk_size, ctx.etcd_settings)
    except EXPECTED as e:
        output.fail(str(e))
    click.get_current_context().invoke(status)


@dev.command("down")
@click.option("--dir", "directory", default=".pxc-dev", show_default=True)
@click.option("--purge", is_flag=True, help="also delete disks and etcd data")
def dev_down(directory: str, purge: bool) -> None:
    """Stop exactly what `dev up` started."""
    from pxcluster.tools import devcluster

    try:
        devcluster.down(directory, purge=purge)
    except EXPECTED as e:
        output.fail(str(e))


@dev.command("status")
@click.option("--dir", "directory", default=".pxc-dev", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def dev_status(directory: str, as_json: bool) -> None:
    """What `dev up` started, and whether it still runs."""
    from pxcluster.tools import devcluster

    procs = devcluster.status(directory)
    if as_json:
        output.emit_json(procs)
    else:
        output.table(
            None,
            ["process", "pid", "running", "log"],
            [[p["name"], p["pid"], p["running"], p["log"]] for p in procs],
        )
