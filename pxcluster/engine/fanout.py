"""Send one call to every replica at once and sort the outcomes by replica.

Every call's first step runs at once, in the caller: a remote replica's frame leaves in this
loop iteration, and the local replica's page-cache write is usually done before the next
replica is called. A call that then waits on one future (a remote replica's reply: the common
case) is parked: the caller waits until every parked future is done and only then steps the
calls on, so a repl-3 write costs no task at all. A call that waits on anything else, or waits
again after its future, is carried on by a task of its own, so calls with several steps still
progress side by side. Each replica's call depends on no other replica's, so a parked call's
later steps may wait for the slowest first step without ever waiting for another call.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

from replica.api import ReplicaAPI
from replica.inline import carry_on

T = TypeVar("T")

# A call suspended on a future after its first step: its name, coroutine and that future.
_Parked = tuple[str, Coroutine[Any, Any, Any], asyncio.Future[Any]]
# Cancelled calls that wait once more to clean up.
_cleaning: set[asyncio.Future[Any]] = set()


async def fan_out(
    replicas: Mapping[str, ReplicaAPI], call: Callable[[ReplicaAPI], Awaitable[T]]
) -> tuple[dict[str, T], dict[str, BaseException]]:
    return await fan_out_calls({n: functools.partial(call, r) for n, r in replicas.items()})


async def fan_out_calls(
    calls: Mapping[str, Callable[[], Awaitable[T]]],
) -> tuple[dict[str, T], dict[str, BaseException]]:
    ok: dict[str, T] = {}
    failed: dict[str, BaseException] = {}
    parked: list[_Parked] = []
    waiting: list[tuple[str, Awaitable[T]]] = []
    for name, call in calls.items():
        try:
            aw = call()
            if asyncio.iscoroutine(aw):
                try:
                    first = aw.send(None)
                except StopIteration as done:
                    ok[name] = done.value
                    continue
                if asyncio.isfuture(first) and first._asyncio_future_blocking:
                    first._asyncio_future_blocking = False  # we wait for it, not a task
                    parked.append((name, aw, first))
                    continue
                aw = carry_on(aw, first)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            failed[name] = e
            continue
        waiting.append((name, aw))
    if not parked and not waiting:
        return ok, failed
    tasks = [(name, asyncio.ensure_future(aw)) for name, aw in waiting]
    try:
        if parked:
            await _all_done([f for _, _, f in parked])
            for i, (name, coro, _) in enumerate(parked):
                try:
                    again = coro.send(None)
                except StopIteration as done:
                    ok[name] = done.value
                except asyncio.CancelledError:
                    del parked[: i + 1]
                    raise
                except Exception as e:
                    failed[name] = e
                else:
                    tasks.append((name, asyncio.ensure_future(carry_on(coro, again))))
            parked = []
        for name, task in tasks:
            try:
                ok[name] = await task
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failed[name] = e
    except asyncio.CancelledError:
        for _, coro, fut in parked:
            _cancel_parked(coro, fut)
        for _, task in tasks:
            task.cancel()
        raise
    return ok, failed


async def _all_done(futures: list[asyncio.Future[Any]]) -> None:
    """Wait until every future is done, whatever its outcome; cancelling the wait cancels none
    of them."""
    pending = [f for f in futures if not f.done()]
    if not pending:
        return
    waiter = pending[0].get_loop().create_future()
    left = len(pending)

    def one_done(_: asyncio.Future[Any]) -> None:
        nonlocal left
        left -= 1
        if not left and not waiter.done():
            waiter.set_result(None)

    for f in pending:
        f.add_done_callback(one_done)
    try:
        await waiter
    finally:
        for f in pending:
            f.remove_done_callback(one_done)


def _cancel_parked(coro: Coroutine[Any, Any, Any], fut: asyncio.Future[Any]) -> None:
    """What cancelling its task would do: the future it waits on is cancelled and the call sees
    CancelledError where it waits; a call that waits again to clean up gets a task for that."""
    fut.cancel()
    try:
        again = coro.throw(asyncio.CancelledError())
    except BaseException:  # cancelled, finished or failed: it is over either way
        return
    task = asyncio.ensure_future(carry_on(coro, again))
    _cleaning.add(task)  # the loop keeps only weak references to tasks
    task.add_done_callback(_cleaning.discard)
