"""The datacenter's accounts server (``/oauth/v2/token``, ``/oauth/v2/token/revoke``) and the
``Authorization: Zoho-oauthtoken`` check of every API call, on the kit's token server.

Zoho answers token errors with HTTP 200 and ``{"error": "invalid_client" | "invalid_code" |
"unsupported_grant_type"}``; more than ``token_rate_limit`` tokens per refresh token within
``token_rate_window_s`` get ``{"error": "Access Denied", ...}``; the 16th active access token of a
refresh token invalidates the oldest.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from aiohttp import web

from emulators.kit import GrantError, TokenServer, TokenStore
from emulators.kit.tokens import random_token
from emulators.zoho_crm.errors import flat_error
from emulators.zoho_crm.org import Org

Json = dict[str, Any]

ZOHO_TOKEN_ERRORS = {
    "unsupported_grant_type": "unsupported_grant_type",
    "invalid_client": "invalid_client",
    "invalid_grant": "invalid_code",
    "invalid_request": "invalid_code",
}


def zoho_token() -> str:
    return random_token("1000.")


class ZohoAuth:
    """OAuth grants (refresh_token, authorization_code) and the API's token check."""

    def __init__(self, org: Org) -> None:
        self.org = org
        opts = org.opts
        self.tokens = TokenStore(
            org.now,
            ttl_s=lambda: opts.token_ttl_s,
            max_per_subject=lambda: opts.max_active_tokens,
            make_token=zoho_token,
        )
        self.server = TokenServer(
            self.tokens,
            clients=dict(opts.clients),
            refresh_tokens=dict(opts.refresh_tokens),
            grant_codes=dict(opts.grant_codes),
            grants=("refresh_token", "authorization_code"),
            make_refresh_token=zoho_token,
        )
        self.issue_times: dict[str, deque[float]] = {}

    def reset(self) -> None:
        """Forgets the token rate window; tokens stay valid."""
        self.issue_times = {}

    def throttle_response(self) -> web.Response:
        return web.json_response(
            {
                "error_description": self.org.opts.token_throttle_message,
                "error": "Access Denied",
                "status": "failure",
            }
        )

    async def token(self, request: web.Request) -> web.Response:
        counters = self.org.counters
        params = await TokenServer.read_params(request, basic_client=False)
        counters["token_requests"] += 1
        try:
            authorized = self.server.authorize(params)
        except GrantError as exc:
            counters["token_errors"] += 1
            return web.json_response({"error": ZOHO_TOKEN_ERRORS.get(exc.error, exc.error)})
        now = self.org.now()
        opts = self.org.opts
        if authorized.subject:
            issued = self.issue_times.setdefault(authorized.subject, deque())
            while issued and issued[0] <= now - opts.token_rate_window_s:
                issued.popleft()
            if len(issued) >= opts.token_rate_limit:
                counters["token_throttled"] += 1
                return self.throttle_response()
            issued.append(now)
        grant = self.server.issue(authorized)
        counters["tokens_issued"] += 1
        body: Json = {
            "access_token": grant.access.token,
            "scope": opts.scope,
            "api_domain": self.org.api_domain(request),
            "token_type": "Bearer",
            "expires_in": int(opts.token_ttl_s),
        }
        if grant.refresh_token:
            body["refresh_token"] = grant.refresh_token
        return web.json_response(body)

    async def revoke(self, request: web.Request) -> web.Response:
        params = await TokenServer.read_params(request, basic_client=False)
        if self.server.revoke(params.get("token", "")):
            return web.json_response({"status": "success"})
        return web.json_response({"error": "invalid_code"})

    def authenticate(self, request: web.Request) -> web.Response | None:
        """None when the call carries a live token; the 401 answer otherwise."""
        header = request.headers.get("Authorization", "").strip()
        scheme, _, token = header.partition(" ")
        token = token.strip()
        schemes = {"zoho-oauthtoken"} | ({"bearer"} if self.org.opts.accept_bearer else set())
        if not token or scheme.lower() not in schemes:
            self.org.counters["auth_failures"] += 1
            return flat_error(401, "AUTHENTICATION_FAILURE", "Authentication failed")
        if self.tokens.check(token) is None:
            self.org.counters["auth_failures"] += 1
            return flat_error(401, "INVALID_TOKEN", "invalid oauth token")
        return None

    def register_refresh_token(
        self, client_id: str, token: str | None = None, client_secret: str | None = None
    ) -> str:
        if client_secret is not None:
            self.server.clients[client_id] = client_secret
        return self.server.register_refresh_token(client_id, token)

    def default_client(self) -> str:
        return next(iter(self.server.clients), "")
