"""`pxcluster`: the command line, one module per command group. Each command is a thin
shell over the service layer (pxcluster/service)."""

from __future__ import annotations

import logging

import click

from membership.etcd import EtcdSettings
from pxcluster.cli import output
from pxcluster.cli.backup import backup as backup_group
from pxcluster.cli.cluster import cluster
from pxcluster.cli.context import EXPECTED, Ctx, Group, run, with_service
from pxcluster.cli.dev import dev
from pxcluster.cli.host import VOLUME_COMMANDS, device
from pxcluster.cli.node import node
from pxcluster.cli.params import CLUSTER, ETCD_URL, read_secret
from pxcluster.cli.volume import volume
from pxcluster.errors import InvalidArgument
from pxcluster.node import logs
from pxcluster.tools.verify import verify as verify_command


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--etcd",
    envvar="PXC_ETCD",
    default="http://127.0.0.1:2379",
    show_default=True,
    type=ETCD_URL,
    help="etcd endpoint (env PXC_ETCD)",
)
@click.option(
    "--cluster",
    envvar="PXC_CLUSTER",
    default="default",
    show_default=True,
    type=CLUSTER,
    help="cluster name, a DNS label (env PXC_CLUSTER)",
)
@click.option("--etcd-cacert", envvar="PXC_ETCD_CACERT", default="", help="CA verifying etcd (TLS)")
@click.option("--etcd-cert", envvar="PXC_ETCD_CERT", default="", help="client certificate for etcd")
@click.option("--etcd-key", envvar="PXC_ETCD_KEY", default="", help="its private key")
@click.option("--etcd-user", envvar="PXC_ETCD_USER", default="", help="etcd user (auth enabled)")
@click.option(
    "--etcd-password",
    envvar="PXC_ETCD_PASSWORD",
    default="",
    help="its password (prefer --etcd-password-file or the env: argv is visible to all)",
)
@click.option(
    "--etcd-password-file", envvar="PXC_ETCD_PASSWORD_FILE", default="", help="file with it"
)
@click.option("-v", "--verbose", count=True, help="more logging")
@click.pass_context
def main(
    ctx: click.Context,
    etcd: str,
    cluster: str,
    etcd_cacert: str,
    etcd_cert: str,
    etcd_key: str,
    etcd_user: str,
    etcd_password: str,
    etcd_password_file: str,
    verbose: int,
) -> None:
    """pxcluster: synchronously replicated block volumes served over NBD."""
    Group.verbose = verbose
    logs.setup(logging.WARNING - 10 * verbose)
    if etcd_password_file:
        if etcd_password:
            output.fail("give --etcd-password or --etcd-password-file, not both")
        try:
            raw = read_secret(etcd_password_file, "--etcd-password-file")
            etcd_password = raw.decode().rstrip("\r\n")
        except InvalidArgument as e:
            output.fail(str(e))
        except UnicodeDecodeError:
            output.fail(f"--etcd-password-file {etcd_password_file}: not UTF-8 text")
    settings = EtcdSettings(etcd_cacert, etcd_cert, etcd_key, etcd_user, etcd_password)
    ctx.obj = Ctx(etcd, cluster, settings)


main.add_command(cluster)
main.add_command(node)
main.add_command(volume)
main.add_command(backup_group)
main.add_command(verify_command)
main.add_command(dev)
for _host_command in VOLUME_COMMANDS:
    volume.add_command(_host_command)
main.add_command(device)

__all__ = ["EXPECTED", "Ctx", "main", "run", "with_service"]
