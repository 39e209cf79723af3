"""A real etcd on a free loopback port, in a temporary directory."""

from __future__ import annotations

import collections
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from membership.etcd import KV, Etcd


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def wait_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


class EtcdServer:
    """With `tls` (cert, key, client CA), clients speak https and must present a certificate
    signed by that CA (etcd --client-cert-auth)."""

    def __init__(
        self,
        data_dir: Path,
        host: str = "127.0.0.1",
        *,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.host = host
        self.port = free_port(host)
        self.peer_port = free_port(host)
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        cert, key, ca = self.tls
        return [
            "--cert-file",
            str(cert),
            "--key-file",
            str(key),
            "--trusted-ca-file",
            str(ca),
            "--client-cert-auth",
        ]

    def etcdctl(self, *args: str, extra: tuple[str, ...] = ()) -> str:
        """Run etcdctl against this server (extra: --cacert/--user/... flags)."""
        res = subprocess.run(
            ["etcdctl", "--endpoints", self.url, *extra, *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if res.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {res.stderr.strip()}")
        return res.stdout

    def start(self) -> None:
        etcd = shutil.which("etcd")
        if etcd is None:
            raise RuntimeError("etcd not installed (run scripts/install.sh)")
        log = open(self.data_dir.parent / f"etcd-{self.port}.log", "ab")
        peer = f"http://{self.host}:{self.peer_port}"
        self.proc = subprocess.Popen(
            [
                etcd,
                "--name",
                "t",
                "--data-dir",
                str(self.data_dir),
                "--listen-client-urls",
                self.url,
                "--advertise-client-urls",
                self.url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"t={peer}",
                *self._tls_args(),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_port(self.host, self.port, 20)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class CountingEtcd(Etcd):
    """`Etcd` that counts its range requests: `get_prefix` by the prefix under `root`, `get`
    all together (what a controller pass or an agent pass reads)."""

    def __init__(self, url: str, root: str, *, timeout: float = 3.0) -> None:
        super().__init__(url, timeout=timeout)
        self.root = root
        self.ranges: collections.Counter[str] = collections.Counter()

    async def get(self, key: bytes) -> KV | None:
        self.ranges["get"] += 1
        return await super().get(key)

    async def get_prefix(self, prefix: bytes) -> list[KV]:
        self.ranges[prefix.decode().removeprefix(self.root)] += 1
        return await super().get_prefix(prefix)
