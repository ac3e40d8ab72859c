"""Zoho CRM emulator: the accounts server and REST API v8 of one datacenter, on the wire.

One aiohttp app serves the accounts server (``/oauth/v2/token``, ``/oauth/v2/token/revoke``) and
the CRM API (``/crm/v8/...``). It is shaped after the vendor facts in
``reference/zoho_crm.md``; facts marked UNVERIFIED there are options of :func:`create_app`.

API (``Authorization: Zoho-oauthtoken <token>``):

- ``GET  /crm/v8/org``, ``GET /crm/v8/users?type=CurrentUser``
- ``GET  /crm/v8/settings/modules``, ``GET /crm/v8/settings/fields?module=X``
- ``GET|POST|PUT|DELETE /crm/v8/{module}`` (list / insert / update / delete by ``ids``)
- ``GET|PUT|DELETE /crm/v8/{module}/{id}`` (``X-EXTERNAL: Module.Field`` for external values)
- ``POST /crm/v8/{module}/upsert``, ``GET /crm/v8/{module}/search``,
  ``GET /crm/v8/{module}/deleted``
- ``POST /crm/v8/coql``
- ``POST|GET|PUT|PATCH|DELETE /crm/v8/actions/watch``

The package is split by concern:

- :mod:`.options`   options (UNVERIFIED facts), limits and defaults
- :mod:`.schema`    modules and fields of a fresh org
- :mod:`.store`     records of one module and their unique / duplicate-check indexes
- :mod:`.org`       the org: schema, records, clock, and the record rules (validation,
  lookups, line items, derived values, rendering)
- :mod:`.auth`      accounts server and token check (on :mod:`emulators.kit.tokens`)
- :mod:`.limits`    concurrency and credits (on :mod:`emulators.kit.ratelimit`)
- :mod:`.records`   org/metadata, list/get/deleted, insert/update/upsert/delete
- :mod:`.search_coql`  search (an index search: words and prefixes) and COQL (exact)
- :mod:`.notifications`  ``actions/watch`` channels and their callbacks
- :mod:`.control`   the control API (see its docstring)
- :mod:`.app`       dispatch, middlewares, :func:`create_app`

``python -m emulators.zoho_crm --port N`` serves it on 127.0.0.1.
"""

from emulators.zoho_crm.app import EMULATOR_KEY, ID_SEGMENT_RE, ZohoCrmEmulator, create_app, main
from emulators.zoho_crm.errors import (
    RequestError,
    ZohoError,
    flat_error,
    invalid_type,
    invalid_value,
    mandatory_missing,
    wrapped_error,
)
from emulators.zoho_crm.notifications import Notifications, Watch
from emulators.zoho_crm.options import (
    API_VERSION,
    CREDIT_WINDOW_S,
    DEFAULT_CHANNEL_EXPIRY_S,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_REFRESH_TOKEN,
    DEFAULT_SCOPE,
    DISCRETE_PAGE_LIMIT,
    LOCAL_HOSTS,
    MAX_CHANNEL_EXPIRY_S,
    MAX_FIELDS_PARAM,
    MAX_PAGE_TOKENS,
    MAX_PER_PAGE,
    MAX_SEARCH_CRITERIA,
    MAX_WATCH_EVENTS,
    MAX_WATCH_ITEMS,
    MAX_WATCH_TOKEN,
    MAX_WRITE_RECORDS,
    PAGE_TOKEN_TTL_S,
    RUNTIME_OPTIONS,
    SORTABLE,
    TOKEN_PAGE_LIMIT,
    TOKEN_THROTTLE_MESSAGE,
    TOO_MANY_REQUESTS_MESSAGE,
    ZohoOptions,
)
from emulators.zoho_crm.org import DATE_RE, EMAIL_RE, PHONE_RE, Org
from emulators.zoho_crm.records import PageToken, RecordsApi
from emulators.zoho_crm.schema import (
    CARRIERS,
    DATA_TYPES,
    DEAL_STAGES,
    DEFAULT_LENGTHS,
    INDUSTRIES,
    JSON_TYPES,
    LEAD_SOURCES,
    NUMBER_TYPES,
    ORDER_STATUS,
    STRING_TYPES,
    TEXT_TYPES,
    USAGE_UNITS,
    FieldDef,
    ModuleDef,
    build_schema,
    line_item_names,
)
from emulators.zoho_crm.search_coql import (
    CoqlError,
    CoqlParser,
    CoqlQuery,
    CriteriaError,
    SearchApi,
    index_match,
    parse_criteria,
)
from emulators.zoho_crm.store import Change, ModuleStore
from emulators.zoho_crm.wire import (
    CALL_INFO_KEY,
    CallInfo,
    call_info,
    parse_datetime,
    parse_http_time,
)

__all__ = [
    "API_VERSION",
    "CALL_INFO_KEY",
    "CARRIERS",
    "CREDIT_WINDOW_S",
    "DATA_TYPES",
    "DATE_RE",
    "DEAL_STAGES",
    "DEFAULT_CHANNEL_EXPIRY_S",
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "DEFAULT_LENGTHS",
    "DEFAULT_REFRESH_TOKEN",
    "DEFAULT_SCOPE",
    "DISCRETE_PAGE_LIMIT",
    "EMAIL_RE",
    "EMULATOR_KEY",
    "ID_SEGMENT_RE",
    "INDUSTRIES",
    "JSON_TYPES",
    "LEAD_SOURCES",
    "LOCAL_HOSTS",
    "MAX_CHANNEL_EXPIRY_S",
    "MAX_FIELDS_PARAM",
    "MAX_PAGE_TOKENS",
    "MAX_PER_PAGE",
    "MAX_SEARCH_CRITERIA",
    "MAX_WATCH_EVENTS",
    "MAX_WATCH_ITEMS",
    "MAX_WATCH_TOKEN",
    "MAX_WRITE_RECORDS",
    "NUMBER_TYPES",
    "ORDER_STATUS",
    "PAGE_TOKEN_TTL_S",
    "PHONE_RE",
    "RUNTIME_OPTIONS",
    "SORTABLE",
    "STRING_TYPES",
    "TEXT_TYPES",
    "TOKEN_PAGE_LIMIT",
    "TOKEN_THROTTLE_MESSAGE",
    "TOO_MANY_REQUESTS_MESSAGE",
    "USAGE_UNITS",
    "CallInfo",
    "Change",
    "CoqlError",
    "CoqlParser",
    "CoqlQuery",
    "CriteriaError",
    "FieldDef",
    "ModuleDef",
    "ModuleStore",
    "Notifications",
    "Org",
    "PageToken",
    "RecordsApi",
    "RequestError",
    "SearchApi",
    "Watch",
    "ZohoCrmEmulator",
    "ZohoError",
    "ZohoOptions",
    "build_schema",
    "call_info",
    "create_app",
    "flat_error",
    "index_match",
    "invalid_type",
    "invalid_value",
    "line_item_names",
    "main",
    "mandatory_missing",
    "parse_criteria",
    "parse_datetime",
    "parse_http_time",
    "wrapped_error",
]
