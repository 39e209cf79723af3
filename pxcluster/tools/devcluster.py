"""`pxcluster dev up|down|status`: etcd plus N nodes on 127.0.0.1, sparse files as disks.

Everything it starts is recorded in DIR/dev.json, so `dev down` stops exactly that.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from membership.etcd import Etcd, EtcdSettings, EtcdUnavailable, parse_endpoint
from pxcluster.errors import OperationTimeout, PxcError
from pxcluster.host.proc import pid_alive
from pxcluster.service.core import Service

STATE = "dev.json"


def node_ports(i: int) -> dict[str, int]:
    """Node i (0-based): the first node gets the standard NBD port 10809."""
    return {"nbd": 10809 + i, "api": 19001 + 10 * i, "data": 19002 + 10 * i}


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def _spawn(cmd: list[str], log: Path) -> int:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return proc.pid


def _pxcluster() -> list[str]:
    return [sys.executable, "-m", "pxcluster.cli"]


def up(
    etcd_url: str,
    cluster: str,
    nodes: int,
    directory: str,
    disk_size: int,
    settings: EtcdSettings | None = None,
) -> None:
    if settings is not None and (settings.tls_files or settings.user):
        # It starts its own etcd, on plain http and without users.
        raise PxcError(
            "dev up starts its own etcd without TLS or users; --etcd-cacert/--etcd-cert/"
            "--etcd-key/--etcd-user are for a real etcd (pxcluster cluster join)"
        )
    if etcd_url.lower().startswith("https://"):
        raise PxcError(f"dev up starts its own etcd on plain http, not {etcd_url}")
    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    state_file = d / STATE
    if state_file.exists() and any(pid_alive(p["pid"]) for p in status(directory)):
        raise PxcError(f"a dev cluster from {d} is already running (pxcluster dev down first)")
    host, port = parse_endpoint(etcd_url)
    procs: list[dict[str, Any]] = []
    if _listening(host, port):
        raise PxcError(
            f"something already listens on {host}:{port}; stop it or pass --etcd for another port"
        )
    etcd_bin = shutil.which("etcd")
    if etcd_bin is None:
        raise PxcError("etcd not found on PATH (make install installs etcd-server)")
    log = d / "etcd.log"
    pid = _spawn(
        [
            etcd_bin,
            "--name",
            "dev",
            "--data-dir",
            str(d / "etcd"),
            "--listen-client-urls",
            f"http://{host}:{port}",
            "--advertise-client-urls",
            f"http://{host}:{port}",
            "--listen-peer-urls",
            f"http://{host}:{port + 1}",
            "--initial-advertise-peer-urls",
            f"http://{host}:{port + 1}",
            "--initial-cluster",
            f"dev=http://{host}:{port + 1}",
        ],
        log,
    )
    procs.append({"name": "etcd", "pid": pid, "log": str(log)})
    _save(state_file, procs)
    _wait(lambda: _listening(host, port), 20, f"etcd did not start (see {log})")
    (d / "disks").mkdir(exist_ok=True)
    for i in range(nodes):
        name = f"n{i + 1}"
        disk = d / "disks" / f"{name}.img"
        if not disk.exists():
            with open(disk, "wb") as f:
                f.truncate(disk_size)
        ports = node_ports(i)
        log = d / f"{name}.log"
        pid = _spawn(
            [
                *_pxcluster(),
                "--etcd",
                etcd_url,
                "--cluster",
                cluster,
                "cluster",
                "join",
                "--name",
                name,
                "--address",
                "127.0.0.1",
                "--disk",
                str(disk),
                "--data-port",
                str(ports["data"]),
                "--nbd-port",
                str(ports["nbd"]),
                "--api-port",
                str(ports["api"]),
                "--data-dir",
                str(d / name),
            ],
            log,
        )
        procs.append({"name": name, "pid": pid, "log": str(log)})
        _save(state_file, procs)
    for i in range(nodes):
        p = procs[i + 1]
        ports = node_ports(i)
        _wait(
            lambda p=p, ports=ports: (
                _listening("127.0.0.1", ports["nbd"]) or not pid_alive(p["pid"])
            ),
            30,
            f"node {p['name']} did not start (see {p['log']})",
        )
        if not pid_alive(p["pid"]):
            tail = Path(p["log"]).read_text().strip().splitlines()[-1:]
            raise PxcError(f"node {p['name']} exited: {' '.join(tail)}")
    # Listening comes before registering: wait until etcd shows every node up.
    _wait(lambda: _nodes_up(etcd_url, cluster) >= nodes, 30, "nodes did not all register")


def _nodes_up(etcd_url: str, cluster: str) -> int:
    async def count() -> int:
        etcd = Etcd(etcd_url)
        try:
            await etcd.connect()
            return len(await Service(etcd, cluster).alive())
        except EtcdUnavailable:
            return 0
        finally:
            await etcd.close()

    return asyncio.run(count())


def _save(state_file: Path, procs: list[dict[str, Any]]) -> None:
    state_file.write_text(json.dumps(procs, indent=2))


def _wait(ready: Any, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise OperationTimeout(message)
        time.sleep(0.1)


def status(directory: str) -> list[dict[str, Any]]:
    state_file = Path(directory) / STATE
    if not state_file.exists():
        return []
    procs: list[dict[str, Any]] = json.loads(state_file.read_text())
    return [{**p, "running": pid_alive(p["pid"])} for p in procs]


def down(directory: str, *, purge: bool = False) -> None:
    procs = status(directory)
    # Nodes first (they detach cleanly through etcd), etcd last.
    for p in reversed(procs):
        if p["running"]:
            os.kill(p["pid"], signal.SIGTERM)
            try:
                _wait(lambda p=p: not pid_alive(p["pid"]), 15, "")
            except OperationTimeout:
                os.kill(p["pid"], signal.SIGKILL)
    d = Path(directory)
    if purge:
        shutil.rmtree(d, ignore_errors=True)
    elif (d / STATE).exists():
        (d / STATE).unlink()
