"""`pxcluster node`: list, cordon, uncordon, remove, drain."""

from __future__ import annotations

import click

from pxcluster.cli import drain_view, output
from pxcluster.cli.context import with_service
from pxcluster.cli.params import (
    NODE,
    Seconds,
)
from pxcluster.service import drain
from pxcluster.service.core import Service

# --- node


@click.group()
def node() -> None:
    """Nodes: list, cordon, drain, remove."""


@node.command("list")
@click.option("--json", "as_json", is_flag=True)
@with_service
async def node_list(svc: Service, as_json: bool) -> None:
    """Every node with its state, liveness and capacity."""
    nodes = await svc.node_list()
    if as_json:
        output.emit_json(nodes)
        return
    output.table(
        None,
        ["name", "id", "address", "zone", "state", "up", "capacity", "used"],
        [
            [
                n["name"],
                n["id"],
                n["address"],
                n["zone"],
                n["state"],
                "up" if n["up"] else "DOWN",
                output.size(n["capacity"]),
                output.size(n["used"]),
            ]
            for n in nodes
        ],
    )


async def _print_node(svc: Service, name: str, as_json: bool, message: str) -> None:
    if as_json:
        nodes = [n for n in await svc.node_list() if name in (n["name"], n["id"])]
        output.emit_json(nodes[0] if nodes else {"name": name, "state": "removed"})
    else:
        click.echo(message)


@node.command()
@click.argument("name", type=NODE)
@click.option("--json", "as_json", is_flag=True)
@with_service
async def cordon(svc: Service, name: str, as_json: bool) -> None:
    """No new replicas or attachments land on NAME."""
    await svc.set_node_state(name, "cordoned", allowed_from=("active", "cordoned"))
    await _print_node(svc, name, as_json, f"node {name} cordoned")


@node.command()
@click.argument("name", type=NODE)
@click.option("--json", "as_json", is_flag=True)
@with_service
async def uncordon(svc: Service, name: str, as_json: bool) -> None:
    """Return NAME to service."""
    await svc.set_node_state(
        name, "active", allowed_from=("active", "cordoned", "draining", "drained")
    )
    await _print_node(svc, name, as_json, f"node {name} uncordoned")


@node.command()
@click.argument("name", type=NODE)
@click.option("--json", "as_json", is_flag=True)
@with_service
async def remove(svc: Service, name: str, as_json: bool) -> None:
    """Remove a stopped node that holds no replicas."""
    await svc.remove_node(name)
    await _print_node(svc, name, as_json, f"node {name} removed")


@node.command("drain")
@click.argument("name", type=NODE)
@click.option("--wait", is_flag=True, help="show progress until the drain ends")
@click.option(
    "--timeout",
    type=Seconds(0, 30 * 86400),
    default=0.0,
    help="with --wait: give up after S s (0: never)",
)
@click.option("--force", is_flag=True, help="drain even if some volumes must lose a replica")
@click.option("--dry-run", is_flag=True, help="print the plan, move nothing")
@click.option("--json", "as_json", is_flag=True)
@with_service
async def node_drain(
    svc: Service, name: str, wait: bool, timeout: float, force: bool, dry_run: bool, as_json: bool
) -> None:
    """Move every replica and attachment off NAME, online; ends with NAME drained."""

    if dry_run:
        _, plan = await drain.make_plan(svc, name)
        bandwidth = min(
            (n.rebuild_bandwidth for n in await svc.nodes() if n.rebuild_bandwidth), default=0
        )
        drain_view.print_plan(plan, bandwidth, as_json)
        return
    op, plan = await drain.start(svc, name, force=force)
    if plan.losing_redundancy:
        output.warn(f"--force: {', '.join(plan.losing_redundancy)} will have fewer replicas")
    if not wait:
        drain_view.print_op(name, op, as_json)
        return
    final = await drain_view.follow(svc, name, timeout, quiet=as_json)
    drain_view.print_op(name, final, as_json)
    if final.state != "done":
        output.fail(f"drain of {name} {final.state}: {final.message or 'see node logs'}")
