"""Salesforce emulator: one org's OAuth endpoint and REST API, on the wire.

Shaped after Salesforce's documented behaviour (``shared/reference/salesforce.md`` and the
vendor's documentation), not after any client. Facts marked UNVERIFIED there are settings of
:class:`SalesforceOptions`.

Run it alone on 127.0.0.1 (default port 8103)::

    python -m emulators.salesforce --port 8103

then get a token and call the API::

    curl -s -d grant_type=client_credentials -d client_id=<key> -d client_secret=<secret> \\
        http://127.0.0.1:8103/services/oauth2/token
    curl -s -H "Authorization: Bearer <token>" \\
        "http://127.0.0.1:8103/services/data/v66.0/query?q=SELECT+Id,Name+FROM+Account"

(the default app's key and secret are ``DEFAULT_CLIENT_ID`` and ``DEFAULT_CLIENT_SECRET`` in
:mod:`emulators.salesforce.options`).

API (``Authorization: Bearer <access_token>``; every response but the versions list carries
``Sforce-Limit-Info: api-usage=used/max``):

- ``POST /services/oauth2/token``  client credentials (form body or Basic header); errors
  ``invalid_client_id``, ``invalid_client``, ``unsupported_grant_type``; no refresh token
- ``GET  /services/data/``  versions (no session, not counted); ``/services/data/latest``
- ``GET  /services/data/vNN.0/``, ``/limits``, ``/sobjects``, ``/sobjects/{Object}``,
  ``/sobjects/{Object}/describe``
- ``POST /sobjects/{Object}``  create; ``GET|PATCH /sobjects/{Object}/{Id}``
- ``GET|PATCH /sobjects/{Object}/{ExtIdField}/{value}``  read / upsert by external id
  (201 created, 200 updated (204 before v46), 300 several matches, 404 bad field)
- ``PATCH /composite/sobjects/{Object}/{ExtIdField}``  Collections upsert (at most 200
  records, ``allOrNone``, HTTP 200 with per-record results)
- ``GET  /query?q=SOQL``, ``/queryAll?q=``, ``/query/{locator}-{offset}``  (batches of 2,000,
  ``Sforce-Query-Options: batchSize=N``)

Objects: Account (001) and Opportunity (006) with the org's custom fields
(``ERP_Customer_Id__c`` and ``ERP_Invoice_Key__c`` are unique external ids, plus credit limit,
currency, balance, payment status, days overdue ...); ``custom_object=True`` adds
``ERP_Invoice__c`` (a0E). The control API is described in :mod:`emulators.salesforce.control`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from emulators.kit import add_common_control_routes, fault_middleware, serve_main
from emulators.salesforce.auth import token_endpoint
from emulators.salesforce.control import Control
from emulators.salesforce.errors import ApiError
from emulators.salesforce.options import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    SalesforceOptions,
)
from emulators.salesforce.org import Org
from emulators.salesforce.rest import DATA_PREFIX, RestApi

__all__ = [
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "EMULATOR_KEY",
    "Org",
    "SalesforceOptions",
    "main",
    "make_app",
]

DEFAULT_PORT = 8103
TOKEN_PATH = "/services/oauth2/token"

EMULATOR_KEY = web.AppKey("salesforce", Org)
"""``app[EMULATOR_KEY]`` is the org behind an app, for in-process tests."""


def _fault_responder(org: Org) -> Any:
    def respond(request: web.Request, kind: str) -> web.StreamResponse:
        if request.path.startswith("/services/oauth2"):
            if kind == "throttle":
                return web.json_response(
                    {"error": "invalid_grant", "error_description": "login rate exceeded"},
                    status=400,
                )
            return web.json_response(
                {"error": "unknown_error", "error_description": "retry your request"},
                status=500,
            )
        if kind == "throttle":
            error = ApiError(
                403, "REQUEST_LIMIT_EXCEEDED", "ConcurrentPerOrgLongTxn Limit exceeded."
            )
        elif org.opts.fault_error_status == 503:
            error = ApiError(
                503, "SERVER_UNAVAILABLE", "Server temporarily unavailable; please try again later"
            )
        else:
            error = ApiError(
                500,
                "UNKNOWN_EXCEPTION",
                "An unexpected error occurred. Please include this ErrorId if you contact "
                "support: 1204375412-57263 (-1471286021)",
            )
        return error.response()

    return respond


def make_app(options: SalesforceOptions | None = None, **overrides: Any) -> web.Application:
    """The emulator app; ``overrides`` are :class:`SalesforceOptions` fields."""
    opts = dataclasses.replace(options, **overrides) if options else SalesforceOptions(**overrides)
    org = Org(opts)
    rest = RestApi(org)
    app = web.Application(
        middlewares=[
            rest.limit_header_middleware(),
            fault_middleware(org.faults, org.call_stats, _fault_responder(org), rest.route_name),
            rest.api_middleware(),
        ],
        client_max_size=32 * 1024 * 1024,
    )
    app[EMULATOR_KEY] = org

    async def token(request: web.Request) -> web.Response:
        return await token_endpoint(request, org.opts, org.sessions)

    app.router.add_post(TOKEN_PATH, token)
    app.router.add_route("*", DATA_PREFIX, rest.dispatch)
    app.router.add_route("*", DATA_PREFIX + "/{tail:.*}", rest.dispatch)
    add_common_control_routes(app, org.faults, org.call_stats, org.extra_stats, org.reset)
    Control(org, opts.latest_version).register(app)
    return app


def main() -> None:
    serve_main(make_app, DEFAULT_PORT)
