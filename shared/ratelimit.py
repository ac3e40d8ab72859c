"""Per-connection pacing: a concurrency cap, a requests-per-minute budget, and a pause that
every caller honours after the target throttled us."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from shared import metrics


class RateLimiter:
    def __init__(
        self,
        connection: str,
        *,
        max_concurrency: int | None = None,
        requests_per_minute: float | None = None,
    ) -> None:
        self.connection = connection
        self._semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self._interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._next_slot = 0.0
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def pause(self, seconds: float) -> None:
        """The target throttled us: nobody on this connection calls before ``seconds`` pass."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def _wait_turn(self) -> None:
        while True:
            now = time.monotonic()
            wait = self._paused_until - now
            if wait > 0:
                metrics.THROTTLE_WAITS.labels(self.connection).inc(wait)
                await asyncio.sleep(wait)
                continue
            break
        if self._interval:
            async with self._lock:
                now = time.monotonic()
                slot = max(now, self._next_slot)
                self._next_slot = slot + self._interval
            if slot > now:
                await asyncio.sleep(slot - now)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._wait_turn()
        if self._semaphore is None:
            yield
            return
        async with self._semaphore:
            yield
