"""`pxcluster backup ...`: create, list, inspect, verify, delete, restore.

Registered in pxcluster.cli with `main.add_command(backup)`. `create` and `restore` need the
cluster (through Service.backup_source / Service.restore_sink, see
pxcluster.backup.ports.BackupHooks); list, inspect, verify and delete talk to the target
only, so they work from any host that reaches it, without etcd.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from pxcluster.backup import format as fmt
from pxcluster.backup.catalog import delete_backup, inspect_backup, list_backups
from pxcluster.backup.engine import create_backup
from pxcluster.backup.errors import RestoreFailed
from pxcluster.backup.ports import BackupHooks
from pxcluster.backup.restore import RestoreResult, restore_manifest, verify_backup
from pxcluster.backup.target import Target, parse_target
from pxcluster.cli import context, output
from pxcluster.cli.params import SNAPSHOT, TARGET_URL, VOLUME, Int
from pxcluster.errors import PxcError
from pxcluster.service.core import Service
from pxcluster.service.transfer import VolumeTransfer
from pxcluster.units import format_size


def hooks(svc: Service) -> BackupHooks:
    return VolumeTransfer(svc)


def with_service(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """context.with_service, the command body handed the cluster as BackupHooks. Both are
    looked up when the command runs: the library tests swap them for an in-memory service."""

    async def over_hooks(svc: Service, *args: Any, **kwargs: Any) -> Any:
        return await fn(hooks(svc), *args, **kwargs)

    @functools.wraps(fn)
    def deferred(*args: Any, **kwargs: Any) -> Any:
        return context.with_service(over_hooks)(*args, **kwargs)

    return deferred


def offline(fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """Run an async command body that needs no cluster; expected errors become one line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import uvloop

        try:
            return uvloop.run(fn(*args, **kwargs))
        except PxcError as e:
            output.fail(str(e))

    return wrapper


target_option = click.option(
    "--target",
    "target_url",
    required=True,
    type=TARGET_URL,
    metavar="URL",
    help="s3://BUCKET/PREFIX (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
    "AWS_REGION) or file:///PATH",
)
json_option = click.option("--json", "as_json", is_flag=True, help="print JSON")


