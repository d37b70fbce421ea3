"""The router queue: at most ``max_running`` samples in flight, at most
``max_queue`` requests waiting for room; one more is refused (``QueueFull``).

Lifecycle of a request here: ``admit(n)`` → WAITING (FIFO) → RUNNING (holds n
slots) → the context exits → slots freed, the oldest waiter that fits is woken.
A waiter that is cancelled (client gone) leaves the queue without taking slots.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import AsyncIterator

from router.errors import InvalidRequest, QueueFull


class Admission:
    def __init__(self, max_running: int, max_queue: int):
        self.max_running = max_running
        self.max_queue = max_queue
        self.num_running = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @property
    def num_waiting(self) -> int:
        return len(self._waiters)

    def check(self, n: int) -> None:
        """Raise now if ``n`` samples can never be admitted or the queue is full."""
        if n > self.max_running:
            raise InvalidRequest(f"this request needs {n} concurrent samples; the server allows "
                                 f"{self.max_running}", param="n")
        if not self._fits(n) and self.num_waiting >= self.max_queue:
            raise QueueFull()

    def _fits(self, n: int) -> bool:
        return not self._waiters and self.num_running + n <= self.max_running

    @contextlib.asynccontextmanager
    async def admit(self, n: int = 1) -> AsyncIterator[float]:
        """Hold ``n`` slots for the body; yields the seconds spent waiting."""
        self.check(n)
        start = time.monotonic()
        queued = not self._fits(n)
        if queued:
            fut = asyncio.get_running_loop().create_future()
            entry = (n, fut)
            self._waiters.append(entry)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._release(n)          # woken and cancelled at once: give the slots back
                else:
                    if entry in self._waiters:
                        self._waiters.remove(entry)
                    self._wake()
                raise
        else:
            self.num_running += n
        try:
            yield time.monotonic() - start if queued else 0.0
        finally:
            self._release(n)

    def _release(self, n: int) -> None:
        self.num_running -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.num_running + self._waiters[0][0] <= self.max_running:
            n, fut = self._waiters.popleft()
            if fut.done():
                continue
            self.num_running += n
            fut.set_result(None)
