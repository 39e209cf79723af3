"""`pxcluster volume`: create, inspect, attach, fail over, resize, update, clone, scrub..."""

from __future__ import annotations

import os
from typing import Any

import click

from pxcluster import inputs
from pxcluster.cli import output
from pxcluster.cli.context import with_service
from pxcluster.cli.params import (
    NODE,
    SCHEDULE,
    SNAPSHOT,
    TARGET_URL,
    VOLUME,
    Int,
    Limit,
    Seconds,
    rate,
    secret_file,
    size,
)
from pxcluster.cli.snapshot import snapshot
from pxcluster.errors import InvalidArgument
from pxcluster.service import snapshots, transfer
from pxcluster.service.core import Service, nbd_uri

# --- volume


@click.group()
def volume() -> None:
    """Volumes: create, attach, inspect, delete."""


def _print_volume(info: dict[str, Any]) -> None:
    output.table(
        None,
        ["name", "size", "repl", "state", "health", "node", "epoch", "nbd uri"],
        [
            [
                info["name"],
                output.size(info["size"]),
                info["repl"],
                info["state"],
                info["health"],
                info["attached_node"],
                info["epoch"],
                info["nbd_uri"],
            ]
        ],
    )
    output.table(
        None,
        ["replica node", "state", "since epoch"],
        [[r["node"], r["state"], r["since_epoch"]] for r in info["replicas"]],
    )


@volume.command("create")
@click.argument("name", type=VOLUME)
@click.option(
    "--size", "size_bytes", required=True, type=size(inputs.MAX_VOLUME_SIZE), help="e.g. 512M, 10G"
)
@click.option("--repl", default=1, show_default=True, type=Int(1, 3), help="replicas")
@click.option("--sync-writes", is_flag=True, help="every write durable before its ack")
@click.option("--encrypted", is_flag=True, help="AES-XTS at rest, done by the engine")
@click.option(
    "--key-file",
    "key_bytes",
    default=None,
    type=secret_file("--key-file"),
    help="key material (16+ bytes); default: a random key",
)
@click.option("--key-env", default=None, help="take the key material from this variable")
@click.option("--json", "as_json", is_flag=True)
@with_service
async def volume_create(
    svc: Service,
    name: str,
    size_bytes: int,
    repl: int,
    sync_writes: bool,
    encrypted: bool,
    key_bytes: bytes | None,
    key_env: str | None,
    as_json: bool,
) -> None:
    """Create a volume and place its replicas."""
    material = _key_material(key_bytes, key_env)
    view = await svc.create_volume(
        name,
        size_bytes,
        repl,
        sync_writes=sync_writes,
        encrypted=encrypted,
        key_material=material,
    )
    info = await svc.inspect(view)
    if as_json:
        output.emit_json(info)
    else:
        click.echo(f"volume {name} created ({output.size(info['size'])}, repl {repl})")


def _key_material(key_bytes: bytes | None, key_env: str | None) -> bytes | None:
    if key_bytes is not None and key_env:
        raise InvalidArgument("give --key-file or --key-env, not both")
    if key_bytes is not None:
        return key_bytes
    if key_env:
        value = os.environ.get(key_env)
        if not value:
            raise InvalidArgument(f"--key-env {key_env}: the variable is not set")
        return value.encode()
    return None


@volume.command("list")
@click.option("--json", "as_json", is_flag=True)
@with_service
async def volume_list(svc: Service, as_json: bool) -> None:
    """Every volume."""
    infos = [await svc.inspect(v) for v in await svc.volumes()]
    if as_json:
        output.emit_json(infos)
        return
    output.table(
        None,
        ["name", "size", "repl", "state", "health", "node", "nbd uri"],
        [
            [
                i["name"],
                output.size(i["size"]),
                i["repl"],
                i["state"],
                i["health"],
                i["attached_node"],
                i["nbd_uri"],
            ]
            for i in infos
        ],
    )


@volume.command("inspect")
@click.argument("name", type=VOLUME)
@click.option("--json", "as_json", is_flag=True)
@with_service
async def volume_inspect(svc: Service, name: str, as_json: bool) -> None:
    """A volume's state, attachment, epoch and replicas."""
    info = await svc.inspect(await svc.volume(name))
    if as_json:
        output.emit_json(info)
    else:
        _print_volume(info)


