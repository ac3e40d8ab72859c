"""The control API under ``/_control`` (never faulted, counted or charged).

Besides ``GET /stats``, ``POST /faults`` and ``POST /reset`` from :mod:`emulators.kit.control`
(``faults`` also takes ``lock_rate`` and ``lock_next``: UNABLE_TO_LOCK_ROW on records):

- ``GET  /_control/counts``                  records per object, write calls by route
- ``GET  /_control/duplicates``              values held by more than one record, per field
- ``POST /_control/seed``                    ``{"object", "records": [...]}`` or
  ``{"object", "count", "fields": {...}}``; ``"allow_duplicates": true`` skips unique checks
- ``GET  /_control/records/{object}``        full records (``?limit=&offset=``)
- ``GET  /_control/records/{object}/{id}``   one full record
- ``POST /_control/expire_sessions``         ``{"access_token"?}``: expire all (or one) now
- ``GET|POST /_control/limits``              ``{"used", "max"}``: the daily API allocation
- ``POST /_control/fields``                  ``{"object", "fields": [describe-style specs]}``
- ``POST /_control/stages``                  ``{"stages": [...], "restricted": bool}``
- ``GET|POST|DELETE /_control/duplicate_rules``  ``{"object", "fields", "action"}``
- ``GET|POST /_control/config``              read / change options at run time
- ``POST /_control/advance``                 ``{"seconds": n}``: move the org's clock
- ``POST /_control/clients``                 ``{"client_id", "client_secret"}``: register an app
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from emulators.kit import CONTROL_PREFIX, bad_request, json_body
from emulators.salesforce.describe import NUMBER_TYPES, TEXT_TYPES, ObjectDef, field_from_spec
from emulators.salesforce.errors import ApiError, RecordError, normalize_id
from emulators.salesforce.options import RUNTIME_OPTIONS
from emulators.salesforce.org import Org
from emulators.salesforce.records import Store

Json = dict[str, Any]


class Control:
    def __init__(self, org: Org, version: str) -> None:
        self.org = org
        self.version = version

    def _store(self, name: Any, write: bool = False) -> Store:
        store = self.org.store(name) if isinstance(name, str) else None
        if store is None or (write and not store.obj.writable):
            known = sorted(s.obj.name for s in self.org.data_stores)
            raise bad_request(f"unknown or read-only object {name!r}; writable: {known}")
        return store

    async def counts(self, _: web.Request) -> web.Response:
        org = self.org
        return web.json_response(
            {
                "records": {s.obj.name: len(s.records) for s in org.data_stores},
                "write_calls": dict(org.write_calls),
                "write_calls_total": sum(org.write_calls.values()),
                "records_created": org.counters["records_created"],
                "records_updated": org.counters["records_updated"],
                "record_errors": dict(org.record_errors),
                "api_usage": org.usage.as_dict(),
            }
        )

    async def duplicates(self, _: web.Request) -> web.Response:
        return web.json_response(
            {"duplicates": self.org.duplicates(), "total": self.org.duplicate_total()}
        )

    def _generated(self, obj: ObjectDef, n: int) -> Json:
        values: Json = {}
        for fdef in obj.fields.values():
            if not (fdef.required_on_create or fdef.external_id):
                continue
            if fdef.type == "picklist" and fdef.picklist:
                values[fdef.name] = fdef.picklist[0]
            elif fdef.type in TEXT_TYPES:
                values[fdef.name] = f"SEED-{n:06d}" if fdef.external_id else f"Seed {obj.label} {n}"
            elif fdef.type == "date":
                values[fdef.name] = self.org.today().isoformat()
            elif fdef.type in NUMBER_TYPES:
                values[fdef.name] = n
        return values

    async def seed(self, request: web.Request) -> web.Response:
        org = self.org
        body = await json_body(request)
        store = self._store(body.get("object"), write=True)
        obj = store.obj
        records = body.get("records")
        if records is None:
            count = int(body.get("count", 0))
            base = len(store.records)
            overrides = body.get("fields") or {}
            records = [{**self._generated(obj, base + i + 1), **overrides} for i in range(count)]
        if not isinstance(records, list):
            raise bad_request("records must be a list")
        check_unique = not body.get("allow_duplicates", False)
        ids = []
        for index, item in enumerate(records):
            try:
                parsed = org.parse_record(obj, item)
                given = parsed.values.pop("Id", None)
                if given is not None:
                    rid = normalize_id(given)
                    if rid is None or not rid.startswith(obj.key_prefix) or rid in store.records:
                        raise bad_request(
                            f"record {index}: Id {given!r} is not a new {obj.name} id"
                        )
                record = org.save(
                    store,
                    parsed,
                    None,
                    version=self.version,
                    seed=True,
                    check_unique=check_unique,
                )
                if given is not None:
                    store.remove(record["Id"])
                    record["Id"] = rid
                    store.put(record)
            except (ApiError, RecordError) as exc:
                raise bad_request(f"record {index}: {exc.code}: {exc.message}") from None
            ids.append(record["Id"])
        return web.json_response({"object": obj.name, "ids": ids, "count": len(ids)})

    async def records(self, request: web.Request) -> web.Response:
        store = self._store(request.match_info["object"])
        offset = int(request.query.get("offset", 0))
        limit = request.query.get("limit")
        rows = list(store.records.values())
        rows = rows[offset : offset + int(limit)] if limit else rows[offset:]
        return web.json_response(
            {
                "object": store.obj.name,
                "count": len(store.records),
                "records": [self.org.render_record(store.obj, r, self.version) for r in rows],
            }
        )

    async def record(self, request: web.Request) -> web.Response:
        store = self._store(request.match_info["object"])
        rid = normalize_id(request.match_info["id"])
        record = store.records.get(rid) if rid else None
        if record is None:
            raise web.HTTPNotFound(
                text=json.dumps({"error": f"no {store.obj.name} {request.match_info['id']}"}),
                content_type="application/json",
            )
        return web.json_response(self.org.render_record(store.obj, record, self.version))

    async def expire_sessions(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        return web.json_response({"expired": self.org.sessions.expire(body.get("access_token"))})

    async def limits(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            body = await json_body(request)
            self.org.usage.set(body.get("used"), body.get("max"))
        return web.json_response(self.org.usage.as_dict())

    async def fields(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        store = self._store(body.get("object"))
        obj = store.obj
        changed = []
        for spec in body.get("fields") or []:
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise bad_request(f"a field spec needs a name: {spec!r}")
            previous = obj.field(spec["name"])
            if previous is None and not spec["name"].endswith("__c"):
                raise bad_request(f"a new custom field's name must end in __c: {spec['name']!r}")
            try:
                fdef = field_from_spec(spec, previous)
            except (ValueError, TypeError) as exc:
                raise bad_request(str(exc)) from None
            if previous is not None and previous.name.lower() != fdef.name.lower():
                raise bad_request("a field cannot be renamed")
            obj.add(fdef)
            changed.append(fdef.describe())
        store.rebuild_indexes()
        return web.json_response({"object": obj.name, "fields": changed})

    def _apply_stages(self) -> None:
        opportunity = self.org.schema.get("opportunity")
        stage = opportunity.field("StageName") if opportunity else None
        if stage is not None:
            stage.picklist = [s["value"] for s in self.org.opts.stages]
            stage.restricted = self.org.opts.stage_picklist_restricted

    async def stages(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        opts = self.org.opts
        if "stages" in body:
            stages = []
            for item in body["stages"]:
                entry = {"value": item} if isinstance(item, str) else dict(item)
                if not isinstance(entry.get("value"), str):
                    raise bad_request(f"a stage needs a value: {item!r}")
                stages.append(entry)
            opts.stages = stages
        if "restricted" in body:
            opts.stage_picklist_restricted = bool(body["restricted"])
        self._apply_stages()
        return web.json_response(
            {"stages": opts.stages, "restricted": opts.stage_picklist_restricted}
        )

    async def duplicate_rules(self, request: web.Request) -> web.Response:
        org = self.org
        if request.method == "DELETE":
            org.duplicate_rules.clear()
        elif request.method == "POST":
            body = await json_body(request)
            store = self._store(body.get("object"))
            names = body.get("fields")
            if not isinstance(names, list) or not names:
                raise bad_request("a duplicate rule needs a list of fields")
            for name in names:
                if store.obj.field(name) is None:
                    raise bad_request(f"no field {name!r} on {store.obj.name}")
            action = body.get("action", "block")
            if action not in ("block", "alert"):
                raise bad_request("action must be 'block' or 'alert'")
            org.duplicate_rules.append({**body, "object": store.obj.name, "action": action})
        return web.json_response({"rules": org.duplicate_rules})

    async def config(self, request: web.Request) -> web.Response:
        opts = self.org.opts
        if request.method == "POST":
            body = await json_body(request)
            for name, value in body.items():
                if name not in RUNTIME_OPTIONS:
                    raise bad_request(f"unknown or fixed option {name!r}")
                setattr(opts, name, value)
            if "stages" in body or "stage_picklist_restricted" in body:
                self._apply_stages()
        return web.json_response({name: getattr(opts, name) for name in sorted(RUNTIME_OPTIONS)})

    async def advance(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        self.org.advance(float(body.get("seconds", 0)))
        return web.json_response({"now": self.org.now()})

    async def clients(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        client_id, secret = body.get("client_id"), body.get("client_secret")
        if not isinstance(client_id, str) or not isinstance(secret, str):
            raise bad_request("client_id and client_secret are needed")
        self.org.opts.clients[client_id] = secret
        return web.json_response({"client_id": client_id})

    def register(self, app: web.Application) -> None:
        c = CONTROL_PREFIX
        app.router.add_get(f"{c}/counts", self.counts)
        app.router.add_get(f"{c}/duplicates", self.duplicates)
        app.router.add_post(f"{c}/seed", self.seed)
        app.router.add_get(f"{c}/records/{{object}}", self.records)
        app.router.add_get(f"{c}/records/{{object}}/{{id}}", self.record)
        app.router.add_post(f"{c}/expire_sessions", self.expire_sessions)
        app.router.add_post(f"{c}/expire_tokens", self.expire_sessions)
        app.router.add_route("*", f"{c}/limits", self.limits)
        app.router.add_post(f"{c}/fields", self.fields)
        app.router.add_post(f"{c}/stages", self.stages)
        app.router.add_route("*", f"{c}/duplicate_rules", self.duplicate_rules)
        app.router.add_route("*", f"{c}/config", self.config)
        app.router.add_post(f"{c}/advance", self.advance)
        app.router.add_post(f"{c}/clients", self.clients)
