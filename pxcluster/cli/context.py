"""What every command shares: the etcd context, a Service per command, one-line errors."""

from __future__ import annotations

import errno
import functools
import sys
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import click

from membership.etcd import Etcd, EtcdSettings, EtcdUnavailable
from pxcluster.cli import output
from pxcluster.errors import PxcError
from pxcluster.service.core import Service
from replica.errors import DiskError

T = TypeVar("T")
EXPECTED = (PxcError, EtcdUnavailable, DiskError)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def run(coro: Coroutine[Any, Any, T]) -> T:
    import uvloop

    return uvloop.run(coro)  # type: ignore[no-any-return]


class Ctx:
    def __init__(self, etcd_url: str, cluster: str, settings: EtcdSettings | None = None) -> None:
        self.etcd_url = etcd_url
        self.cluster = cluster
        self.etcd_settings = settings or EtcdSettings()

    def etcd(self) -> Etcd:
        return Etcd(self.etcd_url, settings=self.etcd_settings)


def with_service(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """Run an async command body with a connected Service; expected errors become one line."""

    @click.pass_obj
    @functools.wraps(fn)
    def wrapper(ctx: Ctx, *args: Any, **kwargs: Any) -> Any:
        async def body() -> Any:
            etcd = ctx.etcd()
            try:
                await etcd.connect()
                return await fn(Service(etcd, ctx.cluster), *args, **kwargs)
            finally:
                await etcd.close()

        try:
            return run(body())
        except EXPECTED as e:
            output.fail(str(e))

    return wrapper


class Group(click.Group):
    """The top-level group: every failure ends as one line on stderr and a non-zero status.

    Usage errors (a bad option value, a missing argument) print as `error: ...` (status 2)
    instead of click's usage block; anything no command expected is the last resort: one line
    naming the exception (status 1), the traceback only with -v."""

    verbose = 0  # set by main() once the options are parsed

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.Abort:
            _fail("aborted", 1)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except (SystemExit, KeyboardInterrupt):
            raise
        except OSError as e:
            if e.errno == errno.EPIPE:  # stdout closed by a pipe reader: nothing to say
                sys.exit(1)
            self._last_resort(e)
        except Exception as e:
            self._last_resort(e)
        sys.exit(rv if isinstance(rv, int) else 0)

    def _last_resort(self, e: Exception) -> None:
        if Group.verbose:
            traceback.print_exc()
        _fail(f"{type(e).__name__}: {e}", 1)


def _fail(message: str, code: int) -> None:
    # One line, whatever the message holds (a multi-line exception text included), and a
    # short one: click echoes values back, and a value may be 5,000 characters long.
    line = " ".join(message.split())
    output.fail(line if len(line) <= 300 else line[:300] + "...", code)
