"""The CLI fed bad values, as a script or an attacker would: each is refused with one line on
stderr naming it, a non-zero status, no traceback, and nothing changed in the cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.etcd import EtcdServer

DOWN = "http://127.0.0.1:1"  # nothing listens: a value that got past parsing fails differently
HUGE = "9" * 5000


def cli(*args: str, etcd: str = DOWN) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pxcluster.cli", "--etcd", etcd, *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def refused(res: subprocess.CompletedProcess[str], needle: str) -> str | None:
    """None if `res` is a clean refusal mentioning `needle`, else what is wrong with it."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    if res.returncode == 0:
        return "exit status 0"
    if "Traceback" in res.stderr:
        return f"a traceback: {res.stderr[-500:]}"
    if len(lines) != 1:
        return f"{len(lines)} lines on stderr: {res.stderr[:500]}"
    if not lines[0].startswith("error: ") or needle not in lines[0]:
        return f"no {needle!r} in: {lines[0][:300]}"
    if len(lines[0]) > 400:
        return f"a {len(lines[0])}-character line"
    return None


def join(tmp: Path, *extra: str) -> tuple[str, ...]:
    return (
        "cluster",
        "join",
        "--name",
        "n1",
        "--address",
        "127.0.0.1",
        "--disk",
        str(tmp / "disk.img"),
        "--data-dir",
        str(tmp / "data"),
        *extra,
    )


def bad_values(tmp: Path) -> list[tuple[tuple[str, ...], str]]:
    empty = tmp / "empty"
    empty.write_bytes(b"")
    blank = tmp / "blank"
    blank.write_text("  \n\t\n")
    token = tmp / "token"
    token.write_text("admin-token\n")
    return [
        (("volume", "create", "x", "--size", HUGE), "--size"),
        (("volume", "create", "x", "--size", "12Q"), "invalid size"),
        (("volume", "create", "x", "--size", "2P"), "--size"),
        (("volume", "create", "x", "--size", "16M", "--repl", "4"), "--repl"),
        (("volume", "create", "x", "--size", "16M", "--repl", HUGE), "--repl"),
        (("volume", "create", "Bad_Name", "--size", "16M"), "DNS label"),
        (("volume", "create", "a" * 64, "--size", "16M"), "DNS label"),
        (("volume", "create", "a/b", "--size", "16M"), "DNS label"),
        (
            ("volume", "create", "x", "--size", "16M", "--encrypted", "--key-file", str(empty)),
            "empty",
        ),
        (
            ("volume", "create", "x", "--size", "16M", "--encrypted", "--key-file", "/dev/null"),
            "empty",
        ),
        (
            ("volume", "create", "x", "--size", "16M", "--encrypted", "--key-file", "/dev/zero"),
            "bytes",
        ),
        (("volume", "update", "x", "--iops-limit", "1e75"), "--iops-limit"),
        (("volume", "update", "x", "--iops-limit", "1" + "0" * 75), "--iops-limit"),
        (("volume", "update", "x", "--iops-limit", "-1"), "limits"),
        (("volume", "update", "x", "--bw-limit", "99999999P"), "--bw-limit"),
        (("volume", "update", "x", "--snapshot-schedule", f"every {HUGE}s keep 1"), "schedule"),
        (("volume", "update", "x", "--backup-target", "s3://[::1"), "--backup-target"),
        (("volume", "attach", "x", "--node", "n1", "--timeout", "nan"), "--timeout"),
        (("volume", "attach", "x", "--node", "n1", "--timeout", "inf"), "--timeout"),
        (("volume", "attach", "x", "--node", "../n1"), "--node"),
        (("volume", "snapshot", "create", "x", "--name", "../x"), "invalid snapshot name"),
        (("volume", "snapshot", "create", "x", "--name", "s" * 64), "invalid snapshot name"),
        (("volume", "inspect", "x" * 5000), "DNS label"),
        (("node", "cordon", "N/1"), "DNS label"),
        (("node", "drain", "n1", "--timeout", "-1"), "--timeout"),
        (("backup", "list", "--target", "s3://[::1"), "--target"),
        (("dev", "up", "--nodes", "0"), "--nodes"),
        (("--cluster", "a/b", "node", "list"), "--cluster"),
        (("--cluster", "Bad_Name", "node", "list"), "--cluster"),
        (("--cluster", "c" * 64, "node", "list"), "--cluster"),
        (("--etcd", "http://[::1", "node", "list"), "--etcd"),
        (("--etcd", "http://127.0.0.1:99999", "node", "list"), "--etcd"),
        (("--etcd", "ftp://127.0.0.1:2379", "node", "list"), "--etcd"),
        (("--etcd-user", "u", "--etcd-password-file", "/dev/null", "node", "list"), "empty"),
        (join(tmp, "--rebuild-bw", "abc"), "--rebuild-bw"),
        (join(tmp, "--rebuild-bw", HUGE), "--rebuild-bw"),
        (join(tmp, "--nbd-port", "70000"), "--nbd-port"),
        (join(tmp, "--data-port", "0"), "--data-port"),
        (join(tmp, "--api-port", "-1"), "--api-port"),
        (join(tmp, "--lease-ttl", "0"), "--lease-ttl"),
        (join(tmp, "--lease-ttl", "3601"), "--lease-ttl"),
        (join(tmp, "--replace-after", "nan"), "--replace-after"),
        (join(tmp, "--clean-after", "1e400"), "--clean-after"),
        (join(tmp, "--log-level", "loud"), "--log-level"),
        (join(tmp, "--zone", "Zone A"), "--zone"),
        (("cluster", "join", "--name", "n_1", "--address", "127.0.0.1", "--disk", "d"), "--name"),
        (("cluster", "join", "--name", "n1", "--address", "localhost", "--disk", "d"), "--address"),
        (join(tmp, "--api-address", "example.com"), "--api-address"),
        (join(tmp, "--api-token-file", str(empty)), "is empty"),
        (join(tmp, "--api-token-file", str(blank)), "is empty"),
        (join(tmp, "--api-read-token-file", str(empty)), "is empty"),
        (join(tmp, "--api-token-file", "/dev/zero"), "bytes"),
        (join(tmp, "--api-token-file", str(tmp / "absent")), "cannot read"),
        (join(tmp, "--api-token-file", str(token), "--api-read-token-file", str(token)), "same"),
        (join(tmp, "--api-address", "0.0.0.0"), "--api-token-file"),
        (join(tmp, "--api-address", "::"), "--api-token-file"),
        (join(tmp, "--api-address", "0.0.0.0", "--api-read-token-file", str(token)), "admin"),
        (join(tmp, "--nbd-tls-dir", str(tmp / "absent")), "--nbd-tls-dir"),
    ]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    with open(tmp_path / "disk.img", "wb") as f:
        f.truncate(64 << 20)
    (tmp_path / "data").mkdir()
    return tmp_path


