"""Run the stamped-block workload against a volume and check its history."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

SYSTEM_PYTHON = "/usr/bin/python3"
CLIENT = str(Path(__file__).with_name("nbd_stamp_client.py"))


def has_libnbd() -> bool:
    try:
        subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


@dataclass
class History:
    acked: list[tuple[int, int, int]] = field(default_factory=list)  # block, seq, token
    failed: list[tuple[int, int, int]] = field(default_factory=list)

    def issued_tokens(self) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {}
        for b, _, t in self.acked + self.failed:
            out.setdefault(b, set()).add(t)
        return out

    def last_acked(self) -> dict[int, tuple[int, int]]:
        """Per block, (seq, token) of the last acknowledged write."""
        out: dict[int, tuple[int, int]] = {}
        for b, s, t in self.acked:
            if b not in out or s > out[b][0]:
                out[b] = (s, t)
        return out


class Writer:
    """One libnbd client writing stamps; with `share` > 1, only the blocks b with
    b % share == index, so several writers never write the same block (per-block order stays
    one client's order, which the checker relies on)."""

    def __init__(
        self, urifile: Path, nblocks: int, seconds: float, seed: int, share: int = 1, index: int = 0
    ) -> None:
        args = [str(urifile), str(nblocks), str(seconds), str(seed), str(share), str(index)]
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, CLIENT, "write", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish(self, timeout: float = 60) -> History:
        out, _err = self.proc.communicate(timeout=timeout)
        h = History()
        for line in out.splitlines():
            parts = line.split()
            rec = (int(parts[1]), int(parts[2]), int(parts[3]))
            (h.acked if parts[0] == "ack" else h.failed).append(rec)
        return h


@dataclass
class Check:
    lost: list[int]
    phantom: list[int]
    garbage: list[int]
    unstable: list[int]

    @property
    def ok(self) -> bool:
        return not (self.lost or self.phantom or self.garbage or self.unstable)


def read_blocks(uri: str, nblocks: int) -> dict[int, tuple[str, int, int]]:
    res = subprocess.run(
        [SYSTEM_PYTHON, CLIENT, "read", uri, str(nblocks)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    out: dict[int, tuple[str, int, int]] = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        b = int(parts[1])
        out[b] = (parts[0], int(parts[2]), int(parts[3])) if parts[0] == "blk" else (parts[0], 0, 0)
    return out


def check(history: History, uri: str, nblocks: int) -> Check:
    """Every acknowledged write present (the block holds its last acked write or a later issued
    one), nothing never issued, no garbage, and two reads agree."""
    first = read_blocks(uri, nblocks)
    second = read_blocks(uri, nblocks)
    issued = history.issued_tokens()
    last = history.last_acked()
    seq_of = {(b, t): s for b, s, t in history.acked + history.failed}
    lost, phantom, garbage, unstable = [], [], [], []
    for b in range(nblocks):
        kind, _seq, token = first[b]
        if first[b] != second[b]:
            unstable.append(b)
        if kind == "bad":
            garbage.append(b)
            continue
        if kind == "zero":
            if b in last:
                lost.append(b)
            continue
        if token not in issued.get(b, set()):
            phantom.append(b)
            continue
        if b in last and seq_of[(b, token)] < last[b][0]:
            lost.append(b)
    return Check(lost, phantom, garbage, unstable)


class Inspectable(Protocol):
    def inspect(self, volume: str) -> dict[str, Any]: ...


class UriFollower:
    """Keeps URIFILE pointing at the volume's current NBD URI, as an operator's tooling would,
    so a Writer follows the volume when it moves."""

    def __init__(self, c: Inspectable, name: str, path: Path, poll: float = 0.1) -> None:
        self.c, self.name, self.path, self.poll = c, name, path, poll
        self.stop = threading.Event()
        self.moves: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        current = self.path.read_text()
        while not self.stop.wait(self.poll):
            try:
                uri = self.c.inspect(self.name)["nbd_uri"]
            except Exception:
                continue  # etcd may be down on purpose
            if uri and uri != current:
                current = uri
                self.path.write_text(uri)
                self.moves.append((time.monotonic(), uri))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
