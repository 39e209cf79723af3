"""etcd and every node in its own network namespace, on a bridge this harness owns.

Layout for one run (PID = the test process's pid, so leftovers of a dead run are recognisable):

    root namespace   bridge  pxb<PID>      10.213.X.1/24   (the test process: CLI, NBD clients)
    pxch<PID>-etcd   eth0    10.213.X.2    etcd on its standard ports
    pxch<PID>-<node> eth0    10.213.X.10+  one node daemon on its standard ports

Every name made here carries the PID; `sweep()` removes namespaces, links and processes whose
PID is no longer running, and `close()` removes this run's. Faults are iptables rules inside a
node's namespace: they vanish with the namespace. Traffic only ever goes to addresses inside
10.213.X.0/24, which this run assigned.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.harness.cluster import Cluster, NodeProc
from tests.harness.etcd import EtcdServer, wait_port

PREFIX = "pxch"
_NS_RE = re.compile(rf"^{PREFIX}(\d+)-")
_LINK_RE = re.compile(r"^px[bv](\d+)")
ETCD_PORT, ETCD_PEER_PORT = 2379, 2380
DATA_PORT, NBD_PORT, API_PORT = 9002, 10809, 9001


def unavailable() -> str | None:
    """Why the namespace suite cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables", "etcd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install.sh installs it)"
    return None


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=check)


