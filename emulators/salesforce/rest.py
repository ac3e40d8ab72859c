"""The REST API under ``/services/data``: versions, sObjects, describe, query, Collections upsert.

Paths are split on the raw (still percent-encoded) path and each segment is decoded on its
own, so an external id value holding ``/``, spaces or ``+`` arrives as sent.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from emulators.salesforce.describe import FieldDef, ObjectDef
from emulators.salesforce.errors import (
    ApiError,
    RecordError,
    json_error,
    normalize_id,
    not_found,
    session_invalid,
)
from emulators.salesforce.limits import LIMIT_HEADER
from emulators.salesforce.org import MultipleMatches, Org, Parsed
from emulators.salesforce.records import Store, coerce

Json = dict[str, Any]

DATA_PREFIX = "/services/data"
SEASONS = ("Winter", "Spring", "Summer")
UPDATE_200_SINCE = 46.0


def version_label(version: float) -> str:
    """v62.0 is Winter '25; three releases a year."""
    index = int(version) - 62
    return f"{SEASONS[index % 3]} '{25 + index // 3:02d}"


def split_raw_path(request: web.Request) -> list[str]:
    """Path segments after /services/data, each percent-decoded (``+`` stays ``+``)."""
    raw = request.raw_path.split("?", 1)[0]
    tail = raw[len(DATA_PREFIX) :]
    return [unquote(part) for part in tail.split("/") if part != ""]


def is_api_path(path: str) -> bool:
    return path.startswith(DATA_PREFIX + "/") and path.rstrip("/") != DATA_PREFIX


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def method_not_allowed(method: str, allowed: str) -> ApiError:
    return ApiError(
        405, "METHOD_NOT_ALLOWED", f"HTTP Method '{method}' not allowed. Allowed are {allowed}"
    )


