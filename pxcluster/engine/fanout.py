"""Send one call to every replica at once and sort the outcomes by replica.

Every call's first step runs at once, in the caller: a remote replica's frame leaves in this
loop iteration, and the local replica's page-cache write is usually done before the next
replica is called. Calls still waiting after their first step must progress side by side: all
but one of them get a task, the last is carried on by the caller. A repl-3 write so costs at
most one task, where gathering cost three tasks, a gathering future and a loop iteration
before any frame left.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from pxcluster.nbd.inline import carry_on
from replica.api import ReplicaAPI

T = TypeVar("T")


async def fan_out(
    replicas: Mapping[str, ReplicaAPI], call: Callable[[ReplicaAPI], Awaitable[T]]
) -> tuple[dict[str, T], dict[str, BaseException]]:
    return await fan_out_calls({n: functools.partial(call, r) for n, r in replicas.items()})


async def fan_out_calls(
    calls: Mapping[str, Callable[[], Awaitable[T]]],
) -> tuple[dict[str, T], dict[str, BaseException]]:
    ok: dict[str, T] = {}
    failed: dict[str, BaseException] = {}
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
                aw = carry_on(aw, first)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            failed[name] = e
            continue
        waiting.append((name, aw))
    if not waiting:
        return ok, failed
    last = waiting.pop()
    tasks = [(name, asyncio.ensure_future(aw)) for name, aw in waiting]
    try:
        for name, aw in [last, *tasks]:
            try:
                ok[name] = await aw
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failed[name] = e
    except asyncio.CancelledError:
        for _, task in tasks:
            task.cancel()
        raise
    return ok, failed
