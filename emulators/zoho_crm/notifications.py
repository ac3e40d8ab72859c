"""Notifications: ``/crm/v8/actions/watch`` channels and the callbacks they POST.

``POST`` enables channels (201; 207 when some items fail), ``GET`` lists the live ones
(``page``, ``per_page``, ``channel_id``, ``module``), ``PUT`` replaces a channel's details
(those not given are removed), ``PATCH`` changes only the keys given (``_delete_events`` removes
events), ``DELETE ?channel_ids=`` disables. ``channel_expiry`` defaults to one hour and falls
back to that when more than a week ahead; ``token`` is at most 50 characters. Every change to a
watched module POSTs ``{"server_time", "query_params", "module", "resource_uri", "ids",
"affected_fields", "operation", "channel_id", "token"}`` to the channel's ``notify_url`` (only
local URLs are called; others are logged as skipped).
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
from aiohttp import web

from emulators.zoho_crm.errors import (
    RequestError,
    ZohoError,
    invalid_type,
    invalid_value,
    mandatory_missing,
)
from emulators.zoho_crm.options import (
    API_VERSION,
    DEFAULT_CHANNEL_EXPIRY_S,
    LOCAL_HOSTS,
    MAX_CHANNEL_EXPIRY_S,
    MAX_PER_PAGE,
    MAX_WATCH_EVENTS,
    MAX_WATCH_ITEMS,
    MAX_WATCH_TOKEN,
)
from emulators.zoho_crm.org import Org
from emulators.zoho_crm.schema import FieldDef
from emulators.zoho_crm.store import Change
from emulators.zoho_crm.wire import int_param, parse_datetime, read_json

Json = dict[str, Any]


@dataclass
class Watch:
    channel_id: str
    module: str
    events: set[str]
    notify_url: str
    token: str | None
    expires_at: float
    return_affected_field_values: bool
    notify_on_related_action: bool
    api_domain: str


class Notifications:
    """Channels, the callbacks they trigger, and the log of deliveries."""

    def __init__(self, org: Org) -> None:
        self.org = org
        self.watches: dict[tuple[str, str], Watch] = {}
        self.notification_log: deque[Json] = deque(maxlen=1000)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def reset(self) -> None:
        self.watches.clear()
        self.notification_log.clear()

    def channel(self, channel_id: str) -> dict[str, Watch]:
        """The watches (by module) of a subscribed channel. A channel past its expiry is gone
        unless the ``expired_channels_renewable`` option says otherwise."""
        now = self.org.now()
        renewable = self.org.opts.expired_channels_renewable
        return {
            module: w
            for (cid, module), w in self.watches.items()
            if cid == channel_id and (renewable or w.expires_at > now)
        }

    def _drop(self, channel_id: str) -> None:
        for key in [k for k in self.watches if k[0] == channel_id]:
            del self.watches[key]

    def _drop_expired(self, channel_id: str) -> None:
        now = self.org.now()
        for key in [k for k, w in self.watches.items() if k[0] == channel_id]:
            if self.watches[key].expires_at <= now:
                del self.watches[key]

    def expire(self, channel_id: str | None = None) -> int:
        """Control: every live channel (or the one given) expires now; returns how many."""
        now = self.org.now()
        expired: set[str] = set()
        for watch in self.watches.values():
            if channel_id is not None and watch.channel_id != channel_id:
                continue
            if watch.expires_at > now:
                watch.expires_at = now
                expired.add(watch.channel_id)
        return len(expired)

    # -- notifications ------------------------------------------------------------------------

    def _watch_item(self, item: Any, index: int, request: web.Request, partial: bool) -> Json:
        """Validate one ``watch`` item; returns normalized values or raises ZohoError."""
        if not isinstance(item, dict):
            raise ZohoError(
                "INVALID_DATA",
                "invalid data",
                {"expected_data_type": "jsonobject", "json_path": f"$.watch[{index}]"},
            )
        path = f"$.watch[{index}]"
        out: Json = {}
        channel_id = item.get("channel_id")
        if channel_id is None:
            raise mandatory_missing("channel_id", f"{path}.channel_id")
        if isinstance(channel_id, bool) or not re.fullmatch(r"\d{1,19}", str(channel_id)):
            raise ZohoError(
                "INVALID_DATA",
                "invalid data",
                {
                    "expected_data_type": "long",
                    "api_name": "channel_id",
                    "json_path": f"{path}.channel_id",
                },
            )
        out["channel_id"] = str(channel_id)
        events = item.get("events")
        if events is None and not partial:
            raise mandatory_missing("events", f"{path}.events")
        if events is not None:
            if not isinstance(events, list) or not events:
                raise ZohoError(
                    "INVALID_DATA",
                    "invalid data",
                    {
                        "expected_data_type": "jsonarray",
                        "api_name": "events",
                        "json_path": f"{path}.events",
                    },
                )
            if len(events) > MAX_WATCH_EVENTS:
                raise ZohoError(
                    "LIMIT_EXCEEDED",
                    "limit exceeded",
                    {
                        "limit": MAX_WATCH_EVENTS,
                        "api_name": "events",
                        "json_path": f"{path}.events",
                    },
                )
            parsed: dict[str, set[str]] = {}
            for event_index, event in enumerate(events):
                module, _, operation = str(event).rpartition(".")
                if module not in self.org.modules or operation not in (
                    "create",
                    "edit",
                    "delete",
                    "all",
                ):
                    raise invalid_value("events", f"{path}.events[{event_index}]")
                ops = {"create", "edit", "delete"} if operation == "all" else {operation}
                parsed.setdefault(module, set()).update(ops)
            out["events"] = parsed
        notify_url = item.get("notify_url")
        if notify_url is None and not partial:
            raise mandatory_missing("notify_url", f"{path}.notify_url")
        if notify_url is not None:
            if not isinstance(notify_url, str) or not urlsplit(notify_url).scheme.startswith(
                "http"
            ):
                raise invalid_value("notify_url", f"{path}.notify_url")
            out["notify_url"] = notify_url
        if "token" in item:
            token = item["token"]
            if token is not None and (not isinstance(token, str) or len(token) > MAX_WATCH_TOKEN):
                raise invalid_value("token", f"{path}.token", maximum_length=MAX_WATCH_TOKEN)
            out["token"] = token
        now = self.org.now()
        if item.get("channel_expiry") is not None or not partial:
            expiry_raw = item.get("channel_expiry")
            expiry = now + DEFAULT_CHANNEL_EXPIRY_S
            if expiry_raw is not None:
                parsed_expiry = parse_datetime(expiry_raw) if isinstance(expiry_raw, str) else None
                fractional = isinstance(expiry_raw, str) and bool(
                    re.search(r"T\d{2}:\d{2}:\d{2}\.\d", expiry_raw)
                )
                if (
                    parsed_expiry is None
                    or parsed_expiry <= now
                    or (fractional and self.org.opts.reject_fractional_channel_expiry)
                ):
                    raise invalid_value("channel_expiry", f"{path}.channel_expiry")
                if parsed_expiry <= now + MAX_CHANNEL_EXPIRY_S:
                    expiry = parsed_expiry
            out["expires_at"] = expiry
        for flag in ("return_affected_field_values", "notify_on_related_action"):
            if flag in item:
                if not isinstance(item[flag], bool):
                    raise invalid_type(FieldDef(flag, "boolean"), f"{path}.{flag}")
                out[flag] = item[flag]
        if item.get("_delete_events") is True:
            out["_delete_events"] = True
        return out

    def _watch_details(self, watch: Watch) -> Json:
        return {
            "channel_expiry": self.org.fmt_time(watch.expires_at),
            "resource_uri": f"{watch.api_domain}/crm/{API_VERSION}/{watch.module}",
            "resource_id": self.org.modules[watch.module].id,
            "resource_name": watch.module,
            "channel_id": watch.channel_id,
        }

    async def _watch_body(self, request: web.Request) -> list[Any]:
        body = await read_json(request)
        items = body.get("watch") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise RequestError(
                400,
                "MANDATORY_NOT_FOUND",
                "required field not found",
                {"api_name": "watch", "json_path": "$.watch"},
            )
        if len(items) > MAX_WATCH_ITEMS:
            raise RequestError(
                400,
                "LIMIT_EXCEEDED",
                "limit exceeded",
                {"limit": MAX_WATCH_ITEMS, "api_name": "watch"},
            )
        return items

    @staticmethod
    def _multi_status(results: list[Json], ok: int) -> int:
        successes = sum(1 for r in results if r["status"] == "success")
        return ok if successes == len(results) else 207 if successes else 400

    async def watch_enable(self, request: web.Request) -> web.Response:
        items = await self._watch_body(request)
        results: list[Json] = []
        for index, item in enumerate(items):
            try:
                values = self._watch_item(item, index, request, partial=False)
            except ZohoError as exc:
                results.append(exc.body)
                continue
            self._drop_expired(values["channel_id"])
            events = []
            for module, ops in values["events"].items():
                watch = Watch(
                    channel_id=values["channel_id"],
                    module=module,
                    events=set(ops),
                    notify_url=values["notify_url"],
                    token=values.get("token"),
                    expires_at=values["expires_at"],
                    return_affected_field_values=values.get("return_affected_field_values", False),
                    notify_on_related_action=values.get("notify_on_related_action", True),
                    api_domain=self.org.api_domain(request),
                )
                self.watches[(watch.channel_id, module)] = watch
                events.append(self._watch_details(watch))
            results.append(
                {
                    "code": "SUCCESS",
                    "details": {"events": events},
                    "message": "Successfully subscribed for actions-watch of the given module",
                    "status": "success",
                }
            )
        return web.json_response({"watch": results}, status=self._multi_status(results, 201))

    async def watch_replace(self, request: web.Request) -> web.Response:
        items = await self._watch_body(request)
        results: list[Json] = []
        for index, item in enumerate(items):
            try:
                values = self._watch_item(item, index, request, partial=False)
            except ZohoError as exc:
                results.append(exc.body)
                continue
            channel_id = values["channel_id"]
            if not self.channel(channel_id):
                results.append(self._not_subscribed(channel_id, index))
                continue
            self._drop(channel_id)
            events = []
            for module, ops in values["events"].items():
                watch = Watch(
                    channel_id=channel_id,
                    module=module,
                    events=set(ops),
                    notify_url=values["notify_url"],
                    token=values.get("token"),
                    expires_at=values["expires_at"],
                    return_affected_field_values=values.get("return_affected_field_values", False),
                    notify_on_related_action=values.get("notify_on_related_action", True),
                    api_domain=self.org.api_domain(request),
                )
                self.watches[(channel_id, module)] = watch
                events.append(self._watch_details(watch))
            results.append(
                {
                    "code": "SUCCESS",
                    "details": {"events": events},
                    "message": "Successfully updated the subscribe details",
                    "status": "success",
                }
            )
        return web.json_response({"watch": results}, status=self._multi_status(results, 200))

    @staticmethod
    def _not_subscribed(channel_id: str, index: int) -> Json:
        return ZohoError(
            "NOT_SUBSCRIBED",
            "not subscribed for actions-watch of the given channel",
            {
                "api_name": "channel_id",
                "json_path": f"$.watch[{index}].channel_id",
                "id": channel_id,
            },
        ).body

    async def watch_patch(self, request: web.Request) -> web.Response:
        items = await self._watch_body(request)
        results: list[Json] = []
        for index, item in enumerate(items):
            try:
                values = self._watch_item(item, index, request, partial=True)
            except ZohoError as exc:
                results.append(exc.body)
                continue
            channel_id = values["channel_id"]
            current = self.channel(channel_id)
            if not current:
                results.append(self._not_subscribed(channel_id, index))
                continue
            template = next(iter(current.values()))
            for module, ops in values.get("events", {}).items():
                watch = current.get(module)
                if values.get("_delete_events"):
                    if watch is not None:
                        watch.events -= ops
                        if not watch.events:
                            del self.watches[(channel_id, module)]
                            del current[module]
                    continue
                if watch is None:
                    watch = Watch(**{**template.__dict__, "module": module, "events": set()})
                    self.watches[(channel_id, module)] = watch
                    current[module] = watch
                watch.events |= ops
            for watch in current.values():
                if "notify_url" in values:
                    watch.notify_url = values["notify_url"]
                if "token" in values:
                    watch.token = values["token"]
                if "expires_at" in values:
                    watch.expires_at = values["expires_at"]
                for flag in ("return_affected_field_values", "notify_on_related_action"):
                    if flag in values:
                        setattr(watch, flag, values[flag])
            results.append(
                {
                    "code": "SUCCESS",
                    "details": {"events": [self._watch_details(w) for w in current.values()]},
                    "message": "Successfully updated the subscribe details",
                    "status": "success",
                }
            )
        return web.json_response({"watch": results}, status=self._multi_status(results, 200))

    async def watch_list(self, request: web.Request) -> web.Response:
        now = self.org.now()
        channel_id = request.query.get("channel_id")
        module = request.query.get("module")
        per_page = min(int_param(request, "per_page", MAX_PER_PAGE), MAX_PER_PAGE)
        page = int_param(request, "page", 1)
        rows = [
            w
            for w in self.watches.values()
            if w.expires_at > now
            and (channel_id is None or w.channel_id == channel_id)
            and (module is None or w.module == module)
        ]
        window = rows[(page - 1) * per_page : page * per_page]
        if not window:
            return web.Response(status=204)
        data = [
            {
                "notify_on_related_action": w.notify_on_related_action,
                "channel_expiry": self.org.fmt_time(w.expires_at),
                "return_affected_field_values": w.return_affected_field_values,
                "resource_uri": f"{w.api_domain}/crm/{API_VERSION}/{w.module}",
                "resource_id": self.org.modules[w.module].id,
                "notify_url": w.notify_url,
                "resource_name": w.module,
                "fields": None,
                "notification_condition": None,
                "channel_id": w.channel_id,
                "events": sorted(f"{w.module}.{op}" for op in w.events),
                "token": w.token,
            }
            for w in window
        ]
        return web.json_response(
            {
                "watch": data,
                "info": {
                    "per_page": per_page,
                    "count": len(data),
                    "page": page,
                    "more_records": page * per_page < len(rows),
                },
            }
        )

    async def watch_disable(self, request: web.Request) -> web.Response:
        raw = request.query.get("channel_ids", "")
        channel_ids = [c.strip() for c in raw.split(",") if c.strip()]
        if not channel_ids:
            raise RequestError(
                400,
                "REQUIRED_PARAM_MISSING",
                "required param is missing",
                {"param_name": "channel_ids"},
            )
        results: list[Json] = []
        for index, channel_id in enumerate(channel_ids):
            current = self.channel(channel_id)
            self._drop(channel_id)
            if not current:
                results.append(self._not_subscribed(channel_id, index))
                continue
            for watch in current.values():
                results.append(
                    {
                        "code": "SUCCESS",
                        "details": {
                            "resource_uri": f"{watch.api_domain}/crm/{API_VERSION}/{watch.module}",
                            "resource_id": self.org.modules[watch.module].id,
                            "channel_id": channel_id,
                        },
                        "message": "Successfully un-subscribed from actions-watch",
                        "status": "success",
                    }
                )
        return web.json_response({"watch": results}, status=self._multi_status(results, 200))

    def notify(self, changes: list[Change]) -> None:
        """POST one callback per channel, module and operation; fire and forget."""
        if not changes or not self.watches:
            return
        now = self.org.now()
        grouped: dict[tuple[str, str], list[Change]] = {}
        for change in changes:
            grouped.setdefault((change.module, change.operation), []).append(change)
        event_of = {"insert": "create", "update": "edit", "delete": "delete"}
        for (module, operation), items in grouped.items():
            for watch in list(self.watches.values()):
                if (
                    watch.module != module
                    or watch.expires_at <= now
                    or event_of[operation] not in watch.events
                ):
                    continue
                url = urlsplit(watch.notify_url)
                payload = {
                    "server_time": int(now * 1000),
                    "query_params": dict(parse_qsl(url.query)),
                    "module": module,
                    # Zoho's documented callbacks carry /crm/v2/ whatever the API version
                    "resource_uri": f"{watch.api_domain}/crm/v2/{module}",
                    "ids": [c.rid for c in items],
                    "affected_fields": (
                        [{c.rid: c.fields} for c in items if operation == "update"]
                        if watch.return_affected_field_values
                        else []
                    ),
                    "operation": operation,
                    "channel_id": watch.channel_id,
                    "token": watch.token,
                }
                entry: Json = {
                    "channel_id": watch.channel_id,
                    "notify_url": watch.notify_url,
                    "module": module,
                    "operation": operation,
                    "ids": payload["ids"],
                    "status": None,
                }
                self.notification_log.append(entry)
                if url.hostname not in LOCAL_HOSTS:
                    entry["status"] = "skipped: only local callback URLs are called"
                    self.org.counters["notifications_skipped"] += 1
                    continue
                task = asyncio.get_running_loop().create_task(
                    self._deliver(watch.notify_url, payload, entry)
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, payload: Json, entry: Json) -> None:
        try:
            if self._session is None or self._session.closed:
                self._session = aiohttp.ClientSession()
            timeout = aiohttp.ClientTimeout(total=self.org.opts.notify_timeout_s)
            async with self._session.post(url, json=payload, timeout=timeout) as response:
                await response.read()
                entry["status"] = response.status
            self.org.counters["notifications_sent"] += 1
        except Exception as exc:
            entry["status"] = f"error: {exc!r}"
            self.org.counters["notifications_failed"] += 1

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
