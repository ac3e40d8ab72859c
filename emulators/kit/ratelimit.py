"""Rate limits as vendors apply them: a cap on simultaneous calls, and a rolling budget.

- :class:`ConcurrencyCap`: at most ``limit`` calls in flight (Zoho: 20 per org and app, 10 for
  heavy calls; Sage 300 / IIS: the request queue). A call over the cap is refused, not queued.
- :class:`RollingBudget`: units (calls, credits) spent in the last ``window_s`` seconds may not
  exceed ``limit`` (Zoho: credits per rolling 24 h; Salesforce: daily API requests; Infor:
  requests per minute). Costs may differ per call.

Limits are callables so that an emulator's run-time configuration can change them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

IntSource = int | Callable[[], int]
"""A limit: a number, or a callable read at every check (options that change at run time)."""


def _read(limit: IntSource) -> int:
    return limit() if callable(limit) else limit


class ConcurrencyCap:
    """Calls in flight, the peak, and the calls refused for being over the cap."""

    def __init__(self, limit: IntSource) -> None:
        self.limit = limit
        self.in_flight = 0
        self.peak = 0
        self.rejected = 0

    def try_acquire(self) -> bool:
        """Takes a slot when one is free; counts a refusal otherwise."""
        if self.in_flight >= _read(self.limit):
            self.rejected += 1
            return False
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        return True

    def release(self) -> None:
        self.in_flight -= 1

    @contextmanager
    def slot(self) -> Iterator[bool]:
        """``with cap.slot() as ok:`` the slot is released on exit when it was taken."""
        ok = self.try_acquire()
        try:
            yield ok
        finally:
            if ok:
                self.release()

    def reset_counters(self) -> None:
        """Forgets the peak and refusals (calls in flight stay counted)."""
        self.peak = self.in_flight
        self.rejected = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "limit": _read(self.limit),
            "in_flight": self.in_flight,
            "peak": self.peak,
            "rejected": self.rejected,
        }


class RollingBudget:
    """Units spent within a rolling window, against a limit."""

    def __init__(self, clock: Callable[[], float], window_s: float, limit: IntSource) -> None:
        self.clock = clock
        self.window_s = window_s
        self.limit = limit
        self._log: deque[tuple[float, int]] = deque()
        self._window_sum = 0
        self.baseline = 0
        """Units counted as spent before the log began (set by a test through control)."""
        self.total = 0
        """Units spent since the last reset, window or not."""
        self.rejected = 0

    def used(self, now: float | None = None) -> int:
        now = self.clock() if now is None else now
        log = self._log
        cutoff = now - self.window_s
        while log and log[0][0] <= cutoff:
            self._window_sum -= log.popleft()[1]
        return self.baseline + self._window_sum

    def remaining(self, now: float | None = None) -> int:
        return max(0, _read(self.limit) - self.used(now))

    def would_exceed(self, cost: int = 1, now: float | None = None, slack: int = 0) -> bool:
        """Whether spending ``cost`` now goes over the limit (plus an allowed overrun)."""
        return self.used(now) + cost > _read(self.limit) + slack

    def spend(self, cost: int = 1, now: float | None = None) -> int:
        """Records ``cost`` units; returns the units used in the window afterwards."""
        now = self.clock() if now is None else now
        self._log.append((now, cost))
        self._window_sum += cost
        self.total += cost
        return self.used(now)

    def try_spend(self, cost: int = 1, now: float | None = None, slack: int = 0) -> bool:
        """Spends ``cost`` unless that goes over the limit; counts a refusal then."""
        now = self.clock() if now is None else now
        if self.would_exceed(cost, now, slack):
            self.rejected += 1
            return False
        self.spend(cost, now)
        return True

    def set_used(self, used: int) -> None:
        """Pretends ``used`` units were spent in the window before now."""
        self._log.clear()
        self._window_sum = 0
        self.baseline = max(0, int(used))

    def reset(self) -> None:
        self._log.clear()
        self._window_sum = 0
        self.baseline = 0
        self.total = 0
        self.rejected = 0

    def as_dict(self) -> dict[str, Any]:
        used = self.used()
        limit = _read(self.limit)
        return {
            "used": used,
            "limit": limit,
            "remaining": max(0, limit - used),
            "window_s": self.window_s,
            "total": self.total,
            "rejected": self.rejected,
        }