@contextlib.contextmanager
def progress_bar(description: str, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """A byte progress bar on stderr (none when `quiet`); yields the update callback."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        # Scripts read stderr for the one error line: no bar unless a person is watching.
        disable=quiet or not sys.stderr.isatty(),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@click.group()
def backup() -> None:
    """Backups of volume snapshots to S3 or a directory."""


@backup.command("create")
@click.argument("name", type=VOLUME)
@click.option(
    "--snapshot",
    default=None,
    type=SNAPSHOT,
    help="back up this snapshot (default: a temporary one)",
)
@target_option
@json_option
@with_service
async def backup_create(
    svc: BackupHooks, name: str, snapshot: str | None, target_url: str, as_json: bool
) -> None:
    """Back up volume NAME: only chunks changed since its last backup are read, and only
    blocks the target lacks are uploaded."""
    async with parse_target(target_url) as target, svc.backup_source(name, snapshot) as source:
        with progress_bar(f"backup {name}", quiet=as_json) as update:
            result = await create_backup(target, source, progress=update)
    if as_json:
        output.emit_json(result.to_dict())
        return
    click.echo(
        f"backup {result.id} of {result.volume} (snapshot {result.snapshot}): "
        f"read {format_size(result.bytes_read)}, uploaded {format_size(result.bytes_uploaded)} "
        f"({result.blocks_uploaded} new of {result.blocks} blocks) in {result.seconds:.1f}s"
    )


@backup.command("list")
@target_option
@click.option(
    "--volume", default=None, type=VOLUME, help="only backups of this volume (name or id)"
)
@json_option
@offline
async def backup_list(target_url: str, volume: str | None, as_json: bool) -> None:
    """The backups in a target, oldest first."""
    async with parse_target(target_url) as target:
        manifests = await list_backups(target, volume)
    if as_json:
        output.emit_json([m.summary() for m in manifests])
        return
    output.table(
        None,
        ["id", "volume", "snapshot", "created", "size", "data", "uploaded"],
        [
            [
                m.id,
                m.volume,
                m.snapshot,
                m.created,
                output.size(m.size),
                output.size(m.totals.logical_bytes),
                output.size(m.totals.bytes_uploaded),
            ]
            for m in manifests
        ],
    )


@backup.command("inspect")
@click.argument("backup_id", metavar="ID")
@target_option
@json_option
@offline
async def backup_inspect(backup_id: str, target_url: str, as_json: bool) -> None:
    """A backup's volume, snapshot, geometry and totals."""
    async with parse_target(target_url) as target:
        m = await inspect_backup(target, backup_id)
    if as_json:
        output.emit_json(m.summary())
        return
    t = m.totals
    rows: list[list[Any]] = [
        ["id", m.id],
        ["volume", f"{m.volume} ({m.volume_id})"],
        ["snapshot", m.snapshot],
        ["created", m.created],
        ["size", output.size(m.size)],
        ["chunk size / block size", f"{format_size(m.chunk_size)} / {format_size(m.block_size)}"],
        ["encrypted", "yes" if m.encrypted else "no"],
        ["incremental to", m.parent or "-"],
        ["chunks", t.chunks],
        ["blocks (distinct)", f"{t.blocks} ({t.unique_blocks})"],
        ["data", output.size(t.logical_bytes)],
        ["read / uploaded", f"{output.size(t.bytes_read)} / {output.size(t.bytes_uploaded)}"],
        ["new blocks", t.blocks_uploaded],
        ["took", f"{t.seconds:.1f}s"],
    ]
    output.table(None, ["", ""], rows)


@backup.command("verify")
@click.argument("backup_id", metavar="ID")
@target_option
@json_option
@offline
async def backup_verify(backup_id: str, target_url: str, as_json: bool) -> None:
    """Read every block of a backup and check its hash; exit 1 naming a missing or corrupt one."""
    async with parse_target(target_url) as target:
        report = await verify_backup(target, backup_id)
    if as_json:
        output.emit_json(report.to_dict())
    elif report.ok:
        click.echo(
            f"backup {report.id} of {report.volume}: all {report.blocks} blocks present and "
            f"intact ({format_size(report.bytes_checked)}, {report.seconds:.1f}s)"
        )
    error = report.error()
    if error is not None:
        raise error


@backup.command("delete")
@click.argument("backup_id", metavar="ID")
@target_option
@json_option
@offline
async def backup_delete(backup_id: str, target_url: str, as_json: bool) -> None:
    """Delete a backup, and the blocks no other backup uses."""
    async with parse_target(target_url) as target:
        result = await delete_backup(target, backup_id)
    if as_json:
        output.emit_json(result.to_dict())
        return
    click.echo(f"backup {result.id} of {result.volume} deleted")
    if result.gc == "done":
        click.echo(
            f"{result.blocks_deleted} blocks freed, {result.blocks_kept} still used by other "
            "backups"
        )
    else:
        output.warn(
            f"unused blocks not freed ({result.gc}: {result.gc_reason}); "
            f"{result.blocks_deleted} freed, the rest go with the next delete"
        )


@backup.command("restore")
@click.argument("backup_id", metavar="ID")
@target_option
@click.option("--name", "new_name", required=True, type=VOLUME, help="the new volume to create")
@click.option("--repl", type=Int(1, 3), default=None, help="replicas of the new volume")
@json_option
@with_service
async def backup_restore(
    svc: BackupHooks,
    backup_id: str,
    target_url: str,
    new_name: str,
    repl: int | None,
    as_json: bool,
) -> None:
    """Restore a backup into a new volume NAME (in this cluster or another one)."""
    async with parse_target(target_url) as target:
        m = await inspect_backup(target, backup_id)
        result = await _restore_into(svc, target, m, new_name, repl, as_json)
    if as_json:
        out = result.to_dict()
        out["name"] = new_name
        output.emit_json(out)
        return
    click.echo(
        f"backup {m.id} of {m.volume} restored into volume {new_name}: "
        f"{format_size(result.bytes_written)} written in {result.seconds:.1f}s"
    )


async def _restore_into(
    svc: BackupHooks,
    target: Target,
    m: fmt.Manifest,
    new_name: str,
    repl: int | None,
    quiet: bool,
) -> RestoreResult:
    """Nothing is half-restored without saying so: the sink deletes the new volume when the
    body fails, and the one error line says whether that worked."""
    entered = False
    inner: Exception | None = None
    result: RestoreResult | None = None
    try:
        async with svc.restore_sink(new_name, m.size, m.chunk_size, repl, m.encrypted) as sink:
            entered = True
            try:
                with progress_bar(f"restore {m.id}", quiet=quiet) as update:
                    result = await restore_manifest(target, m, sink, progress=update)
            except Exception as e:
                inner = e
                raise
    except Exception as e:
        if not entered:
            raise  # the volume was never created
        what = f"restore of backup {m.id} into volume {new_name} failed"
        if inner is None:
            raise RestoreFailed(
                f"{what} while finishing: {e}; volume {new_name} may be incomplete: delete it"
            ) from e
        if e is inner:
            raise RestoreFailed(f"{what}: {inner}; the new volume {new_name} was removed") from e
        raise RestoreFailed(
            f"{what}: {inner}; removing the new volume {new_name} failed too ({e}): delete it"
        ) from e
    if result is None:  # a sink that swallowed the error: say so rather than claim success
        raise RestoreFailed(f"restore of backup {m.id} into volume {new_name} did not finish")
    return result
