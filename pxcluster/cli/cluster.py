"""`pxcluster cluster`: join a node (run it in the foreground), see the cluster."""

from __future__ import annotations

import logging
import os

import click

from pxcluster import inputs
from pxcluster.cli import output
from pxcluster.cli.context import EXPECTED, LOG_LEVELS, Ctx, run, with_service
from pxcluster.cli.params import (
    NODE,
    PORT,
    ZONE,
    Int,
    Seconds,
    ip_address,
    rate,
)
from pxcluster.errors import InvalidArgument, PxcError
from pxcluster.node import logs
from pxcluster.service.core import Service

# --- cluster


@click.group()
def cluster() -> None:
    """Join nodes and see the cluster."""


@cluster.command()
@click.option("--name", required=True, type=NODE, help="node name, unique in the cluster")
@click.option(
    "--address", required=True, type=ip_address("--address"), help="IP address every port binds on"
)
@click.option("--disk", "disks", multiple=True, required=True, help="raw disk or file (repeat)")
@click.option("--zone", default="", type=ZONE, help="failure domain for replica spreading")
@click.option("--data-port", default=9002, show_default=True, type=PORT)
@click.option("--nbd-port", default=10809, show_default=True, type=PORT)
@click.option("--api-port", default=9001, show_default=True, type=PORT)
@click.option("--data-dir", default="", help="runtime files (NBD unix socket)")
@click.option(
    "--lease-ttl",
    default=5,
    show_default=True,
    type=Int(2, 3600),
    help="etcd lease TTL, s",
)
@click.option("--wipe", is_flag=True, help="erase disks that belong to another cluster")
@click.option(
    "--replace-after",
    default=300.0,
    show_default=True,
    type=Seconds(0, 365 * 86400),
    help="seconds a replica's node may stay down before the replica is replaced",
)
@click.option(
    "--rebuild-bw",
    default="0",
    show_default=True,
    type=rate(inputs.MAX_BANDWIDTH),
    help="rebuild bandwidth limit per replica, e.g. 200M (0 = unlimited)",
)
@click.option(
    "--clean-after",
    default=2.0,
    show_default=True,
    type=Seconds(0.01, 86400),
    help="seconds a chunk stays idle before it leaves the dirty-chunk log",
)
@click.option(
    "--api-token-file",
    default="",
    help="admin bearer token of the REST API: every call needs it (or the read token for reads)",
)
@click.option(
    "--api-read-token-file",
    default="",
    help="read-only bearer token of the REST API: GET calls and /metrics",
)
@click.option(
    "--api-address",
    default="",
    help="REST API listen address (default: --address if loopback, else 127.0.0.1)",
)
@click.option(
    "--api-insecure",
    is_flag=True,
    help="allow a REST API off loopback without --api-token-file",
)
@click.option(
    "--nbd-expose",
    is_flag=True,
    help="also serve NBD over TCP on --address; needs --nbd-tls-dir",
)
@click.option(
    "--nbd-tls-dir",
    default="",
    help="NBD TLS certificates: ca-cert.pem, server-cert.pem, server-key.pem",
)
@click.option(
    "--docker-plugin-socket",
    default="",
    help="serve the Docker volume plugin on this unix socket "
    "(e.g. /run/docker/plugins/pxcluster.sock)",
)
@click.option("--data-tls-cert", default="", help="replica port TLS: this node's certificate")
@click.option("--data-tls-key", default="", help="replica port TLS: its private key")
@click.option("--data-tls-ca", default="", help="replica port TLS: CA of every node's certificate")
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
)
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.pass_obj
def join(
    ctx: Ctx,
    name: str,
    address: str,
    disks: tuple[str, ...],
    zone: str,
    data_port: int,
    nbd_port: int,
    api_port: int,
    data_dir: str,
    lease_ttl: int,
    wipe: bool,
    replace_after: float,
    rebuild_bw: int,
    clean_after: float,
    api_token_file: str,
    api_read_token_file: str,
    api_address: str,
    api_insecure: bool,
    nbd_expose: bool,
    nbd_tls_dir: str,
    docker_plugin_socket: str,
    data_tls_cert: str,
    data_tls_key: str,
    data_tls_ca: str,
    log_level: str,
    log_format: str,
) -> None:
    """Format or recognise the disks, register this node and run it in the foreground."""
    from pxcluster.api import access
    from pxcluster.node.daemon import Node, NodeConfig
    from pxcluster.node.paths import check_data_dir, check_disks
    from replica.tls import TlsConfigError, TlsFiles

    logs.setup(log_level.upper(), log_format)
    try:
        data_tls = TlsFiles.from_options(data_tls_cert, data_tls_key, data_tls_ca)
        data_dir = check_data_dir(data_dir)
        disks = tuple(check_disks(disks))
        # The REST API's settings are checked here, before a disk is touched; the node
        # applies the same checks when it starts the API.
        tokens = access.read_tokens(api_token_file, api_read_token_file)
        api_host = access.listen_address(address, api_address)
        access.check_exposure(api_host, tokens, api_insecure)
        if nbd_tls_dir and not os.path.isdir(nbd_tls_dir):
            raise InvalidArgument(f"--nbd-tls-dir {nbd_tls_dir}: no such directory")
    except (PxcError, TlsConfigError) as e:
        output.fail(f"cannot join: {e}")
    config = NodeConfig(
        name=name,
        address=address,
        disks=list(disks),
        etcd_url=ctx.etcd_url,
        etcd_settings=ctx.etcd_settings,
        data_tls=data_tls,
        cluster=ctx.cluster,
        zone=zone,
        data_port=data_port,
        nbd_port=nbd_port,
        api_port=api_port,
        data_dir=data_dir,
        lease_ttl=lease_ttl,
        wipe=wipe,
        replace_after=replace_after,
        rebuild_bandwidth=rebuild_bw,
        clean_after=clean_after,
        api_token_file=api_token_file,
        api_read_token_file=api_read_token_file,
        api_address=api_address,
        api_insecure=api_insecure,
        nbd_expose=nbd_expose,
        nbd_tls_dir=nbd_tls_dir,
        docker_plugin_socket=docker_plugin_socket,
    )
    try:
        run(Node(config).run_forever())
    except (*EXPECTED, OSError, TlsConfigError) as e:
        output.fail(f"cannot join: {e}")
    except Exception as e:
        # Not bad input but a daemon failing: its log keeps the traceback to find the cause.
        logging.getLogger("pxcluster.node.daemon").exception("node %s stopped", name)
        output.fail(f"node {name} stopped: {type(e).__name__}: {e}")


@cluster.command()
@click.option("--json", "as_json", is_flag=True)
@with_service
async def status(svc: Service, as_json: bool) -> None:
    """Cluster name, id, leader, nodes up, capacity."""
    st = await svc.cluster_status()
    if as_json:
        output.emit_json(st)
        return
    output.table(
        None,
        ["cluster", "id", "etcd", "leader", "nodes up", "capacity", "used", "volumes"],
        [
            [
                st["cluster"],
                st["id"],
                st["etcd"],
                st["leader"],
                f"{st['nodes_up']}/{st['nodes_total']}",
                output.size(st["capacity"]),
                output.size(st["used"]),
                st["volumes"],
            ]
        ],
    )
