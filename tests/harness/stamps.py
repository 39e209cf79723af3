"""Run the stamped-block workload against a volume and check its history."""

from __future__ import annotations

import signal
import subprocess
import tempfile
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


# Acknowledged writes every checker run needs, in all and, when the test marked a fault, on
# each side of it: a history with fewer proves nothing (an empty one passes every check), and
# none after the fault means the volume never took writes again.
MIN_ACKED = 20


@dataclass
class History:
    acked: list[tuple[int, int, int]] = field(default_factory=list)  # block, seq, token
    failed: list[tuple[int, int, int]] = field(default_factory=list)
    # time.monotonic() of each acknowledgement, in the order of `acked` (empty: not known).
    ack_times: list[float] = field(default_factory=list)
    # time.monotonic() when the test's faults were in effect (Writer.fault, Workload.fault).
    faults: list[float] = field(default_factory=list)

    def extend(self, other: History, seq_shift: int = 0) -> None:
        """Add another history (another writer's, a later round's with its seqs shifted)."""
        self.acked += [(b, s + seq_shift, t) for b, s, t in other.acked]
        self.failed += [(b, s + seq_shift, t) for b, s, t in other.failed]
        self.ack_times += other.ack_times
        self.faults = sorted(set(self.faults + other.faults))  # writers share marks

    def acked_between(self, start: float, end: float = float("inf")) -> int:
        return sum(1 for t in self.ack_times if start < t < end)

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


def require_acked(history: History, minimum: int = MIN_ACKED) -> None:
    """AssertionError unless `minimum` writes were acknowledged, and, with faults marked, as
    many before the first fault and after the last one."""
    total = len(history.acked)
    assert total >= minimum, f"only {total} writes acknowledged (need {minimum}): nothing to check"
    if not history.faults:
        return
    assert len(history.ack_times) == total, "the history has no acknowledgement times"
    before = history.acked_between(float("-inf"), history.faults[0])
    after = history.acked_between(history.faults[-1])
    assert before >= minimum, (
        f"only {before} writes acknowledged before the fault (need {minimum}; {total} in all)"
    )
    assert after >= minimum, (
        f"only {after} writes acknowledged after the fault (need {minimum}; {total} in all): "
        "the volume did not take writes again"
    )


class Writer:
    """One libnbd client writing stamps; with `share` > 1, only the blocks b with
    b % share == index, so several writers never write the same block (per-block order stays
    one client's order, which the checker relies on). Its replies are read as they come, so
    a test can wait for writes acknowledged after a fault (`wait_acked`)."""

    def __init__(
        self, urifile: Path, nblocks: int, seconds: float, seed: int, share: int = 1, index: int = 0
    ) -> None:
        args = [str(urifile), str(nblocks), str(seconds), str(seed), str(share), str(index)]
        self.history = History()
        self.lock = threading.Lock()
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, CLIENT, "write", *args],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            rec = (int(parts[1]), int(parts[2]), int(parts[3]))
            with self.lock:
                if parts[0] == "ack":
                    self.history.acked.append(rec)
                    self.history.ack_times.append(float(parts[4]))
                else:
                    self.history.failed.append(rec)

    def fault(self, at: float | None = None) -> float:
        """Mark that a fault is in effect from now (or `at`, a time.monotonic()) on: call it
        once the fault is in place, so no write the healthy path acknowledged counts as after
        it."""
        now = time.monotonic() if at is None else at
        with self.lock:
            self.history.faults.append(now)
        return now

    def _since(self) -> str:
        return "after the fault" if self.history.faults else "in all"

    def acked_after_fault(self) -> int:
        with self.lock:
            since = self.history.faults[-1] if self.history.faults else float("-inf")
            return self.history.acked_between(since)

    def wait_acked(self, n: int = MIN_ACKED, timeout: float = 60) -> None:
        """Until `n` writes were acknowledged after the last fault (in all, before any fault);
        AssertionError after `timeout` seconds (the volume never took writes again) or if the
        writer ended first."""
        deadline = time.monotonic() + timeout
        while self.acked_after_fault() < n:
            if self.proc.poll() is not None:
                self.reader.join(10)
                if self.acked_after_fault() >= n:
                    return
                raise AssertionError(
                    f"the writer ended with {self.acked_after_fault()} writes acknowledged "
                    f"{self._since()} (need {n})"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.acked_after_fault()} writes acknowledged {self._since()} in "
                    f"{timeout:.0f} s (need {n}): the volume does not take writes"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """End the run early; the write in flight is still reported."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def finish(self, timeout: float = 60) -> History:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise
        self.reader.join(30)
        self.stderr.seek(0)
        err = self.stderr.read().decode(errors="replace").strip()
        self.stderr.close()
        assert self.proc.returncode == 0, f"stamp writer exited {self.proc.returncode}: {err}"
        with self.lock:
            h = self.history
            return History(list(h.acked), list(h.failed), list(h.ack_times), list(h.faults))


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


def check(history: History, uri: str, nblocks: int, *, min_acked: int = MIN_ACKED) -> Check:
    """Every acknowledged write present (the block holds its last acked write or a later issued
    one), nothing never issued, no garbage, and two reads agree. Raises AssertionError first
    unless the history has `min_acked` acknowledged writes (before and after its faults)."""
    require_acked(history, min_acked)
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
