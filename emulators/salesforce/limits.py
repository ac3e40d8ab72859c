"""The org's daily API request allocation (a rolling 24-hour window) and ``/limits``.

Every REST call but ``GET /services/data/`` counts one request (a Collections call counts
one). Every REST response carries ``Sforce-Limit-Info: api-usage=used/max``. Once the
allocation (plus any overrun a paid org is allowed) is spent, calls get
``403 [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from emulators.salesforce.errors import ApiError
from emulators.salesforce.options import SalesforceOptions

Json = dict[str, Any]

LIMIT_HEADER = "Sforce-Limit-Info"


class ApiUsage:
    def __init__(self, opts: SalesforceOptions, now: Callable[[], float]) -> None:
        self.opts = opts
        self.now = now
        self.calls: deque[float] = deque()
        self.baseline = 0
        """Requests counted as made before the window's own log (set through control)."""
        self.total = 0
        self.rejected = 0

    def reset(self) -> None:
        self.calls.clear()
        self.baseline = 0
        self.total = 0
        self.rejected = 0

    def used(self) -> int:
        cutoff = self.now() - self.opts.api_window_s
        calls = self.calls
        while calls and calls[0] <= cutoff:
            calls.popleft()
        return self.baseline + len(calls)

    def header(self) -> str:
        return f"api-usage={self.used()}/{self.opts.api_requests_max}"

    def charge(self) -> None:
        """Count one request, or refuse it once the allocation and overrun are spent."""
        if self.used() >= self.opts.api_requests_max + self.opts.api_requests_overrun:
            self.rejected += 1
            raise ApiError(
                403,
                "REQUEST_LIMIT_EXCEEDED",
                "TotalRequests Limit exceeded.",
                headers={LIMIT_HEADER: self.header()},
            )
        self.calls.append(self.now())
        self.total += 1

    def set(self, used: int | None = None, maximum: int | None = None) -> None:
        if maximum is not None:
            self.opts.api_requests_max = int(maximum)
        if used is not None:
            self.calls.clear()
            self.baseline = max(0, int(used))

    def as_dict(self) -> Json:
        used = self.used()
        return {
            "used": used,
            "max": self.opts.api_requests_max,
            "remaining": max(0, self.opts.api_requests_max - used),
            "total_charged": self.total,
            "rejected": self.rejected,
        }

    def limits_body(self) -> Json:
        used = self.used()
        remaining = max(0, self.opts.api_requests_max - used)

        def pair(maximum: int, remain: int) -> Json:
            return {"Max": maximum, "Remaining": remain}

        return {
            "ConcurrentAsyncGetReportInstances": pair(200, 200),
            "ConcurrentSyncReportRuns": pair(20, 20),
            "DailyApiRequests": pair(self.opts.api_requests_max, remaining),
            "DailyAsyncApexExecutions": pair(250000, 250000),
            "DailyBulkApiBatches": pair(15000, 15000),
            "DailyBulkV2QueryFileStorageMB": pair(976562, 976562),
            "DailyBulkV2QueryJobs": pair(10000, 10000),
            "DataStorageMB": pair(5, 5),
            "FileStorageMB": pair(20, 20),
            "HourlyTimeBasedWorkflow": pair(1000, 1000),
        }
