"""The Zoho CRM emulator app: the pieces wired together, the URL dispatch and the middlewares.

Middlewares, outermost first: the concurrency gate (:mod:`.limits`), the kit's fault injection
and call counting, then authentication, concurrency refusals and credits (:mod:`.limits`).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from emulators.kit import (
    CallStats,
    Faults,
    add_common_control_routes,
    fault_middleware,
    serve_main,
)
from emulators.zoho_crm.auth import ZohoAuth
from emulators.zoho_crm.control import ZohoControl
from emulators.zoho_crm.errors import RequestError, bad_method, flat_error, url_pattern_error
from emulators.zoho_crm.limits import ZohoLimits
from emulators.zoho_crm.notifications import Notifications
from emulators.zoho_crm.options import API_VERSION, TOO_MANY_REQUESTS_MESSAGE, ZohoOptions
from emulators.zoho_crm.org import Org
from emulators.zoho_crm.records import RecordsApi
from emulators.zoho_crm.search_coql import SearchApi
from emulators.zoho_crm.store import ModuleStore

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.Response]]
SyncHandler = Callable[[web.Request], web.Response]

ID_SEGMENT_RE = re.compile(r"^\d{6,}$")


class ZohoCrmEmulator:
    """One Zoho CRM datacenter: an org and the APIs over it."""

    def __init__(self, options: ZohoOptions) -> None:
        self.opts = options
        self.faults = Faults()
        self.call_stats = CallStats()
        self.org = Org(options)
        self.auth = ZohoAuth(self.org)
        self.limits = ZohoLimits(self.org)
        self.notifications = Notifications(self.org)
        self.records = RecordsApi(self.org, self.notifications)
        self.search = SearchApi(self.org)
        self.control = ZohoControl(self.org, self.auth, self.notifications)

    @property
    def stores(self) -> dict[str, ModuleStore]:
        return self.org.stores

    def now(self) -> float:
        return self.org.now()

    def reset(self) -> None:
        """Forget records, schema changes, channels, credits and counters. Tokens stay valid."""
        self.org.reset()
        self.auth.reset()
        self.limits.reset()
        self.notifications.reset()
        self.records.reset()

    def extra_stats(self) -> Json:
        org = self.org
        counters = org.counters
        used = self.limits.credits.used()
        return {
            "datacenter": self.opts.datacenter,
            "credits_used": counters["credits_used"],
            "credits_used_24h": used,
            "credits_remaining": max(0, self.opts.credits_per_day - used),
            "tokens_issued": counters["tokens_issued"],
            "token_requests": counters["token_requests"],
            "token_throttled": counters["token_throttled"],
            "token_errors": counters["token_errors"],
            "write_calls": counters["write_calls"],
            "records_inserted": counters["records_inserted"],
            "records_updated": counters["records_updated"],
            "records_deleted": counters["records_deleted"],
            "record_errors": dict(org.record_errors),
            "duplicates": {name: store.duplicates() for name, store in org.stores.items()},
            "duplicates_by_field": {
                name: store.duplicates_by_field() for name, store in org.stores.items()
            },
            "records": {name: len(store.records) for name, store in org.stores.items()},
            "peak_concurrency": self.limits.calls.peak,
            "peak_sub_concurrency": self.limits.heavy.peak,
            "concurrency_rejections": counters["concurrency_rejections"],
            "credit_rejections": counters["credit_rejections"],
            "auth_failures": counters["auth_failures"],
            "notifications_sent": counters["notifications_sent"],
            "notifications_failed": counters["notifications_failed"],
            "notifications_skipped": counters["notifications_skipped"],
        }

    def fault_response(self, request: web.Request, kind: str) -> web.StreamResponse:
        if request.path.startswith("/oauth/"):
            if kind == "throttle":
                return self.auth.throttle_response()
            return web.json_response({"error": "internal_error"}, status=500)
        if kind == "throttle":
            return flat_error(429, "TOO_MANY_REQUESTS", TOO_MANY_REQUESTS_MESSAGE)
        return flat_error(500, "INTERNAL_ERROR", "Internal Server Error")

    @staticmethod
    def route_name(request: web.Request) -> str:
        parts = ["{id}" if ID_SEGMENT_RE.match(p) else p for p in request.path.split("/")]
        return f"{request.method} {'/'.join(parts)}"

    # -- dispatch -----------------------------------------------------------------------------

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._dispatch(request)
        except RequestError as exc:
            return exc.response()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        version = request.match_info["version"]
        parts = [p for p in request.match_info["tail"].split("/") if p]
        method = request.method
        if version != API_VERSION or not parts:
            return url_pattern_error()
        head = parts[0]
        records = self.records
        if head == "org" and len(parts) == 1:
            return self._method(method, {"GET": records.get_org}, request)
        if head == "users" and len(parts) == 1:
            return self._method(method, {"GET": records.get_users}, request)
        if head == "settings":
            if parts[1:] == ["modules"]:
                return self._method(method, {"GET": records.get_modules}, request)
            if parts[1:] == ["fields"]:
                return self._method(method, {"GET": records.get_fields}, request)
            return url_pattern_error()
        if head == "coql" and len(parts) == 1:
            if method != "POST":
                return bad_method()
            return await self.search.coql(request)
        if head == "actions" and parts[1:] == ["watch"]:
            watch: dict[str, Handler] = {
                "POST": self.notifications.watch_enable,
                "GET": self.notifications.watch_list,
                "PUT": self.notifications.watch_replace,
                "PATCH": self.notifications.watch_patch,
                "DELETE": self.notifications.watch_disable,
            }
            if method not in watch:
                return bad_method()
            return await watch[method](request)
        store = self.org.stores.get(head)
        if store is None:
            return flat_error(
                400,
                "INVALID_MODULE",
                "the module name given seems to be invalid",
                {"resource_path_index": 0},
            )
        if len(parts) == 1:
            if method == "GET":
                return records.get_records(request, store)
            if method == "POST":
                return await records.write(request, store, "insert")
            if method == "PUT":
                return await records.write(request, store, "update")
            if method == "DELETE":
                return records.delete_records(request, store)
            return bad_method()
        if len(parts) == 2:
            action = parts[1]
            if action == "upsert":
                if method != "POST":
                    return bad_method()
                return await records.write(request, store, "upsert")
            if action == "search":
                if method != "GET":
                    return bad_method()
                return self.search.search(request, store)
            if action == "deleted":
                if method != "GET":
                    return bad_method()
                return records.get_deleted(request, store)
            if method == "GET":
                return records.get_record(request, store, action)
            if method == "PUT":
                return await records.write(request, store, "update", path_id=action)
            if method == "DELETE":
                return records.delete_one(request, store, action)
            return bad_method()
        return url_pattern_error()

    @staticmethod
    def _method(
        method: str,
        handlers: dict[str, Callable[[web.Request], web.Response]],
        request: web.Request,
    ) -> web.Response:
        handler = handlers.get(method)
        if handler is None:
            return bad_method()
        return handler(request)

    async def on_cleanup(self, _: web.Application) -> None:
        await self.notifications.close()


EMULATOR_KEY = web.AppKey("zoho_crm", ZohoCrmEmulator)
"""``app[EMULATOR_KEY]`` is the emulator behind an app, for in-process tests."""


def create_app(**options: Any) -> web.Application:
    """The Zoho CRM emulator app; see :class:`ZohoOptions` for the options."""
    emulator = ZohoCrmEmulator(ZohoOptions(**options))
    app = web.Application(
        middlewares=[
            emulator.limits.gate_middleware(),
            fault_middleware(
                emulator.faults,
                emulator.call_stats,
                emulator.fault_response,
                emulator.route_name,
            ),
            emulator.limits.api_middleware(emulator.auth),
        ],
        client_max_size=32 * 1024 * 1024,
    )
    app[EMULATOR_KEY] = emulator
    app.router.add_post("/oauth/v2/token", emulator.auth.token)
    app.router.add_post("/oauth/v2/token/revoke", emulator.auth.revoke)
    app.router.add_route("*", "/crm/{version}/{tail:.*}", emulator.dispatch)
    add_common_control_routes(
        app, emulator.faults, emulator.call_stats, emulator.extra_stats, emulator.reset
    )
    emulator.control.register(app)
    app.on_cleanup.append(emulator.on_cleanup)
    return app


def main() -> None:
    serve_main(create_app, 8102)
