"""Fault injection and call counting: the middleware every emulator puts in front of its API.

Tests, benchmarks and the demo steer it through ``POST /_control/faults`` (see
:mod:`emulators.kit.control`): latency, error and throttle rates, the next N calls failing or
throttled, a concurrency cap, and malformed answers. Control routes are never faulted, counted
or delayed.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

CONTROL_PREFIX = "/_control"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Faults:
    """What the emulator does wrong on purpose. Rates are probabilities per API call."""

    latency_ms: float = 0.0
    error_rate: float = 0.0
    throttle_rate: float = 0.0
    fail_next: int = 0
    throttle_next: int = 0
    max_concurrency: int | None = None
    path_prefix: str | None = None  # inject faults only on paths that start with this
    # The next N answers are malformed: "truncated" (the real answer cut in half, after the
    # request took effect), "html" (a proxy's HTML page with status 200), "wrong_types"
    # (JSON of the wrong shape with status 200).
    malformed_next: int = 0
    malformed_kind: str = "truncated"

    def update(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if not hasattr(self, name):
                raise web.HTTPBadRequest(text=f"unknown fault setting {name!r}")
            setattr(self, name, value)


@dataclass
class CallStats:
    calls: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    in_flight: int = 0
    peak_in_flight: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "total_calls": sum(self.calls.values()),
            "peak_in_flight": self.peak_in_flight,
        }

    def clear(self) -> None:
        self.calls.clear()
        self.statuses.clear()
        self.peak_in_flight = 0


FaultResponder = Callable[[web.Request, str], web.StreamResponse]
"""Builds the vendor-shaped response for an injected fault; kind is 'error' or 'throttle'."""


def fault_middleware(
    faults: Faults,
    stats: CallStats,
    responder: FaultResponder,
    route_name: Callable[[web.Request], str] | None = None,
) -> Any:
    """Counts every API call and applies the injected faults before the real handler runs."""

    rng = random.Random()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(CONTROL_PREFIX):
            return await handler(request)
        name = route_name(request) if route_name else f"{request.method} {request.path}"
        stats.calls[name] += 1
        if faults.max_concurrency is not None and stats.in_flight >= faults.max_concurrency:
            response = responder(request, "throttle")
            stats.statuses[response.status] += 1
            return response
        stats.in_flight += 1
        stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
        try:
            if faults.latency_ms:
                await asyncio.sleep(faults.latency_ms / 1000)
            kind = None
            in_scope = not (faults.path_prefix and not request.path.startswith(faults.path_prefix))
            if not in_scope:
                pass
            elif faults.throttle_next > 0:
                faults.throttle_next -= 1
                kind = "throttle"
            elif faults.fail_next > 0:
                faults.fail_next -= 1
                kind = "error"
            elif faults.throttle_rate and rng.random() < faults.throttle_rate:
                kind = "throttle"
            elif faults.error_rate and rng.random() < faults.error_rate:
                kind = "error"
            if kind is None and in_scope and faults.malformed_next > 0:
                faults.malformed_next -= 1
                response = await _malformed(request, handler, faults.malformed_kind)
            elif kind is not None:
                response = responder(request, kind)
            else:
                try:
                    response = await handler(request)
                except web.HTTPException as exc:
                    stats.statuses[exc.status] += 1
                    raise
            stats.statuses[response.status] += 1
            return response
        finally:
            stats.in_flight -= 1

    return middleware


async def _malformed(request: web.Request, handler: Handler, kind: str) -> web.StreamResponse:
    if kind == "html":
        return web.Response(
            status=200,
            content_type="text/html",
            text="<html><body><h1>Service temporarily unavailable</h1></body></html>",
        )
    if kind == "wrong_types":
        return web.json_response({"data": "unexpected", "value": 42, "info": []})
    real = await handler(request)
    body = real.body if isinstance(real, web.Response) and isinstance(real.body, bytes) else b"{"
    return web.Response(
        status=real.status, body=body[: max(1, len(body) // 2)], content_type="application/json"
    )
