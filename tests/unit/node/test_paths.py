"""Every path a node takes or builds is checked (pxcluster/node/paths.py), and TLS options."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from membership.etcd import EtcdConfigError, EtcdSettings
from pxcluster.errors import InvalidArgument
from pxcluster.node.paths import check_data_dir, check_disks, check_file_name, inside
from replica.tls import TlsConfigError, TlsFiles


def test_data_dir_made_absolute_and_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    got = check_data_dir("state/n1")
    assert got == str(tmp_path / "state" / "n1") and Path(got).is_dir()
    assert check_data_dir("") == ""
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "state")
    assert check_data_dir(str(link)) == str(tmp_path / "state")


def test_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(InvalidArgument, match="not a directory"):
        check_data_dir(str(f))
    with pytest.raises(InvalidArgument, match="cannot create"):
        check_data_dir(str(f / "below"))


def test_data_dir_symlink_loop_and_dangling_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(InvalidArgument, match="symlink"):
        check_data_dir(str(a))
    dangling = tmp_path / "d"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(InvalidArgument, match="dangling"):
        check_data_dir(str(dangling))
    with pytest.raises(InvalidArgument, match="NUL"):
        check_data_dir("x\0y")


def test_inside_keeps_names_in_the_data_dir(tmp_path: Path) -> None:
    assert inside(str(tmp_path), "nbd.sock") == str(tmp_path / "nbd.sock")
    for bad in ("", ".", "..", "../x", "a/b", "/etc/passwd", "x\0"):
        with pytest.raises(InvalidArgument):
            inside(str(tmp_path), bad)
    # A name that is a symlink pointing out of the data dir is refused too.
    (tmp_path / "escape").symlink_to("/tmp")
    with pytest.raises(InvalidArgument, match="outside"):
        inside(str(tmp_path), "escape")


def test_file_names() -> None:
    for ok in ("db", "a.b-c_d", "0" * 63):
        assert check_file_name(ok) == ok
    for bad in ("", "..", "a..b", ".hidden", "-x", "A", "a/b", "a b", "0" * 64, "é"):
        with pytest.raises(InvalidArgument):
            check_file_name(bad, "volume name")


def test_disks_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert check_disks(["d.img"]) == [str(disk)]
    with pytest.raises(InvalidArgument, match="is a directory"):
        check_disks([str(tmp_path)])
    with pytest.raises(InvalidArgument, match="does not exist"):
        check_disks([str(tmp_path / "missing.img")])
    a, b = tmp_path / "la", tmp_path / "lb"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(InvalidArgument, match="symlink"):
        check_disks([str(a)])
    alias = tmp_path / "alias.img"
    alias.symlink_to(disk)
    with pytest.raises(InvalidArgument, match="same as"):
        check_disks([str(disk), str(alias)])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidArgument, match="neither"):
        check_disks([str(fifo)])


def test_data_tls_options_all_or_none(tmp_path: Path) -> None:
    f = tmp_path / "f.pem"
    f.write_text("x")
    assert TlsFiles.from_options("", "", "") is None
    with pytest.raises(TlsConfigError, match="all three"):
        TlsFiles.from_options(str(f), str(f), "")
    with pytest.raises(TlsConfigError, match="no such file"):
        TlsFiles.from_options(str(f), str(f), str(tmp_path / "missing"))


def test_etcd_settings_checked(tmp_path: Path) -> None:
    f = tmp_path / "ca.pem"
    f.write_text("x")
    EtcdSettings().check("http://127.0.0.1:2379")
    with pytest.raises(EtcdConfigError, match="https://"):
        EtcdSettings(cacert=str(f)).check("http://127.0.0.1:2379")
    with pytest.raises(EtcdConfigError, match="--etcd-key"):
        EtcdSettings(cert=str(f)).check("https://127.0.0.1:2379")
    with pytest.raises(EtcdConfigError, match="password"):
        EtcdSettings(user="root").check("http://127.0.0.1:2379")
    with pytest.raises(EtcdConfigError, match="no such file"):
        EtcdSettings(cacert=str(tmp_path / "nope")).check("https://127.0.0.1:2379")


_CLI = (sys.executable, "-m", "pxcluster.cli", "--etcd", "http://127.0.0.1:1")


def _join(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_CLI, "cluster", "join", "--name", "n1", "--address", "127.0.0.1", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.timeout(60)
def test_cli_join_refuses_bad_paths_with_one_line(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    cases = [
        (("--disk", str(disk), "--data-dir", str(not_a_dir)), "not a directory"),
        (("--disk", str(tmp_path)), "is a directory"),
        (("--disk", str(disk), "--data-tls-cert", str(disk)), "all three"),
    ]
    for args, message in cases:
        res = _join(*args)
        assert res.returncode != 0
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: cannot join:"), res.stderr
        assert message in lines[0]