@volume.command("attach")
@click.argument("name", type=VOLUME)
@click.option("--node", "node_name", required=True, type=NODE)
@click.option("--wait", is_flag=True, help="return once the NBD export is serving")
@click.option("--timeout", type=Seconds(0.1, 86400), default=30.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@with_service
async def volume_attach(
    svc: Service, name: str, node_name: str, wait: bool, timeout: float, as_json: bool
) -> None:
    """Attach NAME on a node; prints the NBD URI."""
    target = await svc.find_node(node_name)
    view = await svc.attach(name, node_name)
    if wait:
        view = await svc.wait_attached(name, target.id, timeout)
    info = await svc.inspect(view)
    if as_json:
        output.emit_json(info)
        return

    click.echo(info["nbd_uri"] or nbd_uri(target, name))


@volume.command("detach")
@click.argument("name", type=VOLUME)
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--timeout", type=Seconds(0.1, 86400), default=30.0, show_default=True)
@with_service
async def volume_detach(svc: Service, name: str, wait: bool, timeout: float) -> None:
    """Flush, mark clean and release the attachment."""
    await svc.detach(name)
    if wait:
        await svc.wait_detached(name, timeout)
    click.echo(f"volume {name} detached")


@volume.command("failover")
@click.argument("name", type=VOLUME)
@click.option("--to", "to", default=None, type=NODE, help="destination node (default: chosen)")
@click.option("--drill", is_flag=True, help="a real hand-off on a healthy volume, timed")
@click.option("--timeout", type=Seconds(0.1, 86400), default=60.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@with_service
async def volume_failover(
    svc: Service, name: str, to: str | None, drill: bool, timeout: float, as_json: bool
) -> None:
    """Move the attachment to another node: clean hand-off, or forced if its node is down."""
    dest = await svc.failover(name, to, drill=drill)
    view = await svc.wait_attached(name, dest.id, timeout)
    info = await svc.inspect(view)
    if as_json:
        output.emit_json(info)
        return
    click.echo(info["nbd_uri"])
    f = info["last_failover"]
    if drill and f:
        click.echo(
            f"{f['kind']} {f['from']} -> {f['to']}: fenced after {f['fence_s']}s, "
            f"reconciled in {f['reconcile_s']}s, serving after {f['serve_s']}s"
        )


@volume.command("delete")
@click.argument("name", type=VOLUME)
@with_service
async def volume_delete(svc: Service, name: str) -> None:
    """Delete a detached volume and free its chunks on every replica."""
    await svc.delete_volume(name)
    click.echo(f"volume {name} deleted")


@volume.command("resize")
@click.argument("name", type=VOLUME)
@click.option(
    "--size",
    "size_bytes",
    required=True,
    type=size(inputs.MAX_VOLUME_SIZE),
    help="new size, e.g. 20G (grow only)",
)
@click.option("--json", "as_json", is_flag=True)
@with_service
async def volume_resize(svc: Service, name: str, size_bytes: int, as_json: bool) -> None:
    """Grow NAME, online; new NBD connections see the new size."""
    info = await svc.inspect(await svc.resize(name, size_bytes))
    if as_json:
        output.emit_json(info)
    else:
        click.echo(f"volume {name} is now {output.size(info['size'])}")


@volume.command("update")
@click.argument("name", type=VOLUME)
@click.option(
    "--iops-limit",
    type=Limit(inputs.MAX_IOPS),
    default=None,
    help="read+write ops/s, 0 = unlimited",
)
@click.option(
    "--bw-limit",
    type=rate(inputs.MAX_BANDWIDTH),
    default=None,
    help="read+write bytes/s, e.g. 100M, 0 = unlimited",
)
@click.option(
    "--snapshot-schedule",
    type=SCHEDULE,
    default=None,
    help='e.g. "every 1h keep 24"; "none" to stop',
)
@click.option(
    "--backup-schedule",
    type=SCHEDULE,
    default=None,
    help='e.g. "every 1d keep 7"; needs --backup-target',
)
@click.option(
    "--backup-target", type=TARGET_URL, default=None, help="s3://BUCKET/PREFIX or file:///PATH"
)
@click.option("--json", "as_json", is_flag=True)
@with_service
async def volume_update(
    svc: Service,
    name: str,
    iops_limit: int | None,
    bw_limit: int | None,
    snapshot_schedule: str | None,
    backup_schedule: str | None,
    backup_target: str | None,
    as_json: bool,
) -> None:
    """Change a volume's I/O limits (enforced by the engine serving it) and its snapshot and
    backup schedules (run by the leader)."""
    schedules = (snapshot_schedule, backup_schedule, backup_target)
    if iops_limit is None and bw_limit is None and all(x is None for x in schedules):
        raise InvalidArgument(
            "nothing to update: pass --iops-limit, --bw-limit, --snapshot-schedule, "
            "--backup-schedule or --backup-target"
        )
    if any(x is not None for x in schedules):
        await svc.set_schedules(name, *schedules)
    view = await svc.volume(name)
    if iops_limit is not None or bw_limit is not None:
        view = await svc.set_limits(name, iops_limit, bw_limit)
    info = await svc.inspect(view)
    if as_json:
        output.emit_json(info)
    else:
        click.echo(
            f"volume {name}: iops limit {info['iops_limit'] or 'none'}, "
            f"bandwidth limit {output.size(info['bw_limit']) if info['bw_limit'] else 'none'}, "
            f"snapshots {info['snapshot_schedule'] or 'unscheduled'}, "
            f"backups {info['backup_schedule'] or 'unscheduled'}"
        )


@volume.command("clone")
@click.argument("name", type=VOLUME)
@click.option("--snapshot", "snap", required=True, type=SNAPSHOT, help="the snapshot to clone")
@click.option("--name", "new_name", required=True, type=VOLUME, help="name of the new volume")
@click.option("--repl", type=Int(1, 3), default=None, help="replicas (default: as the source)")
@click.option("--json", "as_json", is_flag=True)
@with_service
async def volume_clone(
    svc: Service, name: str, snap: str, new_name: str, repl: int | None, as_json: bool
) -> None:
    """A new, independent volume holding snapshot SNAP of NAME, usable at once."""

    info = await transfer.clone(svc, name, snap, new_name, repl)
    if as_json:
        output.emit_json(info)
    else:
        click.echo(
            f"volume {new_name} cloned from {name}@{snap}: usable now, copying "
            f"{info['clone_of']['chunks_total']} chunks in the background"
        )


@volume.command("revert")
@click.argument("name", type=VOLUME)
@click.option("--snapshot", "snap", required=True, type=SNAPSHOT, help="the snapshot to go back to")
@with_service
async def volume_revert(svc: Service, name: str, snap: str) -> None:
    """Discard what was written to NAME since SNAP (NAME must be detached)."""

    await snapshots.revert(svc, name, snap)
    click.echo(f"volume {name} reverted to snapshot {snap}")


@volume.command("scrub")
@click.argument("name", type=VOLUME)
@click.option(
    "--timeout", type=Seconds(0.1, 86400), default=600.0, show_default=True, help="seconds to wait"
)
@click.option("--json", "as_json", is_flag=True)
@with_service
async def volume_scrub(svc: Service, name: str, timeout: float, as_json: bool) -> None:
    """Compare every chunk of NAME (and of its snapshots) across its in-sync replicas, by
    checksum, and repair any bad copy from a good one. Exit 1 if a chunk has no good copy."""

    report = await snapshots.scrub(svc, name, timeout=timeout)
    if as_json:
        output.emit_json(report)
    else:
        for r in report["repaired"]:
            click.echo(
                f"repaired {r['layer']} chunk {r['chunk']} on {r['node']} from {r['from']} "
                f"({r['reason']})"
            )
        click.echo(
            f"volume {name}: {report['chunks']} chunks scrubbed, {len(report['repaired'])} "
            f"repaired, {len(report['unrepairable'])} without a good copy"
        )
    if report["unrepairable"]:
        output.fail(f"volume {name}: chunks without a good copy: {report['unrepairable']}")


volume.add_command(snapshot)
