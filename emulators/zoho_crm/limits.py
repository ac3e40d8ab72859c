"""API limits: concurrency (20 calls, 10 heavy calls, per org and app) and credits per rolling
24 hours, on the kit's rate limiter. Both answer ``429 TOO_MANY_REQUESTS`` (the code does not
say which limit was hit); ``X-API-CREDITS-REMAINING`` appears once half the credits are used."""

from __future__ import annotations

import asyncio
import math
import re
from typing import Any

from aiohttp import web

from emulators.kit import ConcurrencyCap, RollingBudget
from emulators.kit.faults import Handler
from emulators.zoho_crm.auth import ZohoAuth
from emulators.zoho_crm.errors import flat_error
from emulators.zoho_crm.options import CREDIT_WINDOW_S, TOO_MANY_REQUESTS_MESSAGE
from emulators.zoho_crm.org import Org
from emulators.zoho_crm.wire import call_info, read_json


class ZohoLimits:
    def __init__(self, org: Org) -> None:
        self.org = org
        opts = org.opts
        self.calls = ConcurrencyCap(lambda: opts.max_concurrency)
        self.heavy = ConcurrencyCap(lambda: opts.sub_concurrency)
        self.credits = RollingBudget(org.now, CREDIT_WINDOW_S, lambda: opts.credits_per_day)

    def reset(self) -> None:
        self.credits.reset()
        self.calls.reset_counters()
        self.heavy.reset_counters()

    async def classify(self, request: web.Request) -> bool:
        """True for calls Zoho counts against the sub-concurrency limit."""
        parts = [p for p in request.path.split("/") if p][2:]
        if not parts:
            return False
        method = request.method
        if parts[0] == "coql" and method == "POST":
            body = await read_json(request)
            query = body.get("select_query") if isinstance(body, dict) else None
            if isinstance(query, str):
                match = re.search(r"\blimit\s+(\d+)(?:\s*,\s*(\d+))?", query, re.IGNORECASE)
                limit = 200
                if match:
                    limit = int(match.group(2) or match.group(1))
                call_info(request).coql_limit = limit
            return True
        if parts[0] in ("settings", "actions", "org", "users"):
            return False
        if len(parts) == 2 and parts[1] == "search":
            return True
        if len(parts) == 1 and method == "GET":
            return "sort_by" in request.query or "cvid" in request.query
        if method in ("POST", "PUT") and (
            len(parts) == 1 or parts[1] == "upsert" or method == "PUT"
        ):
            body = await read_json(request)
            data = body.get("data") if isinstance(body, dict) else None
            count = len(data) if isinstance(data, list) else 1
            call_info(request).nrecords = count
            return count > 10
        return False

    def cost(self, request: web.Request) -> int:
        info = call_info(request)
        if info.nrecords is not None:
            per = self.org.opts.write_records_per_credit
            return max(1, math.ceil(info.nrecords / per)) if per else 1
        if info.coql_limit is not None:
            limit = info.coql_limit
            return 1 if limit <= 200 else 2 if limit <= 1000 else 3
        if request.method == "GET" and request.path.endswith("/deleted"):
            return 2
        return 1

    def gate_middleware(self) -> Any:
        """Outermost: takes a concurrency slot (and a heavy one) for the call's whole life, or
        marks the call to be refused once it is authenticated."""

        @web.middleware
        async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not request.path.startswith("/crm/"):
                return await handler(request)
            heavy = await self.classify(request)
            if not self.calls.try_acquire():
                call_info(request).reject = True
                return await handler(request)
            if heavy and not self.heavy.try_acquire():
                self.calls.release()
                call_info(request).reject = True
                return await handler(request)
            try:
                return await handler(request)
            finally:
                self.calls.release()
                if heavy:
                    self.heavy.release()

        return gate

    def api_middleware(self, auth: ZohoAuth) -> Any:
        """Innermost: authentication, then the concurrency refusal, then credits."""

        @web.middleware
        async def api(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not request.path.startswith("/crm/"):
                return await handler(request)
            denied = auth.authenticate(request)
            if denied is not None:
                return denied
            counters = self.org.counters
            if call_info(request).reject:
                counters["concurrency_rejections"] += 1
                return flat_error(429, "TOO_MANY_REQUESTS", TOO_MANY_REQUESTS_MESSAGE)
            opts = self.org.opts
            now = self.org.now()
            cost = self.cost(request)
            if not self.credits.try_spend(cost, now):
                counters["credit_rejections"] += 1
                return flat_error(429, "TOO_MANY_REQUESTS", TOO_MANY_REQUESTS_MESSAGE)
            counters["credits_used"] += cost
            used = self.credits.used(now)
            if opts.service_time_ms > 0:
                await asyncio.sleep(opts.service_time_ms / 1000)
            response = await handler(request)
            if used >= opts.credits_per_day * opts.credits_header_threshold:
                response.headers["X-API-CREDITS-REMAINING"] = str(
                    max(0, opts.credits_per_day - used)
                )
            return response

        return api
