"""Send one call to every replica at once and sort the outcomes by replica."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from replica.api import ReplicaAPI

T = TypeVar("T")


async def fan_out(
    replicas: Mapping[str, ReplicaAPI], call: Callable[[ReplicaAPI], Awaitable[T]]
) -> tuple[dict[str, T], dict[str, BaseException]]:
    return await fan_out_calls({n: functools.partial(call, r) for n, r in replicas.items()})


async def fan_out_calls(
    calls: Mapping[str, Callable[[], Awaitable[T]]],
) -> tuple[dict[str, T], dict[str, BaseException]]:
    names = list(calls)
    results = await asyncio.gather(*(calls[n]() for n in names), return_exceptions=True)
    ok: dict[str, T] = {}
    failed: dict[str, BaseException] = {}
    for name, result in zip(names, results, strict=True):
        if isinstance(result, BaseException):
            if isinstance(result, asyncio.CancelledError):
                raise result
            failed[name] = result
        else:
            ok[name] = result
    return ok, failed
