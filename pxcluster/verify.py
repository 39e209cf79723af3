"""`pxcluster verify NAME`: prove on a live cluster that a volume keeps every acknowledged
write, across failovers when asked to cause them."""

from __future__ import annotations

import click

from pxcluster import output


@click.command("verify")
@click.argument("name")
@click.option("--seconds", type=float, default=30.0, show_default=True)
@click.option("--with-faults", is_flag=True, help="fail the volume over while writing")
@click.option("--json", "as_json", is_flag=True)
def verify(name: str, seconds: float, with_faults: bool, as_json: bool) -> None:
    """Write stamped blocks to NAME, follow it when it moves, then check every block."""
    output.fail("'verify' is not implemented yet")
