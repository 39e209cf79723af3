"""Checks on every path a node takes from its operator or builds from a name.

- `--data-dir`: made absolute; refused if it exists and is not a directory (a file, a
  dangling or looping symlink) or cannot be created.
- Anything the node writes under it goes through `inside()`: a single plain name, never a
  path separator, `.`/`..` or a NUL, and the result (symlinks resolved) must still be inside
  the data dir.
- `--disk`: made absolute; must exist as a regular file or a block device (a directory, a
  symlink loop, a missing path are refused), and no disk may be given twice (also not
  through two names for one file).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from pxcluster.errors import InvalidArgument

# Names the node turns into files (volume names, sockets): a DNS-like label, dots allowed but
# never two in a row, so no `..` can ever appear.
_FILE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def check_file_name(name: str, what: str = "name") -> str:
    if not _FILE_NAME.match(name) or ".." in name:
        raise InvalidArgument(
            f"invalid {what} {name!r}: use a-z, 0-9, '.', '_', '-' (at most 63, no '..')"
        )
    return name


def _resolve(path: Path, what: str) -> Path:
    try:
        return path.resolve(strict=False)
    except RuntimeError:  # Python 3.11's report of a loop
        raise InvalidArgument(f"{what} {path} is a symlink loop") from None
    except OSError as e:
        raise InvalidArgument(f"{what} {path}: cannot be resolved ({e.strerror})") from None


def check_data_dir(data_dir: str) -> str:
    """The absolute, resolved --data-dir ('' stays '': no data dir); created if missing."""
    if not data_dir:
        return ""
    if "\0" in data_dir:
        raise InvalidArgument("--data-dir contains a NUL byte")
    given = Path(os.path.abspath(data_dir))
    if given.is_symlink() and not given.exists():
        raise InvalidArgument(f"--data-dir {data_dir} is a dangling or looping symlink")
    path = _resolve(given, "--data-dir")
    if path.exists() and not path.is_dir():
        raise InvalidArgument(f"--data-dir {data_dir} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidArgument(f"--data-dir {data_dir}: cannot create it ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InvalidArgument(f"--data-dir {data_dir} is not writable")
    return str(path)


def inside(data_dir: str, name: str) -> str:
    """`data_dir/name` for a single plain name, refused if it would land outside data_dir."""
    if not name or name in (".", "..") or "/" in name or "\0" in name or os.sep in name:
        raise InvalidArgument(f"refused to write {name!r} under --data-dir: not a plain name")
    root = _resolve(Path(data_dir), "--data-dir")
    target = _resolve(root / name, "path")
    if target.parent != root:
        raise InvalidArgument(f"refused to write {name!r}: it resolves outside {root}")
    return str(root / name)


def check_disks(disks: list[str] | tuple[str, ...]) -> list[str]:
    """Absolute disk paths (as given, so stable /dev/disk/by-id names stay), each checked."""
    seen: dict[Path, str] = {}
    out = []
    for disk in disks:
        if not disk or "\0" in disk:
            raise InvalidArgument(f"invalid --disk {disk!r}")
        given = Path(os.path.abspath(disk))
        real = _resolve(given, "disk")
        try:
            st = os.stat(real)
        except FileNotFoundError:
            if given.is_symlink():
                raise InvalidArgument(f"disk {disk} is a dangling or looping symlink") from None
            raise InvalidArgument(f"disk {disk} does not exist") from None
        except OSError as e:
            raise InvalidArgument(f"disk {disk}: {e.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"disk {disk} is a directory, not a file or block device")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise InvalidArgument(f"disk {disk} is neither a regular file nor a block device")
        if real in seen:
            raise InvalidArgument(f"disk {disk} is the same as {seen[real]}")
        seen[real] = disk
        out.append(str(given))
    return out
