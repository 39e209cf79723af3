"""Host tools run as subprocesses: bounded in time, a failure as one CommandFailed line."""

from __future__ import annotations

import asyncio
import os

from pxcluster.host.errors import CommandFailed

TIMEOUT = 120.0


async def run(*cmd: str, check: bool = True, timeout: float = TIMEOUT) -> tuple[int, str]:
    """(exit status, stdout and stderr as text). A tool that hangs is killed after `timeout`."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except FileNotFoundError:
        raise CommandFailed(f"{cmd[0]} is not installed on this host") from None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CommandFailed(f"{cmd[0]} did not finish in {timeout:.0f}s") from None
    text = " ".join(out.decode(errors="replace").split())
    code = proc.returncode or 0
    if check and code != 0:
        raise CommandFailed(f"{' '.join(cmd)} failed ({code}): {text[:300]}")
    return code, text


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not serving anything.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
