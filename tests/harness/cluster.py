"""Node daemons as real processes (`pxcluster cluster join`) on 127.0.x.y addresses."""

from __future__ import annotations

import base64
import ipaddress
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.etcd import EtcdServer, free_port, port_open

_subnet = itertools.count(1)


def pxcluster(
    etcd_url: str,
    cluster: str,
    *args: str,
    timeout: float = 60,
    check: bool = True,
    global_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "pxcluster.cli",
        "--etcd",
        etcd_url,
        "--cluster",
        cluster,
        *global_args,
        *args,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"pxcluster {' '.join(args)} failed ({res.returncode}): {res.stderr}")
    return res


@dataclass
class NodeProc:
    name: str
    address: str
    disk: Path
    data_dir: Path
    ports: dict[str, int]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def nbd_port(self) -> int:
        return self.ports["nbd"]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    """etcd plus node processes, all torn down by `close()`."""

    def __init__(
        self,
        tmp: Path,
        etcd: EtcdServer,
        name: str = "test",
        lease_ttl: int = 2,
        *,
        global_args: tuple[str, ...] = (),
    ) -> None:
        self.tmp = tmp
        self.etcd = etcd
        self.name = name
        self.lease_ttl = lease_ttl
        # Options before the command on every CLI call and node (etcd TLS/user, ...).
        self.global_args = global_args
        self.nodes: dict[str, NodeProc] = {}
        self.subnet = next(_subnet) + (os.getpid() % 50) * 4

    def cli(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return pxcluster(
            self.etcd.url,
            self.name,
            *args,
            check=check,
            timeout=timeout,
            global_args=self.global_args,
        )

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def add_node(
        self, name: str, *, disk_size: int = 1 << 30, zone: str = "", extra: tuple[str, ...] = ()
    ) -> NodeProc:
        idx = len(self.nodes) + 1
        address = f"127.0.{self.subnet % 250 + 2}.{idx}"
        disk = self.tmp / f"{name}.img"
        if not disk.exists():
            with open(disk, "wb") as f:
                f.truncate(disk_size)
        node = NodeProc(
            name,
            address,
            disk,
            self.tmp / f"{name}-data",
            {"data": free_port(address), "nbd": free_port(address), "api": free_port(address)},
            self.tmp / f"{name}.log",
            extra=[*(["--zone", zone] if zone else []), *extra],
        )
        self.nodes[name] = node
        self.start(name)
        return node

    def start(self, name: str, *, wait: bool = True) -> None:
        """Start (or restart) a node. free_port() can only say a port was free a moment ago:
        if another process took one meanwhile, the node fails to bind; it then gets fresh
        ports and another try."""
        for attempt in range(3):
            self._spawn(name)
            if not wait:
                return
            try:
                self.wait_up(name)
                return
            except (TimeoutError, AssertionError):
                n = self.nodes[name]
                lost_port = "address already in use" in self.log_tail(name, 3)
                if attempt == 2 or n.running() or not lost_port:
                    raise
                n.ports = {k: free_port(n.address) for k in n.ports}

    def _spawn(self, name: str) -> None:
        n = self.nodes[name]
        cmd = [
            sys.executable,
            "-m",
            "pxcluster.cli",
            "--etcd",
            self.etcd.url,
            "--cluster",
            self.name,
            *self.global_args,
            "cluster",
            "join",
            "--name",
            n.name,
            "--address",
            n.address,
            "--disk",
            str(n.disk),
            "--data-port",
            str(n.ports["data"]),
            "--nbd-port",
            str(n.ports["nbd"]),
            "--api-port",
            str(n.ports["api"]),
            "--data-dir",
            str(n.data_dir),
            "--lease-ttl",
            str(self.lease_ttl),
            *n.extra,
        ]
        log = open(n.log, "ab")
        n.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def wait_up(self, name: str, timeout: float = 30) -> None:
        n = self.nodes[name]
        deadline = time.monotonic() + timeout
        # The replica port: the one port always on --address (NBD and the API stay on
        # loopback when --address is a network address, as in network namespaces).
        while not port_open(n.address, n.ports["data"]):
            if not n.running():
                raise AssertionError(f"node {name} exited; log tail: {self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"node {name}: nothing listening on {n.address}:{n.ports['data']} after "
                    f"{timeout}s; log tail: {self.log_tail(name)}"
                )
            time.sleep(0.05)
        while time.monotonic() < deadline:
            nodes = {x["name"]: x for x in self.cli_json("node", "list")}
            if nodes.get(name, {}).get("up"):
                return
            if not n.running():
                break
            time.sleep(0.1)
        raise AssertionError(f"node {name} not up; log tail: {self.log_tail(name)}")

    def all_chunks_clean(self, name: str, volume: str) -> bool:
        """The engine on `name` logged that `volume` has no dirty chunk left."""
        return (
            re.search(
                rf"volume {volume}: \d+ idle chunks marked clean, 0 dirty$",
                self.log_tail(name, 5),
                re.M,
            )
            is not None
        )

    def metric(self, name: str, sample: str) -> float:
        """One sample from node `name`'s /metrics, named as Prometheus prints it
        (`pxc_volume_ops_total{op="trim",volume="v"}`); 0 when the node does not report it."""
        n = self.nodes[name]
        with urllib.request.urlopen(
            f"http://{n.address}:{n.ports['api']}/metrics", timeout=10
        ) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(sample + " "):
                    return float(line.split()[-1])
        return 0.0

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join(self.nodes[name].log.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        n = self.nodes[name]
        if n.proc is not None and n.proc.poll() is None:
            n.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                n.proc.wait(30)

    def inspect(self, volume: str) -> dict[str, Any]:
        return self.cli_json("volume", "inspect", volume)  # type: ignore[no-any-return]

    def attach(self, volume: str, node: str) -> str:
        """Attach and wait until served; the NBD URI it prints is the node's."""
        uri = self.cli("volume", "attach", volume, "--node", node, "--wait").stdout.strip()
        n = self.nodes[node]
        if ipaddress.ip_address(n.address).is_loopback:
            assert uri == f"nbd://{n.address}:{n.nbd_port}/{volume}", uri
        else:  # NBD is not on the network: the node's unix socket
            assert uri == f"nbd+unix:///{volume}?socket={n.data_dir.resolve()}/nbd.sock", uri
        return uri

    def replica_states(self, volume: str) -> dict[str, str]:
        return {r["node"]: r["state"] for r in self.inspect(volume)["replicas"]}

    def etcd_get_prefix(self, prefix: str) -> list[Any]:
        """JSON values under a key prefix, read with etcdctl (independent of our client)."""
        res = subprocess.run(
            [
                "etcdctl",
                "--endpoints",
                self.etcd.url,
                "get",
                "--prefix",
                "--print-value-only",
                prefix,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]

    def replica_key(self) -> bytes:
        """The cluster key a replica client must prove, read with etcdctl."""
        res = subprocess.run(
            [
                "etcdctl",
                "--endpoints",
                self.etcd.url,
                "get",
                "-w",
                "json",
                f"/pxc/{self.name}/replica_key",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return base64.b64decode(json.loads(res.stdout)["kvs"][0]["value"])

    def node_state(self, name: str) -> dict[str, Any]:
        for x in self.cli_json("node", "list"):
            if x["name"] == name:
                return dict(x)
        raise KeyError(name)

    def wait_for(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def close(self) -> None:
        for n in self.nodes.values():
            if n.proc is not None and n.proc.poll() is None:
                n.proc.send_signal(signal.SIGCONT)
                n.proc.terminate()
        for n in self.nodes.values():
            if n.proc is not None:
                try:
                    n.proc.wait(10)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
                    n.proc.wait(5)
