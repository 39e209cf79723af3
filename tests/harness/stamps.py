"""Run the stamped-block workload against a volume and check its history."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

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
    def __init__(self, urifile: Path, nblocks: int, seconds: float, seed: int) -> None:
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, CLIENT, "write", str(urifile), str(nblocks), str(seconds), str(seed)],
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
