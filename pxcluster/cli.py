"""`pxcluster`: the command line. Each command is a thin shell over pxcluster.service."""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import click

from membership.etcd import Etcd, EtcdSettings, EtcdUnavailable
from pxcluster import inputs, logs, output
from pxcluster.cli_backup import backup as backup_group
from pxcluster.cli_types import (
    CLUSTER,
    ETCD_URL,
    NODE,
    PORT,
    SCHEDULE,
    SNAPSHOT,
    TARGET_URL,
    VOLUME,
    ZONE,
    Int,
    Limit,
    Seconds,
    ip_address,
    rate,
    read_secret,
    secret_file,
    size,
)
from pxcluster.errors import InvalidArgument, PxcError
from pxcluster.service import Service
from pxcluster.verify import verify as verify_command
from replica.errors import DiskError

T = TypeVar("T")
EXPECTED = (PxcError, EtcdUnavailable, DiskError)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def run(coro: Coroutine[Any, Any, T]) -> T:
    import uvloop

    return uvloop.run(coro)  # type: ignore[no-any-return]


class Ctx:
    def __init__(self, etcd_url: str, cluster: str, settings: EtcdSettings | None = None) -> None:
        self.etcd_url = etcd_url
        self.cluster = cluster
        self.etcd_settings = settings or EtcdSettings()

    def etcd(self) -> Etcd:
        return Etcd(self.etcd_url, settings=self.etcd_settings)


def with_service(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """Run an async command body with a connected Service; expected errors become one line."""

    @click.pass_obj
    @functools.wraps(fn)
    def wrapper(ctx: Ctx, *args: Any, **kwargs: Any) -> Any:
        async def body() -> Any:
            etcd = ctx.etcd()
            try:
                await etcd.connect()
                return await fn(Service(etcd, ctx.cluster), *args, **kwargs)
            finally:
                await etcd.close()

        try:
            return run(body())
        except EXPECTED as e:
            output.fail(str(e))

    return wrapper


class Group(click.Group):
    """The top-level group: every failure ends as one line on stderr and a non-zero status.

    Usage errors (a bad option value, a missing argument) print as `error: ...` (status 2)
    instead of click's usage block; anything no command expected is the last resort: one line
    naming the exception (status 1), the traceback only with -v."""

    verbose = 0  # set by main() once the options are parsed

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.Abort:
            _fail("aborted", 1)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except (SystemExit, KeyboardInterrupt):
            raise
        except OSError as e:
            if e.errno == errno.EPIPE:  # stdout closed by a pipe reader: nothing to say
                sys.exit(1)
            self._last_resort(e)
        except Exception as e:
            self._last_resort(e)
        sys.exit(rv if isinstance(rv, int) else 0)

    def _last_resort(self, e: Exception) -> None:
        if Group.verbose:
            traceback.print_exc()
        _fail(f"{type(e).__name__}: {e}", 1)


def _fail(message: str, code: int) -> None:
    # One line, whatever the message holds (a multi-line exception text included), and a
    # short one: click echoes values back, and a value may be 5,000 characters long.
    line = " ".join(message.split())
    output.fail(line if len(line) <= 300 else line[:300] + "...", code)


def not_implemented(what: str) -> Callable[..., None]:
    def cmd(*_: Any, **__: Any) -> None:
        output.fail(f"'{what}' is not implemented yet")

    return cmd


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


# --- cluster


@main.group()
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
    from pxcluster.node import Node, NodeConfig
    from pxcluster.paths import check_data_dir, check_disks
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
        logging.getLogger("pxcluster.node").exception("node %s stopped", name)
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


# --- node


@main.group()
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
    from pxcluster import drain, drainview

    if dry_run:
        _, plan = await drain.make_plan(svc, name)
        bandwidth = min(
            (n.rebuild_bandwidth for n in await svc.nodes() if n.rebuild_bandwidth), default=0
        )
        drainview.print_plan(plan, bandwidth, as_json)
        return
    op, plan = await drain.start(svc, name, force=force)
    if plan.losing_redundancy:
        output.warn(f"--force: {', '.join(plan.losing_redundancy)} will have fewer replicas")
    if not wait:
        drainview.print_op(name, op, as_json)
        return
    final = await drainview.follow(svc, name, timeout, quiet=as_json)
    drainview.print_op(name, final, as_json)
    if final.state != "done":
        output.fail(f"drain of {name} {final.state}: {final.message or 'see node logs'}")


# --- volume


@main.group()
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
    from pxcluster.service import nbd_uri

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


def _stub(group: click.Group, name: str, what: str, *params: Callable[[Any], Any]) -> None:
    fn: Any = not_implemented(what)
    for p in params:
        fn = p(fn)
    group.command(name)(fn)


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
    from pxcluster import volume_io

    info = await volume_io.clone(svc, name, snap, new_name, repl)
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
    from pxcluster import snapshots

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
    from pxcluster import snapshots

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


@volume.group()
def snapshot() -> None:
    """Snapshots of a volume (crash-consistent, online)."""


@snapshot.command("create")
@click.argument("name", type=VOLUME)
@click.option("--name", "snap", required=True, type=SNAPSHOT, help="the snapshot's name")
@click.option("--json", "as_json", is_flag=True)
@with_service
async def snapshot_create(svc: Service, name: str, snap: str, as_json: bool) -> None:
    """Snapshot volume NAME: every write acknowledged before this returns is in it."""
    from pxcluster import snapshots

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
    from pxcluster import snapshots

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
    from pxcluster import snapshots

    await snapshots.delete(svc, name, snap)
    click.echo(f"snapshot {snap} of volume {name} deleted")


main.add_command(backup_group)
main.add_command(verify_command)
from pxcluster.host.commands import VOLUME_COMMANDS, device  # noqa: E402 (registered here)

for _host_command in VOLUME_COMMANDS:
    volume.add_command(_host_command)
main.add_command(device)


# --- dev


@main.group()
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
    from pxcluster import devcluster

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
    from pxcluster import devcluster

    try:
        devcluster.down(directory, purge=purge)
    except EXPECTED as e:
        output.fail(str(e))


@dev.command("status")
@click.option("--dir", "directory", default=".pxc-dev", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def dev_status(directory: str, as_json: bool) -> None:
    """What `dev up` started, and whether it still runs."""
    from pxcluster import devcluster

    procs = devcluster.status(directory)
    if as_json:
        output.emit_json(procs)
    else:
        output.table(
            None,
            ["process", "pid", "running", "log"],
            [[p["name"], p["pid"], p["running"], p["log"]] for p in procs],
        )


if __name__ == "__main__":
    main()
