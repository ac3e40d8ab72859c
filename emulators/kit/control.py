"""The control API every emulator shares, under ``/_control`` (never faulted, counted or charged):

- ``GET  /_control/stats``   calls by route and status, plus emulator-specific counters
- ``POST /_control/faults``  ``{"latency_ms": 0, "error_rate": 0.0, "throttle_rate": 0.0,
  "fail_next": 0, "throttle_next": 0, "max_concurrency": null, "path_prefix": null,
  "malformed_next": 0, "malformed_kind": "truncated"}``
- ``POST /_control/reset``   forget all data, counters and faults

and the pieces emulators build their own control routes from: a clock tests can move forward
(:class:`Clock`, :func:`add_clock_route`) and a strict JSON body reader (:func:`json_body`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from emulators.kit.faults import CONTROL_PREFIX, CallStats, Faults

__all__ = [
    "CONTROL_PREFIX",
    "Clock",
    "add_clock_route",
    "add_common_control_routes",
    "bad_request",
    "json_body",
]


def bad_request(message: str) -> web.HTTPBadRequest:
    """A control-API refusal: 400 with ``{"error": message}``."""
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


async def json_body(request: web.Request, *, required: bool = False) -> dict[str, Any]:
    """The request's JSON object; ``{}`` for an empty body unless ``required``."""
    raw = await request.read() if request.can_read_body else b""
    if not raw.strip():
        if required:
            raise bad_request("a JSON object body is required")
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise bad_request(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


class Clock:
    """The emulator's clock: a time source plus a skew that tests move forward.

    ``source`` returns epoch seconds (``time.time``) or any monotonic seconds; everything that
    expires (tokens, sessions, channels, page tokens, rolling budgets) reads :meth:`now`.
    """

    def __init__(self, source: Callable[[], float] = time.time) -> None:
        self.source = source
        self.skew = 0.0

    def now(self) -> float:
        return self.source() + self.skew

    def advance(self, seconds: float) -> float:
        """Moves the clock forward (or back, with a negative number); returns the new skew."""
        self.skew += float(seconds)
        return self.skew

    def reset(self) -> None:
        self.skew = 0.0


def add_clock_route(
    app: web.Application,
    clock: Clock,
    path: str = "advance",
    describe: Callable[[Clock], dict[str, Any]] | None = None,
) -> None:
    """``POST /_control/{path}`` ``{"seconds": n}``: move the emulator clock forward."""

    async def advance(request: web.Request) -> web.Response:
        body = await json_body(request)
        try:
            clock.advance(float(body.get("seconds", 0)))
        except (TypeError, ValueError):
            raise bad_request("seconds must be a number") from None
        return web.json_response(describe(clock) if describe else {"skew_s": clock.skew})

    app.router.add_post(f"{CONTROL_PREFIX}/{path}", advance)


def add_common_control_routes(
    app: web.Application,
    faults: Faults,
    stats: CallStats,
    extra_stats: Callable[[], dict[str, Any]],
    reset: Callable[[], None],
) -> None:
    """``GET /stats``, ``POST /faults`` and ``POST /reset`` under ``/_control``."""

    async def get_stats(_: web.Request) -> web.Response:
        return web.json_response({**stats.as_dict(), **extra_stats()})

    async def set_faults(request: web.Request) -> web.Response:
        faults.update(await request.json())
        return web.json_response(faults.__dict__)

    async def do_reset(_: web.Request) -> web.Response:
        reset()
        stats.clear()
        faults.__init__()  # type: ignore[misc]
        return web.json_response({"reset": True})

    app.router.add_get(f"{CONTROL_PREFIX}/stats", get_stats)
    app.router.add_post(f"{CONTROL_PREFIX}/faults", set_faults)
    app.router.add_post(f"{CONTROL_PREFIX}/reset", do_reset)
