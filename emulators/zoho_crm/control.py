"""The control API under ``/_control`` (never faulted, counted or charged).

Besides ``stats``, ``faults`` and ``reset`` from :mod:`emulators.kit.control`:

- ``POST /_control/fields``            ``{"module", "fields": [{"api_name", "data_type", ...}]}``
- ``POST /_control/seed``              ``{"module", "records": [...]}`` or ``{"module", "count"}``
- ``GET  /_control/records/{module}``  full records (``?limit=&offset=``)
- ``GET|PATCH|DELETE /_control/records/{module}/{id}``  read / change / delete as a CRM user
- ``POST /_control/expire_tokens``     (alias ``/_control/token_expire``) expire access tokens:
  all, or ``{"access_token"}`` / ``{"refresh_token"}`` / ``{"client_id"}``
- ``POST /_control/refresh_tokens``    ``{"refresh_token", "client_id"}`` register one
- ``GET|POST|DELETE /_control/reject`` ``{"module", "field", "value"}``: such records fail
- ``GET|POST /_control/config``        read / change options at run time
- ``POST /_control/advance``           ``{"seconds": n}`` move the emulator clock forward (tokens,
  page tokens, credits and channels expire by it)
- ``GET  /_control/channels``          every channel with its expiry (``expired``: past it)
- ``POST /_control/channels/expire``   ``{"channel_id"?}``: expire one channel (or all) now
- ``GET  /_control/notifications``     the callbacks sent (or skipped) and their answers
- ``GET  /_control/counts``            records per module and write calls: what ``stats`` says
  without its duplicate count, which walks every record (for progress checks during a load)
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from emulators.kit import (
    CONTROL_PREFIX,
    Clock,
    add_clock_route,
    add_token_control_routes,
    json_body,
)
from emulators.zoho_crm.auth import ZohoAuth
from emulators.zoho_crm.errors import ZohoError
from emulators.zoho_crm.notifications import Notifications
from emulators.zoho_crm.options import RUNTIME_OPTIONS
from emulators.zoho_crm.org import Org
from emulators.zoho_crm.schema import DATA_TYPES, DEFAULT_LENGTHS, FieldDef
from emulators.zoho_crm.store import Change, ModuleStore

Json = dict[str, Any]


class ZohoControl:
    def __init__(self, org: Org, auth: ZohoAuth, notifications: Notifications) -> None:
        self.org = org
        self.auth = auth
        self.notifications = notifications

    def register(self, app: web.Application) -> None:
        control = CONTROL_PREFIX
        app.router.add_post(f"{control}/fields", self.control_fields)
        app.router.add_post(f"{control}/seed", self.control_seed)
        app.router.add_get(f"{control}/records/{{module}}", self.control_records)
        app.router.add_route("*", f"{control}/records/{{module}}/{{id}}", self.control_record)
        add_token_control_routes(app, self.auth.tokens, ("expire_tokens", "token_expire"))
        app.router.add_post(f"{control}/refresh_tokens", self.control_refresh_tokens)
        app.router.add_route("*", f"{control}/reject", self.control_reject)
        app.router.add_route("*", f"{control}/config", self.control_config)
        add_clock_route(app, self.org.clock, "advance", self.describe_clock)
        app.router.add_get(f"{control}/counts", self.control_counts)
        app.router.add_get(f"{control}/channels", self.control_channels)
        app.router.add_post(f"{control}/channels/expire", self.control_expire_channels)
        app.router.add_get(f"{control}/notifications", self.control_notifications)

    def describe_clock(self, clock: Clock) -> Json:
        return {"now": self.org.fmt_time(clock.now()), "skew_s": clock.skew}

    async def control_expire_channels(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        channel_id = body.get("channel_id")
        expired = self.notifications.expire(None if channel_id is None else str(channel_id))
        return web.json_response({"expired": expired})

    def _control_store(self, module: Any) -> ModuleStore:
        store = self.org.stores.get(module) if isinstance(module, str) else None
        if store is None:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": f"unknown module {module!r}"}),
                content_type="application/json",
            )
        return store

    async def control_fields(self, request: web.Request) -> web.Response:
        body = await request.json()
        module = body.get("module")
        specs = body.get("fields") or []
        if module in self.org.subforms:
            defs = self.org.subforms[module]
            store = None
        else:
            store = self._control_store(module)
            defs = store.mdef.fields
        added = []
        for spec in specs:
            data_type = spec.get("data_type", "text")
            api_name = spec.get("api_name")
            if not isinstance(api_name, str) or data_type not in DATA_TYPES:
                raise web.HTTPBadRequest(text=f"bad field spec {spec!r}")
            lookup = spec.get("lookup") or spec.get("lookup_module")
            if data_type == "lookup" and lookup not in self.org.modules:
                raise web.HTTPBadRequest(text=f"lookup field needs a module: {spec!r}")
            previous = defs.get(api_name)
            fdef = FieldDef(
                api_name=api_name,
                data_type=data_type,
                label=spec.get("field_label") or api_name.replace("_", " "),
                length=spec.get("length", DEFAULT_LENGTHS.get(data_type)),
                system_mandatory=bool(spec.get("system_mandatory", False)),
                unique=bool(spec.get("unique", False)),
                external=bool(spec.get("external", False)),
                read_only=bool(spec.get("read_only", False)),
                lookup_module=lookup if data_type == "lookup" else None,
                pick_list_values=tuple(spec.get("pick_list_values") or ()),
                custom=previous.custom if previous else True,
                id=previous.id if previous else self.org.field_ids(),
            )
            defs[api_name] = fdef
            added.append(fdef.metadata(self.org.modules))
        if store is not None:
            store.mdef.refresh()
            store.rebuild_indexes()
            store.changed()
        return web.json_response({"module": module, "fields": added})

    async def control_seed(self, request: web.Request) -> web.Response:
        body = await request.json()
        store = self._control_store(body.get("module"))
        records = body.get("records")
        if records is None:
            count = int(body.get("count", 0))
            base = len(store.records)
            overrides = body.get("fields") or {}
            records = [
                {**self.org.generated_values(store, base + i + 1), **overrides}
                for i in range(count)
            ]
        external = self.org.parse_external_header(request, store.mdef.api_name)
        ids = []
        changes = []
        for index, item in enumerate(records):
            try:
                values = self.org.prepare(store, item, index, external, None, allow_read_only=True)
            except ZohoError as exc:
                return web.json_response({"error": exc.body, "index": index}, status=400)
            rid = str(item["id"]) if item.get("id") else None
            if rid is not None and rid in store.records:
                return web.json_response({"error": f"id {rid} exists", "index": index}, status=400)
            record = self.org.create_record(store, values, rid)
            ids.append(record["id"])
            changes.append(Change(store.mdef.api_name, "insert", record["id"], list(values)))
        if body.get("notify"):
            self.notifications.notify(changes)
        return web.json_response({"module": store.mdef.api_name, "ids": ids, "count": len(ids)})

    async def control_records(self, request: web.Request) -> web.Response:
        store = self._control_store(request.match_info["module"])
        offset = int(request.query.get("offset", 0))
        limit = request.query.get("limit")
        rows = list(store.records.values())
        rows = rows[offset : offset + int(limit)] if limit else rows[offset:]
        return web.json_response(
            {
                "module": store.mdef.api_name,
                "count": len(store.records),
                "data": [self.org.full(store, r) for r in rows],
            }
        )

    async def control_record(self, request: web.Request) -> web.Response:
        store = self._control_store(request.match_info["module"])
        rid = request.match_info["id"]
        record = store.records.get(rid)
        if record is None:
            raise web.HTTPNotFound(text=f"no {store.mdef.api_name} record {rid}")
        if request.method == "GET":
            return web.json_response(self.org.full(store, record))
        if request.method == "DELETE":
            self.org.delete_record(store, rid)
            self.notifications.notify([Change(store.mdef.api_name, "delete", rid, [])])
            return web.json_response({"deleted": rid})
        body = await request.json()
        external = self.org.parse_external_header(request, store.mdef.api_name)
        try:
            values = self.org.prepare(store, body, 0, external, record, allow_read_only=True)
            self.org.check_mandatory(store, values, 0, creating=False)
            self.org.check_unique(store, values, 0, rid)
        except ZohoError as exc:
            return web.json_response({"error": exc.body}, status=400)
        changed = self.org.update_record(store, record, values)
        self.notifications.notify([Change(store.mdef.api_name, "update", rid, changed)])
        return web.json_response(self.org.full(store, record))

    async def control_refresh_tokens(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        client_id = body.get("client_id") or self.auth.default_client()
        token = self.auth.register_refresh_token(
            client_id, body.get("refresh_token") or None, body.get("client_secret")
        )
        return web.json_response({"refresh_token": token, "client_id": client_id})

    async def control_reject(self, request: web.Request) -> web.Response:
        if request.method == "DELETE":
            self.org.reject_rules.clear()
        elif request.method == "POST":
            body = await request.json()
            self._control_store(body.get("module"))
            self.org.reject_rules.append((body["module"], body["field"], str(body["value"])))
        return web.json_response(
            {"rules": [{"module": m, "field": f, "value": v} for m, f, v in self.org.reject_rules]}
        )

    async def control_config(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            body = await request.json()
            for name, value in body.items():
                if name not in RUNTIME_OPTIONS:
                    raise web.HTTPBadRequest(text=f"unknown or fixed option {name!r}")
                setattr(self.org.opts, name, value)
        return web.json_response(
            {name: getattr(self.org.opts, name) for name in sorted(RUNTIME_OPTIONS)}
        )

    async def control_counts(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "records": {name: len(store.records) for name, store in self.org.stores.items()},
                "write_calls": self.org.counters["write_calls"],
            }
        )

    async def control_channels(self, request: web.Request) -> web.Response:
        now = self.org.now()
        return web.json_response(
            {
                "channels": [
                    {
                        "channel_id": w.channel_id,
                        "module": w.module,
                        "events": sorted(w.events),
                        "notify_url": w.notify_url,
                        "token": w.token,
                        "channel_expiry": self.org.fmt_time(w.expires_at),
                        "expires_in_s": round(w.expires_at - now, 3),
                        "expired": w.expires_at <= now,
                    }
                    for w in self.notifications.watches.values()
                ]
            }
        )

    async def control_notifications(self, request: web.Request) -> web.Response:
        return web.json_response({"notifications": list(self.notifications.notification_log)})
