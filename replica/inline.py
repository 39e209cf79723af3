"""Run a coroutine's first step inline, and make a task only if it has to wait.

Shared by the replica server, the NBD server and the engine's fan-out (it lives here, at the
bottom of the layers, so that `replica/` and `pxcluster/` may both import it).

A request whose export call completes without suspending (a read served from the local
replica's page cache, say) then costs no task and its reply leaves one loop iteration sooner.
The coroutine must not need ``asyncio.current_task()`` (``asyncio.timeout``, for one) before
its first suspension; after that it runs inside an ordinary task.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


@types.coroutine
def _resume(coro: Coroutine[Any, Any, T], first: Any) -> Generator[Any, None, T]:
    """Carry on a coroutine whose first step ran outside any task: hand what it awaits to the
    enclosing task, as if the task had been running it all along."""
    yielded = first
    while True:
        try:
            yield yielded
        except BaseException as e:  # the task's cancellation goes on to the coroutine
            try:
                yielded = coro.throw(e)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            continue
        try:
            yielded = coro.send(None)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


async def carry_on(coro: Coroutine[Any, Any, T], first: Any) -> T:
    """The rest of a coroutine whose first step (which yielded `first`) already ran."""
    return await _resume(coro, first)


def start(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
) -> asyncio.Task[None] | None:
    """Step `coro` now; None if it finished, else the task that carries it on."""
    try:
        first = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(carry_on(coro, first))
