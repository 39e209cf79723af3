"""`pxcluster volume map|unmap|mount|unmount` and `pxcluster device list`: a volume as a block
device and a filesystem on the attach node's host.

Registered in pxcluster.cli (`volume.add_command(...)`, `main.add_command(device)`). Each runs
on the host where the device is wanted, as root; what is mapped here is kept under
--state-dir (env PXC_HOST_STATE_DIR, default /run/pxcluster/host)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import click

from pxcluster.cli import output
from pxcluster.cli.params import NODE, VOLUME
from pxcluster.host.fs import FILESYSTEMS
from pxcluster.host.lifecycle import Host, describe
from pxcluster.host.registry import DEFAULT_STATE_DIR, STATE_DIR_ENV, Registry, state_dir
from pxcluster.service.core import Service


def with_host(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """pxcluster.cli.with_service (looked up when the command runs: pxcluster.cli imports this
    module), with the service and this host's registry made into a Host."""

    @functools.wraps(fn)
    def deferred(*args: Any, **kwargs: Any) -> Any:
        from pxcluster import cli

        async def body(svc: Service, *a: Any, state: str, **kw: Any) -> Any:
            return await fn(Host(svc, Registry(state_dir(state))), *a, **kw)

        return cli.with_service(body)(*args, **kwargs)

    return deferred


def state_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--state-dir",
        "state",
        envvar=STATE_DIR_ENV,
        default="",
        help=f"where this host records its devices (env {STATE_DIR_ENV}, default "
        f"{DEFAULT_STATE_DIR})",
    )(fn)


def node_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--node",
        "node_name",
        default=None,
        type=NODE,
        help="the node on this host (default: $PXC_NODE, the node named as this host, or the "
        "only node with its NBD socket here)",
    )(fn)


@click.command("map")
@click.argument("name", type=VOLUME)
@node_option
@click.option("--force", is_flag=True, help="take it over from a node that is still up")
@state_option
@click.option("--json", "as_json", is_flag=True)
@with_host
async def volume_map(
    host: Host, name: str, node_name: str | None, force: bool, as_json: bool
) -> None:
    """A block device for NAME on this host (attached here if needed); prints the device."""
    rec = await host.map(name, node_name, force=force)
    if as_json:
        output.emit_json(describe(rec))
    else:
        click.echo(rec.device)


@click.command("unmap")
@click.argument("name", type=VOLUME)
@state_option
@with_host
async def volume_unmap(host: Host, name: str) -> None:
    """Remove NAME's block device from this host, and detach it if the map attached it."""
    rec = await host.unmap(name)
    click.echo(f"volume {name} unmapped from {rec.device}")


@click.command("mount")
@click.argument("name", type=VOLUME)
@click.argument("path", type=click.Path(file_okay=False))
@click.option(
    "--fs",
    "fs",
    type=click.Choice(FILESYSTEMS),
    default=None,
    help="filesystem made on first use (default ext4); an existing one must match",
)
@node_option
@click.option("--force", is_flag=True, help="take it over from a node that is still up")
@state_option
@click.option("--json", "as_json", is_flag=True)
@with_host
async def volume_mount(
    host: Host,
    name: str,
    path: str,
    fs: str | None,
    node_name: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Mount NAME at PATH on this host: map it, make the filesystem on first use only (never
    over existing data), mount. Takes the volume over from a node that is down."""
    rec = await host.mount(name, path, fs, node_name, force=force)
    if as_json:
        output.emit_json(describe(rec))
    else:
        click.echo(f"volume {name} ({rec.fs}, {rec.device}) mounted at {rec.mountpoint}")


@click.command("unmount")
@click.argument("target")
@state_option
@with_host
async def volume_unmount(host: Host, target: str) -> None:
    """Unmount TARGET (a volume name or its mount path): flush, unmount, unmap, detach."""
    rec = await host.unmount(target)
    click.echo(f"volume {rec.volume} unmounted")


@click.group("device")
def device() -> None:
    """Block devices of volumes on this host."""


@device.command("list")
@state_option
@click.option("--json", "as_json", is_flag=True)
@with_host
async def device_list(host: Host, as_json: bool) -> None:
    """Volumes mapped on this host: device, mount point, node, method, connection state."""
    rows = host.list()
    if as_json:
        output.emit_json(rows)
        return
    output.table(
        None,
        ["volume", "device", "mountpoint", "fs", "node", "method", "state"],
        [
            [r["volume"], r["device"], r["mountpoint"], r["fs"], r["node"], r["method"], r["state"]]
            for r in rows
        ],
    )


VOLUME_COMMANDS = (volume_map, volume_unmap, volume_mount, volume_unmount)
