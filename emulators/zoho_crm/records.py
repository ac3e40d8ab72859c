"""The records API: org and metadata, list / get / deleted, insert / update / upsert, delete.

Reads page with ``page`` up to 2,000 records and with ``page_token`` beyond (bound to the query,
valid 24 hours); writes take at most 100 records and answer per record, in input order (201 all
inserted, 200 all updated, 207 mixed, 400 all failed, 412 all ALREADY_MODIFIED).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from emulators.zoho_crm.errors import (
    RequestError,
    ZohoError,
    invalid_value,
    mandatory_missing,
    wrapped_error,
)
from emulators.zoho_crm.notifications import Notifications
from emulators.zoho_crm.options import (
    DISCRETE_PAGE_LIMIT,
    MAX_PAGE_TOKENS,
    MAX_PER_PAGE,
    MAX_WRITE_RECORDS,
    PAGE_TOKEN_TTL_S,
    SORTABLE,
    TOKEN_PAGE_LIMIT,
)
from emulators.zoho_crm.org import Org
from emulators.zoho_crm.store import Change, ModuleStore
from emulators.zoho_crm.wire import (
    BAD_BODY,
    if_modified_since,
    int_param,
    parse_http_time,
    read_json,
)

Json = dict[str, Any]


@dataclass
class PageToken:
    signature: tuple[Any, ...]
    offset: int
    expires_at: float


class RecordsApi:
    """Handlers of ``/crm/v8/{module}...``, ``/org``, ``/users`` and ``/settings``."""

    def __init__(self, org: Org, notifications: Notifications) -> None:
        self.org = org
        self.notifications = notifications
        self.page_tokens: OrderedDict[str, PageToken] = OrderedDict()

    def reset(self) -> None:
        self.page_tokens.clear()

    # -- settings / org -----------------------------------------------------------------------

    def get_org(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "org": [
                    {
                        "id": f"{self.org.opts.org_id}000000000001",
                        "company_name": "ml-connector emulator",
                        "domain_name": f"org{self.org.opts.org_id}",
                        "primary_email": self.org.user["email"],
                        "primary_zuid": "700000001",
                        "zgid": f"{self.org.opts.org_id}01",
                        "country_code": self.org.opts.datacenter,
                        "currency": "US Dollar - USD",
                        "iso_code": "USD",
                        "currency_symbol": "$",
                        "time_zone": "UTC" if not self.org.opts.utc_offset_minutes else "Custom",
                        "type": "production",
                        "license_details": {
                            "paid": True,
                            "paid_type": "enterprise",
                            "users_license_purchased": 200,
                            "trial_expiry": None,
                        },
                    }
                ]
            }
        )

    def get_users(self, request: web.Request) -> web.Response:
        user = dict(self.org.user)
        user.update(
            {
                "full_name": user["name"],
                "status": "active",
                "role": {"name": "CEO", "id": f"{self.org.opts.org_id}000000026005"},
                "profile": {"name": "Administrator", "id": f"{self.org.opts.org_id}000000026011"},
            }
        )
        return web.json_response({"users": [user], "info": {"count": 1, "more_records": False}})

    def get_modules(self, request: web.Request) -> web.Response:
        modules = [
            {
                "api_name": m.api_name,
                "module_name": m.api_name,
                "singular_label": m.singular,
                "plural_label": m.api_name.replace("_", " "),
                "id": m.id,
                "api_supported": True,
                "creatable": True,
                "editable": True,
                "deletable": True,
                "viewable": True,
                "generated_type": "default",
                "visible": True,
            }
            for m in self.org.modules.values()
        ]
        return web.json_response({"modules": modules})

    def get_fields(self, request: web.Request) -> web.Response:
        module = request.query.get("module")
        if not module:
            raise RequestError(
                400, "REQUIRED_PARAM_MISSING", "required param is missing", {"param_name": "module"}
            )
        if module in self.org.modules:
            defs = self.org.modules[module].fields
        elif module in self.org.subforms:
            defs = self.org.subforms[module]
        else:
            raise RequestError(
                400,
                "INVALID_MODULE",
                "the module name given seems to be invalid",
                {"param_name": "module"},
            )
        return web.json_response({"fields": [f.metadata(self.org.modules) for f in defs.values()]})

    def _new_page_token(self, signature: tuple[Any, ...], offset: int, now: float) -> str:
        token = secrets.token_hex(16)
        self.page_tokens[token] = PageToken(signature, offset, now + PAGE_TOKEN_TTL_S)
        while len(self.page_tokens) > MAX_PAGE_TOKENS:
            self.page_tokens.popitem(last=False)
        return token

    def get_records(self, request: web.Request, store: ModuleStore) -> web.Response:
        query = request.query
        names = self.org.fields_param(store, query.get("fields"), required=True)
        sort_by = query.get("sort_by", "id")
        if sort_by not in SORTABLE:
            raise RequestError(
                400,
                "INVALID_DATA",
                "invalid data",
                {"param_name": "sort_by", "supported_values": list(SORTABLE)},
            )
        sort_order = query.get("sort_order", "desc")
        if sort_order not in ("asc", "desc"):
            raise RequestError(
                400,
                "INVALID_DATA",
                "invalid data",
                {"param_name": "sort_order", "supported_values": ["asc", "desc"]},
            )
        per_page = min(int_param(request, "per_page", MAX_PER_PAGE), MAX_PER_PAGE)
        since = if_modified_since(request)
        ids: tuple[str, ...] | None = None
        if query.get("ids"):
            ids = tuple(i.strip() for i in query["ids"].split(",") if i.strip())
            if len(ids) > 100:
                raise RequestError(
                    400, "LIMIT_EXCEEDED", "limit exceeded", {"limit": 100, "param_name": "ids"}
                )
        signature = (
            tuple(sorted((k, v) for k, v in query.items() if k not in ("page", "page_token"))),
            request.headers.get("If-Modified-Since"),
        )
        now = self.org.now()
        page_token = query.get("page_token")
        if page_token:
            if "page" in query:
                raise RequestError(
                    400,
                    "AMBIGUITY_DURING_PROCESSING",
                    "ambiguity while processing the request",
                    {"ambiguity_due_to": ["page", "page_token"]},
                )
            token = self.page_tokens.get(page_token)
            if token is None or token.signature != signature:
                raise RequestError(
                    400,
                    "TOKEN_BOUND_DATA_MISMATCH",
                    "The page_token given seems to be invalid or input param is added or "
                    "altered or deleted",
                    {"param_name": "page_token"},
                )
            if token.expires_at <= now:
                raise RequestError(
                    400,
                    "EXPIRED_VALUE",
                    "Page token expired",
                    {"api_name": "page_token", "json_path": "$.query.page_token"},
                )
            start = token.offset
            if start >= TOKEN_PAGE_LIMIT:
                raise RequestError(
                    400,
                    "PAGINATION_LIMIT_EXCEEDED",
                    f"You can only get upto {TOKEN_PAGE_LIMIT} records using page_token param",
                    {"param_name": "page_token"},
                )
        else:
            page = int_param(request, "page", 1)
            if page * per_page > DISCRETE_PAGE_LIMIT:
                raise RequestError(
                    400,
                    "DISCRETE_PAGINATION_LIMIT_EXCEEDED",
                    f"You can only get the first {DISCRETE_PAGE_LIMIT} records without using "
                    "page_token param",
                    {"limit": DISCRETE_PAGE_LIMIT},
                )
            start = (page - 1) * per_page
        ordered = store.query(sort_by, sort_order, since, ids)
        if not ordered and since is not None:
            return web.Response(status=304)
        window = ordered[start : start + per_page]
        if not window:
            return web.Response(status=204)
        end = start + len(window)
        more = end < len(ordered)
        next_token = self._new_page_token(signature, end, now) if more else None
        previous_token = (
            self._new_page_token(signature, max(0, start - per_page), now) if start > 0 else None
        )
        data = [self.org.render(store, store.records[rid], names, subforms=False) for rid in window]
        info = {
            "call": False,
            "per_page": per_page,
            "next_page_token": next_token,
            "count": len(data),
            "sort_by": sort_by,
            "page": start // per_page + 1,
            "previous_page_token": previous_token,
            "page_token_expiry": self.org.fmt_time(now + PAGE_TOKEN_TTL_S) if next_token else None,
            "sort_order": sort_order,
            "email": False,
            "more_records": more,
        }
        return web.json_response({"data": data, "info": info})

    def get_record(self, request: web.Request, store: ModuleStore, raw_id: str) -> web.Response:
        names = self.org.fields_param(store, request.query.get("fields"), required=False)
        rid = self.org.resolve_path_id(request, store, raw_id)
        if rid is None:
            if self.org.opts.missing_record_status == 204:
                return web.Response(status=204)
            raise RequestError(
                400, "INVALID_DATA", "the id given seems to be invalid", {"resource_path_index": 1}
            )
        return web.json_response(
            {"data": [self.org.render(store, store.records[rid], names, subforms=True)]}
        )

    def get_deleted(self, request: web.Request, store: ModuleStore) -> web.Response:
        kind = request.query.get("type", "all")
        if kind not in ("all", "recycle", "permanent"):
            raise RequestError(
                400,
                "INVALID_DATA",
                "invalid data",
                {"param_name": "type", "supported_values": ["all", "recycle", "permanent"]},
            )
        per_page = min(int_param(request, "per_page", MAX_PER_PAGE), MAX_PER_PAGE)
        page = int_param(request, "page", 1)
        since = if_modified_since(request)
        rows = [
            row
            for row in reversed(store.deleted)
            if (kind in ("all", "recycle")) and (since is None or row["_t"] > since)
        ]
        window = rows[(page - 1) * per_page : page * per_page]
        if not window:
            return web.Response(status=304 if since is not None and not rows else 204)
        data = [
            {
                "deleted_by": {"name": self.org.user["name"], "id": self.org.user["id"]},
                "id": row["id"],
                "display_name": row["display_name"],
                "type": "recycle",
                "created_by": {"name": self.org.user["name"], "id": self.org.user["id"]},
                "deleted_time": self.org.fmt_time(row["_t"]),
            }
            for row in window
        ]
        return web.json_response(
            {
                "data": data,
                "info": {
                    "per_page": per_page,
                    "count": len(data),
                    "page": page,
                    "more_records": page * per_page < len(rows),
                },
            }
        )

    # -- writing ------------------------------------------------------------------------------

    async def write(
        self, request: web.Request, store: ModuleStore, mode: str, path_id: str | None = None
    ) -> web.Response:
        body = await read_json(request)
        if body is BAD_BODY or not isinstance(body, dict):
            raise RequestError(
                400, "INVALID_DATA", "invalid data", {"expected_data_type": "jsonobject"}
            )
        data = body.get("data")
        if not isinstance(data, list) or not data:
            raise RequestError(
                400,
                "MANDATORY_NOT_FOUND",
                "required field not found",
                {"api_name": "data", "json_path": "$.data"},
            )
        limit = 1 if path_id is not None else MAX_WRITE_RECORDS
        if len(data) > limit:
            return wrapped_error(
                400,
                "LIMIT_EXCEEDED",
                "count of records in your request exceeds the limit",
                {"maximum_length": limit, "api_name": "data"},
            )
        dup_fields: list[str] = []
        if mode == "upsert":
            dup_fields_or_error = self._duplicate_check_fields(store, body)
            if isinstance(dup_fields_or_error, web.Response):
                return dup_fields_or_error
            dup_fields = dup_fields_or_error
        unmodified_since: float | None = None
        if mode in ("update", "upsert") and request.headers.get("If-Unmodified-Since"):
            unmodified_since = parse_http_time(request.headers["If-Unmodified-Since"])
        if path_id is not None:
            resolved = self.org.resolve_path_id(request, store, path_id)
            if resolved is None:
                return wrapped_error(
                    400, "INVALID_DATA", "invalid record id", {"resource_path_index": 1}
                )
            path_id = resolved
        external = self.org.parse_external_header(request, store.mdef.api_name)
        self.org.counters["write_calls"] += 1
        results: list[Json] = []
        changes: list[Change] = []
        for index, item in enumerate(data):
            try:
                if not isinstance(item, dict):
                    raise ZohoError(
                        "INVALID_DATA",
                        "invalid data",
                        {
                            "expected_data_type": "jsonobject",
                            "api_name": "data",
                            "json_path": f"$.data[{index}]",
                        },
                    )
                if path_id is not None:
                    item = {**item, "id": path_id}
                result = self._write_one(
                    request,
                    store,
                    mode,
                    item,
                    index,
                    dup_fields,
                    external,
                    unmodified_since,
                    changes,
                )
            except ZohoError as exc:
                result = exc.body
                self.org.record_errors[result["code"]] += 1
            results.append(result)
        self.notifications.notify(changes)
        successes = sum(1 for r in results if r["status"] == "success")
        if successes == len(results):
            status = 201 if mode == "insert" else 200
        elif successes:
            status = 207
        elif all(r["code"] == "ALREADY_MODIFIED" for r in results):
            status = 412
        else:
            status = 400
        return web.json_response({"data": results}, status=status)

    def _duplicate_check_fields(self, store: ModuleStore, body: Json) -> list[str] | web.Response:
        mdef = store.mdef
        allowed = mdef.unique_fields()
        if mdef.dup_field:
            allowed = [mdef.dup_field, *[f for f in allowed if f != mdef.dup_field]]
        given = body.get("duplicate_check_fields")
        if given is None:
            return allowed
        if not isinstance(given, list) or not given:
            return wrapped_error(
                400,
                "INVALID_DATA",
                "invalid data",
                {
                    "expected_data_type": "jsonarray",
                    "api_name": "duplicate_check_fields",
                    "json_path": "$.duplicate_check_fields",
                },
            )
        for index, name in enumerate(given):
            if not isinstance(name, str) or name not in allowed:
                return wrapped_error(
                    400,
                    "INVALID_DATA",
                    "invalid data",
                    {
                        "api_name": str(name),
                        "json_path": f"$.duplicate_check_fields[{index}]",
                        "supported_values": allowed,
                    },
                )
        return list(dict.fromkeys(given))

    def _write_one(
        self,
        request: web.Request,
        store: ModuleStore,
        mode: str,
        item: Json,
        index: int,
        dup_fields: list[str],
        external: dict[tuple[str, ...], str],
        unmodified_since: float | None,
        changes: list[Change],
    ) -> Json:
        target: Json | None = None
        duplicate_field: str | None = None
        raw_id = item.get("id")
        if mode == "update" or (mode == "upsert" and raw_id):
            if raw_id is None or raw_id == "":
                raise mandatory_missing("id", f"$.data[{index}].id")
            target = store.records.get(str(raw_id))
            if target is None:
                raise invalid_value("id", f"$.data[{index}].id")
        values = self.org.prepare(store, item, index, external, target)
        if mode == "upsert" and target is None:
            for name in dup_fields:
                found = store.find(name, values.get(name))
                if found:
                    target = store.records[found[0]]
                    duplicate_field = name
                    break
        if target is not None and unmodified_since is not None and target["_m"] > unmodified_since:
            error = ZohoError(
                "ALREADY_MODIFIED",
                "record updated time has already passed if-unmodified-since time",
                self.org.write_details(target),
            )
            raise error
        creating = target is None
        self.org.check_mandatory(store, values, index, creating)
        self.org.check_unique(store, values, index, None if target is None else target["id"])
        if target is None:
            record = self.org.create_record(store, values)
            self.org.counters["records_inserted"] += 1
            changes.append(Change(store.mdef.api_name, "insert", record["id"], list(values)))
            details = self.org.write_details(record)
            if mode == "upsert":
                self._echo_external(store, record, details)
                return {
                    "code": "SUCCESS",
                    "duplicate_field": None,
                    "action": "insert",
                    "details": details,
                    "message": "record added",
                    "status": "success",
                }
            details["$approval_state"] = "approved"
            return {
                "code": "SUCCESS",
                "details": details,
                "message": "record added",
                "status": "success",
            }
        changed = self.org.update_record(store, target, values)
        self.org.counters["records_updated"] += 1
        if changed or self.org.opts.noop_update_bumps_modified_time:
            changes.append(Change(store.mdef.api_name, "update", target["id"], changed))
        details = self.org.write_details(target)
        if mode == "upsert":
            self._echo_external(store, target, details)
            return {
                "code": "SUCCESS",
                "duplicate_field": duplicate_field,
                "action": "update",
                "details": details,
                "message": "record updated",
                "status": "success",
            }
        details["$approval_state"] = "approved"
        return {
            "code": "SUCCESS",
            "details": details,
            "message": "record updated",
            "status": "success",
        }

    @staticmethod
    def _echo_external(store: ModuleStore, record: Json, details: Json) -> None:
        for name in store.mdef.external:
            if record.get(name) is not None:
                details[name] = record[name]

    def delete_records(self, request: web.Request, store: ModuleStore) -> web.Response:
        raw = request.query.get("ids", "")
        ids = [i.strip() for i in raw.split(",") if i.strip()]
        if not ids:
            raise RequestError(
                400, "REQUIRED_PARAM_MISSING", "required param is missing", {"param_name": "ids"}
            )
        if len(ids) > MAX_WRITE_RECORDS:
            raise RequestError(
                400,
                "LIMIT_EXCEEDED",
                "limit exceeded",
                {"limit": MAX_WRITE_RECORDS, "param_name": "ids"},
            )
        results, changes = [], []
        for rid in ids:
            if self.org.delete_record(store, rid):
                results.append(
                    {
                        "code": "SUCCESS",
                        "details": {"id": rid},
                        "message": "record deleted",
                        "status": "success",
                    }
                )
                changes.append(Change(store.mdef.api_name, "delete", rid, []))
            else:
                results.append(
                    ZohoError(
                        "INVALID_DATA", "the related id given seems to be invalid", {"id": rid}
                    ).body
                )
        self.notifications.notify(changes)
        successes = sum(1 for r in results if r["status"] == "success")
        status = 200 if successes == len(results) else 207 if successes else 400
        return web.json_response({"data": results}, status=status)

    def delete_one(self, request: web.Request, store: ModuleStore, raw_id: str) -> web.Response:
        rid = self.org.resolve_path_id(request, store, raw_id)
        if rid is None or not self.org.delete_record(store, rid):
            return wrapped_error(
                400, "INVALID_DATA", "invalid record id", {"resource_path_index": 1}
            )
        self.notifications.notify([Change(store.mdef.api_name, "delete", rid, [])])
        return web.json_response(
            {
                "data": [
                    {
                        "code": "SUCCESS",
                        "details": {"id": rid},
                        "message": "record deleted",
                        "status": "success",
                    }
                ]
            }
        )
