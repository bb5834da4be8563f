"""Admission control: at most ``max_in_flight`` requests run, at most ``max_queue`` wait (FIFO) for
a slot; a request beyond that is refused at once with ResourceExhausted ("not now")."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from cloudmatrix.rpc.errors import ResourceExhausted


class Admission:
    def __init__(self, max_in_flight: int, max_queue: int) -> None:
        self.max_in_flight, self.max_queue = max_in_flight, max_queue
        self.running = self.waiting = 0
        self._slots = asyncio.Semaphore(max_in_flight)

    @contextlib.asynccontextmanager
    async def slot(self, timeout_s: float) -> AsyncIterator[None]:
        """Hold a running slot for the body; wait up to ``timeout_s`` for one (TimeoutError)."""
        if self._slots.locked() and self.waiting >= self.max_queue:
            raise ResourceExhausted(f"gateway at capacity: {self.running} running, {self.waiting} waiting "
                                    f"(max_in_flight {self.max_in_flight}, max_queue {self.max_queue})")
        self.waiting += 1
        try:
            async with asyncio.timeout(timeout_s):
                await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()
