"""How `node drain` shows a plan and follows a drain: rich progress bars or JSON."""

from __future__ import annotations

import asyncio
import time

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from membership.records import DrainOp
from pxcluster.cli import output
from pxcluster.errors import OperationTimeout
from pxcluster.policy.drain_plan import DrainPlan
from pxcluster.service import drain
from pxcluster.service.core import Service
from pxcluster.units import format_size


def print_plan(plan: DrainPlan, bandwidth: int, as_json: bool) -> None:
    if as_json:
        output.emit_json(plan.to_dict(bandwidth))
        return
    output.table(
        f"drain {plan.node}: replicas",
        ["volume", "new replica on", "to copy (up to)"],
        [
            [m.volume, m.to or "NOWHERE (redundancy drops)", format_size(m.bytes)]
            for m in plan.moves
        ],
    )
    output.table(
        f"drain {plan.node}: attachments",
        ["volume", "hand off to"],
        [[h.volume, h.to or "NOWHERE"] for h in plan.handoffs],
    )
    eta = plan.estimate_seconds(bandwidth)
    print(
        f"{len(plan.moves)} replica(s), up to {format_size(plan.bytes_total)} to copy, "
        f"{len(plan.handoffs)} attachment(s) to hand off; "
        + (
            f"about {eta} s at {format_size(bandwidth)}/s"
            if eta is not None
            else "no rebuild bandwidth limit set"
        )
    )
    if plan.losing_redundancy:
        print(f"would lose redundancy (needs --force): {', '.join(plan.losing_redundancy)}")


def print_op(name: str, op: DrainOp, as_json: bool) -> None:
    if as_json:
        output.emit_json({**op.to_dict(), "node": name, "node_id": op.node})
        return
    print(
        f"drain {name}: {op.state}; replicas moved {op.replicas_moved}/{op.replicas_total}, "
        f"attachments handed off {op.attachments_moved}/{op.attachments_total}, "
        f"copied {format_size(op.bytes_copied)}" + (f"; {op.message}" if op.message else "")
    )


async def follow(svc: Service, name: str, timeout: float, *, quiet: bool) -> DrainOp:
    node = await svc.find_node(name)
    deadline = time.monotonic() + timeout if timeout > 0 else None
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        disable=quiet,
        transient=False,
    ) as bar:
        reps = bar.add_task("replicas moved", total=None)
        atts = bar.add_task("attachments handed off", total=None)
        data = bar.add_task("MiB copied", total=None)
        while True:
            op = await drain.status(svc, node)
            if op is not None:
                bar.update(reps, total=op.replicas_total, completed=op.replicas_moved)
                bar.update(atts, total=op.attachments_total, completed=op.attachments_moved)
                bar.update(data, total=op.bytes_total >> 20, completed=op.bytes_copied >> 20)
                if op.state != "running":
                    return op
            if deadline is not None and time.monotonic() > deadline:
                raise OperationTimeout(
                    f"drain of {name} still running after {timeout:.0f}s "
                    f"(it goes on; run 'pxcluster node drain {name} --wait' to follow it)"
                )
            await asyncio.sleep(0.5)