class RestApi:
    def __init__(self, org: Org) -> None:
        self.org = org

    # -- versions ------------------------------------------------------------------------------

    def versions(self, request: web.Request) -> web.Response:
        """``GET /services/data/``: no session needed, not counted."""
        if request.method not in ("GET", "HEAD"):
            return method_not_allowed(request.method, "GET,HEAD").response()
        oldest = int(float(self.org.opts.oldest_version))
        latest = int(float(self.org.opts.latest_version))
        return json_response(
            [
                {
                    "label": version_label(v),
                    "url": f"{DATA_PREFIX}/v{v}.0",
                    "version": f"{v}.0",
                }
                for v in range(oldest, latest + 1)
            ]
        )

    def resolve_version(self, segment: str) -> str:
        opts = self.org.opts
        if segment == "latest":
            return opts.latest_version
        match = re.fullmatch(r"v(\d{1,3})\.0", segment)
        if match is None:
            raise not_found()
        number = int(match.group(1))
        if number > float(opts.latest_version) or number < 7:
            raise not_found()
        if number < float(opts.oldest_version):
            raise ApiError(
                410,
                "UNSUPPORTED_API_VERSION",
                f"Version {segment[1:]} of the API is no longer supported. Use a newer version.",
            )
        return f"{number}.0"

    # -- middleware ----------------------------------------------------------------------------

    def limit_header_middleware(self) -> Any:
        """Adds ``Sforce-Limit-Info`` to every authenticated REST response (faults included)."""

        @web.middleware
        async def header(request: web.Request, handler: Any) -> web.StreamResponse:
            response = await handler(request)
            if is_api_path(request.path) and response.status != 401:
                response.headers[LIMIT_HEADER] = self.org.usage.header()
            return response

        return header

    def api_middleware(self) -> Any:
        """Session check, then the daily allocation, for every call under /services/data/vNN."""

        @web.middleware
        async def api(request: web.Request, handler: Any) -> web.StreamResponse:
            if not is_api_path(request.path):
                return await handler(request)
            try:
                if self.org.sessions.check(request.headers.get("Authorization", "")) is None:
                    raise session_invalid()
                self.org.usage.charge()
            except ApiError as exc:
                return exc.response()
            if self.org.opts.service_time_ms > 0:
                await asyncio.sleep(self.org.opts.service_time_ms / 1000)
            return await handler(request)

        return api

    @staticmethod
    def route_name(request: web.Request) -> str:
        """A route with ids, external id values and locators replaced (for call counts)."""
        path = request.path
        if not path.startswith(DATA_PREFIX) or not is_api_path(path):
            return f"{request.method} {path}"
        parts = split_raw_path(request)
        out = ["{version}", *parts[1:]]
        if len(parts) >= 3 and parts[1] == "sobjects":
            if len(parts) >= 4 and normalize_id(parts[3]) is not None:
                out[3] = "{id}"
            if len(parts) >= 5:
                out[4] = "{value}"
        elif len(parts) >= 3 and parts[1] in ("query", "queryAll"):
            out[2] = "{locator}"
        return f"{request.method} {DATA_PREFIX}/{'/'.join(out)}"

    # -- dispatch ------------------------------------------------------------------------------

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._dispatch(request)
        except ApiError as exc:
            return exc.response()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = split_raw_path(request)
        if not parts:
            return self.versions(request)
        version = self.resolve_version(parts[0])
        rest = parts[1:]
        method = request.method
        if not rest:
            self._allow(method, "GET,HEAD")
            return json_response(self._resources(version))
        head = rest[0]
        if head == "limits" and len(rest) == 1:
            self._allow(method, "GET,HEAD")
            return json_response(self.org.usage.limits_body())
        if head in ("query", "queryAll"):
            self._allow(method, "GET,HEAD")
            if len(rest) == 1:
                return self.query(request, version)
            if len(rest) == 2:
                return json_response(self.org.query_more(rest[1], version))
            raise not_found()
        if head == "sobjects":
            return await self.sobjects(request, version, rest[1:])
        if head == "composite" and len(rest) >= 2 and rest[1] == "sobjects":
            if len(rest) == 4:
                self._allow(method, "PATCH")
                return await self.collection_upsert(request, version, rest[2], rest[3])
        raise not_found()

    @staticmethod
    def _allow(method: str, allowed: str) -> None:
        if method not in allowed.split(","):
            raise method_not_allowed(method, allowed)

    @staticmethod
    def _resources(version: str) -> Json:
        base = f"{DATA_PREFIX}/v{version}"
        names = ("sobjects", "query", "queryAll", "limits", "composite")
        return {name: f"{base}/{name}" for name in names}

    def _store(self, name: str, write: bool = False) -> Store:
        store = self.org.store(name)
        if store is None:
            raise not_found()
        if write and not store.obj.writable:
            raise ApiError(403, "INSUFFICIENT_ACCESS", "insufficient access rights on object id")
        return store

    async def _json(self, request: web.Request) -> Any:
        raw = await request.read()
        if not raw.strip():
            raise json_error("No content to map due to end-of-input")
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise json_error(f"Unexpected character in the JSON body: {exc}") from None

    def _count_write(self, request: web.Request) -> None:
        self.org.write_calls[self.route_name(request)] += 1

    # -- sObjects ------------------------------------------------------------------------------

    async def sobjects(self, request: web.Request, version: str, rest: list[str]) -> web.Response:
        method = request.method
        org = self.org
        if not rest:
            self._allow(method, "GET,HEAD")
            return json_response(
                {
                    "encoding": "UTF-8",
                    "maxBatchSize": 200,
                    "sobjects": [s.obj.summary(version) for s in org.stores.values()],
                }
            )
        store = self._store(rest[0], write=method in ("POST", "PATCH", "PUT", "DELETE"))
        obj = store.obj
        if len(rest) == 1:
            if method == "POST":
                return await self.create(request, version, store)
            self._allow(method, "GET,HEAD,POST")
            return json_response({"objectDescribe": obj.summary(version), "recentItems": []})
        if len(rest) == 2 and rest[1] == "describe":
            self._allow(method, "GET,HEAD")
            return json_response(obj.describe(version))
        if len(rest) == 2:
            rid = normalize_id(rest[1])
            if rid is None or rid not in store.records:
                if rid is None:
                    raise ApiError(
                        404,
                        "NOT_FOUND",
                        org.opts.external_field_error_message.format(field=rest[1]),
                    )
                raise not_found()
            if method == "PATCH":
                return await self.update(request, version, store, rid)
            self._allow(method, "GET,HEAD,PATCH")
            return json_response(self._retrieve(request, version, obj, store.records[rid]))
        if len(rest) == 3:
            ext = self._external_field(obj, rest[1])
            value = rest[2]
            if method == "PATCH":
                return await self.upsert(request, version, store, ext, value)
            self._allow(method, "GET,HEAD,PATCH")
            matches = store.find(ext, coerce(ext, value))
            if not matches:
                raise not_found()
            if len(matches) > 1:
                return self._multiple(version, obj, matches)
            return json_response(self._retrieve(request, version, obj, store.records[matches[0]]))
        raise not_found()

    def _external_field(self, obj: ObjectDef, name: str) -> FieldDef:
        fdef = obj.field(name)
        if fdef is None or not (fdef.external_id or fdef.type == "id"):
            raise ApiError(
                404,
                "NOT_FOUND",
                self.org.opts.external_field_error_message.format(field=name),
            )
        return fdef

    def _retrieve(self, request: web.Request, version: str, obj: ObjectDef, record: Json) -> Json:
        wanted = request.query.get("fields")
        fields = None
        if wanted:
            fields = []
            for name in wanted.split(","):
                fdef = obj.field(name.strip())
                if fdef is None:
                    raise ApiError(
                        400,
                        "INVALID_FIELD",
                        f"No such column '{name.strip()}' on entity '{obj.name}'. If you are "
                        "attempting to use a custom field, be sure to append the '__c' after the "
                        "custom field name. Please reference your WSDL or the describe call for "
                        "the appropriate names.",
                    )
                fields.append(fdef)
        return self.org.render_record(obj, record, version, fields)

    @staticmethod
    def _multiple(version: str, obj: ObjectDef, ids: list[str]) -> web.Response:
        return json_response(
            [f"{DATA_PREFIX}/v{version}/sobjects/{obj.name}/{rid}" for rid in ids], status=300
        )

    @staticmethod
    def _allow_save(request: web.Request) -> bool:
        header = request.headers.get("Sforce-Duplicate-Rule-Header", "")
        for part in header.split(";"):
            name, _, value = part.partition("=")
            if name.strip().lower() == "allowsave" and value.strip().lower() == "true":
                return True
        return False

    def _record_failure(self, exc: RecordError) -> ApiError:
        self.org.count_error(exc)
        return exc.as_api_error(400)

    async def upsert(
        self, request: web.Request, version: str, store: Store, ext: FieldDef, raw_value: str
    ) -> web.Response:
        """``PATCH /sobjects/{Object}/{ExtIdField}/{value}``: 201 created, 200 updated (v46+;
        204 before), 300 with the matching records' URLs when several match."""
        org = self.org
        self._count_write(request)
        body = await self._json(request)
        parsed = org.parse_record(store.obj, body)
        if "Id" in parsed.values:
            raise ApiError(
                400, "INVALID_FIELD", "Id is not allowed in an upsert by external ID", ["Id"]
            )
        if ext.name in parsed.values and ext.type != "id":
            given = parsed.values.pop(ext.name)
            same = given is not None and store.key(ext, given) == store.key(ext, raw_value)
            if org.opts.upsert_body_external_id == "error" or not same:
                raise ApiError(
                    400,
                    "INVALID_FIELD",
                    f"The external ID field {ext.name} may not be set in the request body of "
                    "an upsert by that field",
                    [ext.name],
                )
        value = coerce(ext, raw_value)
        update_only = request.query.get("updateOnly", "").lower() == "true"
        try:
            record, created = org.upsert(
                store,
                ext,
                value,
                parsed,
                version=version,
                update_only=update_only,
                allow_save=self._allow_save(request),
            )
        except MultipleMatches as exc:
            return self._multiple(version, store.obj, exc.ids)
        except RecordError as exc:
            raise self._record_failure(exc) from None
        if record is None:
            raise not_found()
        org.count_result(created)
        if not created and float(version) < UPDATE_200_SINCE:
            return web.Response(status=204)
        result: Json = {"id": record["Id"], "success": True, "errors": []}
        if float(version) >= UPDATE_200_SINCE:
            result["created"] = created
        return json_response(result, status=201 if created else 200)

    async def create(self, request: web.Request, version: str, store: Store) -> web.Response:
        org = self.org
        self._count_write(request)
        parsed = org.parse_record(store.obj, await self._json(request))
        try:
            record = org.save(
                store, parsed, None, version=version, allow_save=self._allow_save(request)
            )
        except RecordError as exc:
            raise self._record_failure(exc) from None
        org.count_result(True)
        return json_response({"id": record["Id"], "success": True, "errors": []}, status=201)

    async def update(
        self, request: web.Request, version: str, store: Store, rid: str
    ) -> web.Response:
        org = self.org
        self._count_write(request)
        parsed = org.parse_record(store.obj, await self._json(request))
        parsed.values.pop("Id", None)
        try:
            org.save(
                store,
                Parsed(parsed.values, parsed.parents),
                store.records[rid],
                version=version,
                allow_save=self._allow_save(request),
            )
        except RecordError as exc:
            raise self._record_failure(exc) from None
        org.count_result(False)
        return web.Response(status=204)

    async def collection_upsert(
        self, request: web.Request, version: str, object_name: str, field_name: str
    ) -> web.Response:
        """``PATCH /composite/sobjects/{Object}/{ExtIdField}``: HTTP 200 with per-record
        results in input order, even when records fail."""
        if float(version) < UPDATE_200_SINCE:
            raise not_found()
        self._count_write(request)
        store = self._store(object_name, write=True)
        ext = self._external_field(store.obj, field_name)
        body = await self._json(request)
        results = self.org.collection_upsert(
            store, ext, body, version=version, allow_save=self._allow_save(request)
        )
        return json_response(results)

    # -- query ---------------------------------------------------------------------------------

    def query(self, request: web.Request, version: str) -> web.Response:
        text = request.query.get("q")
        if text is None or not text.strip():
            raise ApiError(400, "MALFORMED_QUERY", "A query string has to be specified")
        return json_response(self.org.query(text, version, self._batch_size(request)))

    def _batch_size(self, request: web.Request) -> int:
        opts = self.org.opts
        batch = opts.query_batch_size
        header = request.headers.get("Sforce-Query-Options", "")
        for part in header.split(","):
            name, _, value = part.partition("=")
            if name.strip().lower() == "batchsize" and value.strip().isdigit():
                batch = int(value.strip())
        return max(opts.query_batch_min, min(opts.query_batch_max, batch))
