"""Exclusive locks on ranges of blocks: an encrypted volume's read-modify-write of a partial
block must not interleave with another write touching that block, or bytes the other write
never touched could be reverted."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class RangeLocks:
    def __init__(self) -> None:
        self._held: list[tuple[int, int]] = []
        self._changed = asyncio.Condition()

    def _free(self, first: int, last: int) -> bool:
        return all(last < a or first > b for a, b in self._held)

    @contextlib.asynccontextmanager
    async def hold(self, first: int, last: int) -> AsyncIterator[None]:
        """Blocks first..last (inclusive), exclusively."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._free(first, last))
            self._held.append((first, last))
        try:
            yield
        finally:
            async with self._changed:
                self._held.remove((first, last))
                self._changed.notify_all()
