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

from emulators.zoho_crm.app import EMULATOR_KEY, ZohoCrmEmulator, create_app, main
from emulators.zoho_crm.options import (
    API_VERSION,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_REFRESH_TOKEN,
    DEFAULT_SCOPE,
    RUNTIME_OPTIONS,
    ZohoOptions,
)
from emulators.zoho_crm.schema import FieldDef, ModuleDef, build_schema

__all__ = [
    "API_VERSION",
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "DEFAULT_REFRESH_TOKEN",
    "DEFAULT_SCOPE",
    "EMULATOR_KEY",
    "RUNTIME_OPTIONS",
    "FieldDef",
    "ModuleDef",
    "ZohoCrmEmulator",
    "ZohoOptions",
    "build_schema",
    "create_app",
    "main",
]
