"""OAuth 2.0 client credentials at ``/services/oauth2/token``, and the sessions it opens.

``POST /services/oauth2/token`` (``application/x-www-form-urlencoded``):
``grant_type=client_credentials`` with ``client_id`` + ``client_secret`` in the body or an
``Authorization: Basic base64(id:secret)`` header. The answer has ``access_token``,
``instance_url``, ``id``, ``token_type``, ``issued_at`` (epoch milliseconds as a string),
``signature`` and ``scope``; no ``refresh_token`` and no ``expires_in``. Sessions time out after
the session timeout of inactivity; a call with an expired or unknown token gets
``401 [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from emulators.salesforce.errors import id18
from emulators.salesforce.options import SalesforceOptions

Json = dict[str, Any]


@dataclass
class Session:
    token: str
    client_id: str
    issued_at: float
    expires_at: float


class Sessions:
    def __init__(self, opts: SalesforceOptions, now: Callable[[], float]) -> None:
        self.opts = opts
        self.now = now
        self.by_token: dict[str, Session] = {}
        self.issued = 0
        self.token_errors = 0
        self.auth_failures = 0

    def issue(self, client_id: str) -> Session:
        now = self.now()
        token = f"{self.opts.org_id}!AQ{secrets.token_urlsafe(72)}"
        session = Session(token, client_id, now, now + self.opts.session_timeout_s)
        self.by_token[token] = session
        self.issued += 1
        if len(self.by_token) > 10_000:
            self.purge()
        return session

    def purge(self) -> None:
        now = self.now()
        for token in [t for t, s in self.by_token.items() if s.expires_at <= now]:
            del self.by_token[token]

    def check(self, header: str) -> Session | None:
        """The live session an ``Authorization`` header names (renewing its timeout)."""
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() not in ("bearer", "oauth") or not token.strip():
            self.auth_failures += 1
            return None
        session = self.by_token.get(token.strip())
        now = self.now()
        if session is None or session.expires_at <= now:
            self.auth_failures += 1
            return None
        if self.opts.session_sliding:
            session.expires_at = now + self.opts.session_timeout_s
        return session

    def expire(self, token: str | None = None) -> int:
        expired = 0
        now = self.now()
        for session in self.by_token.values():
            if token is not None and session.token != token:
                continue
            if session.expires_at > now:
                session.expires_at = now
                expired += 1
        return expired


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def instance_url(opts: SalesforceOptions, request: web.Request) -> str:
    return (opts.instance_url or f"{request.scheme}://{request.host}").rstrip("/")


async def token_endpoint(
    request: web.Request, opts: SalesforceOptions, sessions: Sessions
) -> web.Response:
    params: dict[str, str] = dict(request.query)
    if request.can_read_body:
        with contextlib.suppress(Exception):
            form = await request.post()
            params.update({k: str(v) for k, v in form.items()})
    host = (request.host or "").split(":")[0].lower()
    if host in opts.generic_login_hosts:
        sessions.token_errors += 1
        return _oauth_error(400, "invalid_grant", "request not supported on this domain")
    grant_type = params.get("grant_type", "")
    if grant_type != "client_credentials":
        sessions.token_errors += 1
        return _oauth_error(400, "unsupported_grant_type", "grant type not supported")
    client_id = params.get("client_id", "")
    secret = params.get("client_secret", "")
    basic = request.headers.get("Authorization", "")
    if basic[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(basic[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        client_id, _, secret = decoded.partition(":")
    status = opts.invalid_client_status
    if client_id not in opts.clients:
        sessions.token_errors += 1
        return _oauth_error(status, "invalid_client_id", "client identifier invalid")
    if not hmac.compare_digest(opts.clients[client_id].encode(), secret.encode()):
        sessions.token_errors += 1
        return _oauth_error(status, "invalid_client", "invalid client credentials")
    session = sessions.issue(client_id)
    base = instance_url(opts, request)
    identity = f"{base}/id/{id18(opts.org_id)}/{id18(opts.user_id)}"
    issued_at = str(int(session.issued_at * 1000))
    signature = base64.b64encode(
        hmac.new(
            opts.clients[client_id].encode(), (identity + issued_at).encode(), hashlib.sha256
        ).digest()
    ).decode()
    return web.json_response(
        {
            "access_token": session.token,
            "signature": signature,
            "scope": opts.scope,
            "instance_url": base,
            "id": identity,
            "token_type": "Bearer",
            "issued_at": issued_at,
        }
    )
