"""A real replica server process (``python -m replica.server``) for tests and benchmarks."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack

from replica import auth
from replica.auth import write_key_file

REPO = Path(__file__).resolve().parents[2]
# The cluster key of test replica servers; clients in tests pass it as key=TEST_KEY.
TEST_KEY = bytes(range(32))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


async def raw_connect(
    host: str, port: int, key: bytes = TEST_KEY
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A bare socket to a replica server, past the key exchange (replica/auth.py): for tests
    that write frames by hand, as an attacker holding the key would."""
    r, w = await asyncio.open_connection(host, port)

    async def frame() -> dict[str, Any]:
        total, hlen = struct.unpack("!II", await r.readexactly(8))
        return dict(msgpack.unpackb((await r.readexactly(total - 4))[:hlen]))

    challenge = await frame()
    nonce = auth.new_nonce()
    mac = auth.client_mac(key, challenge["nonce"], nonce)
    h = msgpack.packb({"id": 0, "op": "auth", "nonce": nonce, "mac": mac})
    w.write(struct.pack("!II", 4 + len(h), len(h)) + h)
    reply = await frame()
    assert reply.get("ok") is True, reply
    return r, w


class ReplicaProc:
    """Sparse-file disks in ``workdir``; start/kill/restart keep the disks (and the port)."""

    def __init__(
        self,
        workdir: Path,
        *,
        disks: int = 1,
        disk_size: int = 512 << 20,
        host: str = "127.0.0.1",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.host = host
        self.extra_args = extra_args  # e.g. --tls-cert/--tls-key/--tls-ca
        self.port = free_port(host)
        self.disks = [workdir / f"disk{i}.img" for i in range(disks)]
        for d in self.disks:
            if not d.exists():
                with open(d, "wb") as f:
                    f.truncate(disk_size)
        self.key_file = workdir / "cluster.key"
        write_key_file(str(self.key_file), TEST_KEY)
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 15.0) -> None:
        cmd = [
            sys.executable,
            "-m",
            "replica.server",
            "--cluster-id",
            "test",
            "--node-id",
            "n1",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--format",
            "--key-file",
            str(self.key_file),
            *self.extra_args,
        ]
        for d in self.disks:
            cmd += ["--disk", str(d)]
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("READY"):
            self.proc.kill()
            raise RuntimeError(f"replica server did not start: {line!r} rc={self.proc.wait()}")
        assert int(line.split()[1]) == self.port

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int:
        """Graceful SIGTERM; returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        return self.proc.wait(15)

    def restart(self) -> None:
        self.kill()
        # The kernel may hold the port briefly after a kill; the server binds with SO_REUSEADDR.
        self.start()