def ns_exec(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("ip", "netns", "exec", ns, *cmd, check=check)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    out = run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _links() -> list[str]:
    out = run("ip", "-o", "link", "show", check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            names.append(parts[1].strip().split("@")[0])
    return names


def _kill_ns_processes(ns: str) -> None:
    pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
    for p in pids:
        try:
            os.kill(int(p), signal.SIGCONT)
            os.kill(int(p), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def remove(pid: int) -> None:
    """Remove every namespace, link and process that the run of `pid` made."""
    for ns in _namespaces():
        m = _NS_RE.match(ns)
        if m and int(m.group(1)) == pid:
            _kill_ns_processes(ns)
            run("ip", "netns", "del", ns, check=False)
    for link in _links():
        m = _LINK_RE.match(link)
        if m and int(m.group(1)) == pid:
            run("ip", "link", "del", link, check=False)


def sweep() -> None:
    """Leftovers of runs whose process is gone (a killed pytest never ran its finalizers)."""
    pids = set()
    for ns in _namespaces():
        m = _NS_RE.match(ns)
        if m:
            pids.add(int(m.group(1)))
    for link in _links():
        m = _LINK_RE.match(link)
        if m:
            pids.add(int(m.group(1)))
    for pid in pids:
        if not _pid_alive(pid):
            remove(pid)


def _free_subnet() -> int:
    out: str = run("ip", "-o", "addr").stdout
    used = set(re.findall(r"inet 10\.213\.(\d+)\.", out))
    candidates: list[int] = [os.getpid() % 200 + 20, *range(20, 250)]
    for x in candidates:
        if str(x) not in used:
            return x
    raise RuntimeError("no free 10.213.X.0/24 subnet")


class Network:
    """The bridge and the namespaces of one run."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.subnet = _free_subnet()
        self.bridge = f"pxb{self.pid}"
        self.gateway = self.ip(1)
        self.namespaces: dict[str, str] = {}  # role -> namespace
        self.addresses: dict[str, str] = {}  # role -> address
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")

    def ip(self, host: int) -> str:
        return f"10.213.{self.subnet}.{host}"

    def add(self, role: str, host: int) -> tuple[str, str]:
        """A namespace for `role` with one address on the bridge; returns (namespace, address)."""
        ns = f"{PREFIX}{self.pid}-{role}"
        veth = f"pxv{self.pid}n{len(self.namespaces)}"
        address = self.ip(host)
        run("ip", "netns", "add", ns)
        self.namespaces[role], self.addresses[role] = ns, address
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
        run("ip", "link", "set", f"{veth}p", "netns", ns)
        ns_exec(ns, "ip", "link", "set", f"{veth}p", "name", "eth0")
        ns_exec(ns, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
        ns_exec(ns, "ip", "link", "set", "eth0", "up")
        ns_exec(ns, "ip", "link", "set", "lo", "up")
        run("ip", "link", "set", veth, "master", self.bridge)
        run("ip", "link", "set", veth, "up")
        return ns, address

    def drop(self, role: str, peer: str) -> None:
        """Drop traffic both ways between `role` and the address `peer`, inside role's ns."""
        ns = self.namespaces[role]
        ns_exec(ns, "iptables", "-A", "INPUT", "-s", peer, "-j", "DROP")
        ns_exec(ns, "iptables", "-A", "OUTPUT", "-d", peer, "-j", "DROP")

    def heal(self, role: str) -> None:
        ns_exec(self.namespaces[role], "iptables", "-F")

    def close(self) -> None:
        remove(self.pid)


class NetnsEtcd(EtcdServer):
    """etcd in its own namespace, on its standard ports."""

    def __init__(self, data_dir: Path, net: Network) -> None:
        self.data_dir = data_dir
        self.net = net
        self.ns, self.host = net.add("etcd", 2)
        self.port, self.peer_port = ETCD_PORT, ETCD_PEER_PORT
        self.tls = None  # plain http inside the test's namespaces
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        etcd = shutil.which("etcd")
        assert etcd is not None
        log = open(self.data_dir.parent / "etcd.log", "ab")
        peer = f"http://{self.host}:{self.peer_port}"
        cmd = [
            "ip",
            "netns",
            "exec",
            self.ns,
            etcd,
            "--name",
            "t",
            "--data-dir",
            str(self.data_dir),
        ]
        cmd += ["--listen-client-urls", self.url, "--advertise-client-urls", self.url]
        cmd += ["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer]
        cmd += ["--initial-cluster", f"t={peer}"]
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_port(self.host, self.port, 20)


class NetnsCluster(Cluster):
    """A Cluster whose nodes each live in their own namespace (fixed ports, own address)."""

    def __init__(self, tmp: Path, etcd: NetnsEtcd, net: Network, lease_ttl: int = 2) -> None:
        super().__init__(tmp, etcd, lease_ttl=lease_ttl)
        self.net = net

    def add_node(
        self, name: str, *, disk_size: int = 1 << 30, zone: str = "", extra: tuple[str, ...] = ()
    ) -> NodeProc:
        _ns, address = self.net.add(name, 10 + len(self.nodes))
        disk = self.tmp / f"{name}.img"
        if not disk.exists():
            with open(disk, "wb") as f:
                f.truncate(disk_size)
        node = NodeProc(
            name,
            address,
            disk,
            self.tmp / f"{name}-data",
            {"data": DATA_PORT, "nbd": NBD_PORT, "api": API_PORT},
            self.tmp / f"{name}.log",
            extra=[*(["--zone", zone] if zone else []), *extra],
        )
        self.nodes[name] = node
        self.start(name)
        return node

    def start(self, name: str, *, wait: bool = True) -> None:
        n = self.nodes[name]
        cmd = ["ip", "netns", "exec", self.net.namespaces[name], sys.executable]
        cmd += ["-m", "pxcluster.cli", "--etcd", self.etcd.url, "--cluster", self.name]
        cmd += ["cluster", "join", "--name", n.name, "--address", n.address, "--disk", str(n.disk)]
        cmd += ["--data-port", str(n.ports["data"]), "--nbd-port", str(n.ports["nbd"])]
        cmd += ["--api-port", str(n.ports["api"]), "--data-dir", str(n.data_dir)]
        cmd += ["--lease-ttl", str(self.lease_ttl), *n.extra]
        log = open(n.log, "ab")
        # `ip netns exec` execs the command: the pid is the node's, signals reach it.
        n.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd())
        log.close()
        if wait:
            self.wait_up(name)

    def wait_gone(self, name: str, timeout: float = 30) -> None:
        """Until etcd no longer counts `name` up (its lease expired)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.node_state(name)["up"]:
                return
            time.sleep(0.1)
        raise AssertionError(f"node {name} still up after {timeout}s")
