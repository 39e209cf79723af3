"""The host layer's pure parts: filesystem choice, the kernel client's arguments, the
nbdfuse command (retry filter), the device registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from pxcluster.host import fs, mapper
from pxcluster.host.errors import ForeignFilesystem, NoBlockPath, PathBusy
from pxcluster.host.registry import DeviceRecord, Registry


def test_check_fs_never_formats_over_data() -> None:
    assert fs.check_fs("v", "", None) == "ext4"
    assert fs.check_fs("v", "", "xfs") == "xfs"
    assert fs.check_fs("v", "xfs", None) == "xfs"
    with pytest.raises(ForeignFilesystem, match="holds an xfs filesystem, not ext4"):
        fs.check_fs("v", "xfs", "ext4")
    with pytest.raises(ForeignFilesystem, match="holds partition table"):
        fs.check_fs("v", "partition table (gpt)", None)
    with pytest.raises(ForeignFilesystem, match="holds crypto_LUKS"):
        fs.check_fs("v", "crypto_LUKS", "ext4")


def test_mount_path_must_be_empty(tmp_path: Path) -> None:
    fs.check_mount_path(tmp_path / "new")
    fs.check_mount_path(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(PathBusy, match="not empty"):
        fs.check_mount_path(tmp_path)
    with pytest.raises(PathBusy, match="not a directory"):
        fs.check_mount_path(tmp_path / "f")


def test_kernel_client_arguments() -> None:
    assert mapper.kernel_command("nbd://127.0.0.1:10809/vol", "vol", "/dev/nbd3") == [
        "nbd-client", "-N", "vol", "127.0.0.1", "10809", "/dev/nbd3", "-persist",
    ]  # fmt: skip
    uri = "nbd+unix:///vol?socket=/var/lib/pxc/nbd.sock"
    assert mapper.kernel_command(uri, "vol", "/dev/nbd0")[3:6] == [
        "-u",
        "/var/lib/pxc/nbd.sock",
        "/dev/nbd0",
    ]
    with pytest.raises(NoBlockPath):
        mapper.kernel_command("nbds://h:1/vol", "vol", "/dev/nbd0")


def test_nbdfuse_runs_nbdkit_under_the_retry_filter(tmp_path: Path) -> None:
    cmd = mapper.nbdfuse_command("nbd://127.0.0.1:1/v", tmp_path / "v")
    assert cmd[:4] == ["nbdfuse", str(tmp_path / "v"), "--command", "nbdkit"]
    assert "--filter=retry" in cmd and "uri=nbd://127.0.0.1:1/v" in cmd
    assert "retry-exponential=no" in cmd


def test_choose_says_why_nothing_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mapper, "kernel_missing", lambda: "no /dev/nbd0")
    monkeypatch.setattr(mapper, "nbdfuse_missing", lambda: "no /dev/fuse")
    with pytest.raises(NoBlockPath, match="kernel NBD client: no /dev/nbd0; nbdfuse: no /dev"):
        mapper.choose()
    monkeypatch.setattr(mapper, "nbdfuse_missing", lambda: None)
    assert mapper.choose().method == "nbdfuse"
    monkeypatch.setattr(mapper, "kernel_missing", lambda: None)
    assert mapper.choose("nbd://h/v").method == "kernel"
    assert mapper.choose("nbds://h/v").method == "nbdfuse"  # TLS: libnbd does it


def test_registry_round_trip(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "s")
    assert reg.load() == {}
    rec = DeviceRecord("v", "n1", "nbdfuse", "/dev/loop3", "nbd://x/v", "/f/v", 42, "/mnt")
    reg.put(rec)
    assert Registry(tmp_path / "s").get("v") == rec
    reg.remove("v")
    assert reg.load() == {}
