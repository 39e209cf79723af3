"""Run a coroutine's first step inline, and make a task only if it has to wait.

A request whose export call completes without suspending (a read served from the local
replica's page cache, say) then costs no task and its reply leaves one loop iteration sooner.
The coroutine must not need ``asyncio.current_task()`` (``asyncio.timeout``, for one) before
its first suspension; after that it runs inside an ordinary task.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from typing import Any


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], first: Any) -> Generator[Any, None, None]:
    """Carry on a coroutine whose first step ran outside any task: hand what it awaits to the
    enclosing task, as if the task had been running it all along."""
    yielded = first
    while True:
        try:
            yield yielded
        except BaseException as e:  # the task's cancellation goes on to the coroutine
            try:
                yielded = coro.throw(e)
            except StopIteration:
                return
            continue
        try:
            yielded = coro.send(None)
        except StopIteration:
            return


async def _finish(coro: Coroutine[Any, Any, None], first: Any) -> None:
    await _resume(coro, first)


def start(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
) -> asyncio.Task[None] | None:
    """Step `coro` now; None if it finished, else the task that carries it on."""
    try:
        first = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(_finish(coro, first))
