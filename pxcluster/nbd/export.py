"""What the NBD server serves: the `Export` interface, the `ExportRegistry`, error mapping.

The server knows nothing about volumes, replicas or the engine. Anything that implements
`Export` (the volume engine, `pxcluster.nbd.memory.MemoryExport` in tests) can be served.

Errors: an export method that raises an exception carrying an integer `errno` attribute
(`OSError(errno.ENOSPC, ...)`, or any class defining `errno`) fails that one request with
the matching NBD error (EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN;
anything else becomes EIO). An exception whose string `code` names an errno (as
`replica.errors` classes do, e.g. "ENOSPC") maps the same way. Every other exception is
logged and becomes EIO. The connection and the server keep running either way.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import logging
from typing import Protocol, runtime_checkable

from pxcluster.nbd import protocol as p

log = logging.getLogger(__name__)


class Export(Protocol):
    """A block device served by name. Offsets and lengths are already bounds-checked
    against `size` by the server; methods may be called concurrently."""

    @property
    def name(self) -> str: ...

    # Read at handshake time and on every request's bounds check, so it may grow online.
    @property
    def size(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview: ...

    # `data` is a view of the server's receive buffer for this request; it stays valid
    # (and unchanged) until the call returns, so the export may hand it straight to I/O.
    # It must not be kept (nor views of it) after returning: the server reuses the buffer.
    async def write(self, offset: int, data: memoryview, fua: bool) -> None: ...

    async def flush(self) -> None: ...

    async def trim(self, offset: int, length: int, fua: bool) -> None: ...

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None: ...


# What an export may add, each on its own: the server calls them first for a READ or a WRITE
# of up to 64 KiB (the volume engine has all three: the requests its local replica completes
# at once, and replicated writes started without a coroutine).
#
# Synchronous: the request done at once (or, for write_begin, started, and answered when the
# future is done: its exception is the request's error), with no coroutine or task. None (or
# False) means "not done, nothing changed": the server calls the async method instead. None
# may raise, since a fast path cannot own an error; returning None (False) hands it to the
# async method, which meets it again and reports it. `data` stays valid until the write is
# answered.


@runtime_checkable
class ReadsNow(Protocol):
    def read_now(self, offset: int, length: int) -> bytes | bytearray | memoryview | None: ...


@runtime_checkable
class WritesNow(Protocol):
    def write_now(self, offset: int, data: memoryview, fua: bool) -> bool: ...


@runtime_checkable
class BeginsWrites(Protocol):
    def write_begin(
        self, offset: int, data: memoryview, fua: bool
    ) -> asyncio.Future[None] | None: ...


class ServedConnection(Protocol):
    """A client connection bound to one export (implemented by the server)."""

    async def drain_and_close(self, timeout: float) -> None: ...


def nbd_error(exc: BaseException) -> int:
    """The NBD error number a failed request reports for `exc`."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return p.ERRNO_TO_NBD.get(code, p.NBD_EIO)
    name = getattr(exc, "code", None)
    if isinstance(name, str):
        value = getattr(errno_mod, name, None)
        if isinstance(value, int):
            return p.ERRNO_TO_NBD.get(value, p.NBD_EIO)
    return p.NBD_EIO


def has_errno(exc: BaseException) -> bool:
    """True when the exception states its own error, so it is expected, not a bug."""
    if isinstance(getattr(exc, "errno", None), int):
        return True
    name = getattr(exc, "code", None)
    return isinstance(name, str) and isinstance(getattr(errno_mod, name, None), int)


class ExportRegistry:
    """Exports by name, and the client connections bound to each one."""

    def __init__(self) -> None:
        self._exports: dict[str, Export] = {}
        self._connections: dict[str, set[ServedConnection]] = {}

    def add(self, export: Export) -> None:
        name = export.name
        if name in self._exports:
            raise ValueError(f"export {name!r} already exists")
        if len(name.encode()) > p.MAX_NAME_LENGTH:
            raise ValueError(f"export name longer than {p.MAX_NAME_LENGTH} bytes")
        self._exports[name] = export
        self._connections[name] = set()

    async def remove(self, name: str, *, timeout: float = 30.0) -> None:
        """Stop serving `name`: new handshakes no longer see it, and every connection bound
        to it is closed once its in-flight replies are sent (or after `timeout`, aborted).
        Removing an unknown name does nothing, so detach paths can retry freely."""
        if self._exports.pop(name, None) is None:
            return
        connections = self._connections.pop(name, set())
        if connections:
            await asyncio.gather(*(c.drain_and_close(timeout) for c in connections))

    def get(self, name: str) -> Export | None:
        return self._exports.get(name)

    def names(self) -> list[str]:
        return list(self._exports)

    def bind(self, name: str, connection: ServedConnection) -> Export | None:
        """Attach a connection to an export for the transmission phase; None if it is gone."""
        export = self._exports.get(name)
        if export is not None:
            self._connections[name].add(connection)
        return export

    def unbind(self, name: str, connection: ServedConnection) -> None:
        connections = self._connections.get(name)
        if connections is not None:
            connections.discard(connection)

    def connection_count(self, name: str) -> int:
        return len(self._connections.get(name, ()))