def test_bad_values_are_refused_in_one_line(workdir: Path) -> None:
    problems = []
    for args, needle in bad_values(workdir):
        problem = refused(cli(*args), needle)
        if problem is not None:
            problems.append(f"{' '.join(a[:40] for a in args)}: {problem}")
    assert not problems, "\n".join(problems)


def test_nothing_changes_and_nothing_joins(etcd: EtcdServer, workdir: Path) -> None:
    """Against a live etcd: the refused values leave no volume, no node, no cluster record."""
    for args, needle in bad_values(workdir):
        if args[0].startswith("--etcd") or args[0] == "dev":
            continue  # another etcd, or a dev cluster: not this one's state
        res = cli(*args, etcd=etcd.url)
        assert refused(res, needle) is None, (args[:6], res.stderr[:300])
    res = cli("--cluster", "default", "volume", "list", "--json", etcd=etcd.url)
    assert res.returncode == 0 and json.loads(res.stdout) == [], res.stderr
    res = cli("--cluster", "default", "node", "list", "--json", etcd=etcd.url)
    assert res.returncode == 0 and json.loads(res.stdout) == [], res.stderr


def test_help_and_good_values_still_work() -> None:
    for args in (("--help",), ("cluster", "join", "--help"), ("volume", "update", "--help")):
        res = cli(*args)
        assert res.returncode == 0 and res.stdout and not res.stderr, (args, res.stderr)
    # Valid values reach the cluster (here: no etcd, the one-line error says so).
    res = cli("--cluster", "contract12345", "volume", "create", "ok-1", "--size", "512M")
    assert refused(res, "etcd") is None, res.stderr
