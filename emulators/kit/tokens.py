"""An OAuth 2.0 token server: the grants vendors use, and the access tokens they hand out.

- :class:`TokenStore`: access tokens with an expiry, per-subject caps (Zoho: the 16th active
  token of a refresh token invalidates the oldest), revocation, sliding renewal (Salesforce
  sessions) and "expire all" for tests.
- :class:`TokenServer`: checks a grant request against registered clients and credentials and
  issues a token from the store. Grants: ``refresh_token`` (Zoho, Acumatica offline_access),
  ``client_credentials`` (Salesforce), ``password`` (Infor ``.ionapi``: the service account key
  and secret as user name and password) and ``authorization_code`` (one-time codes).
  Refusals are :class:`GrantError` with RFC 6749 error codes; each emulator renders them in
  its vendor's shape (Zoho answers HTTP 200 with ``{"error": "invalid_code"}``).
- :func:`add_token_control_routes`: ``POST /_control/expire_tokens`` for tests.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import secrets
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from emulators.kit.control import CONTROL_PREFIX, json_body

GRANT_TYPES = ("refresh_token", "client_credentials", "password", "authorization_code")

FloatSource = float | Callable[[], float]
IntOrNone = int | None | Callable[[], int | None]


def _read(value: Any) -> Any:
    return value() if callable(value) else value


def random_token(prefix: str = "") -> str:
    return f"{prefix}{secrets.token_hex(16)}.{secrets.token_hex(16)}"


def same_secret(a: str, b: str) -> bool:
    """Constant-time comparison of two secrets."""
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass
class AccessToken:
    token: str
    client_id: str
    subject: str
    """What the token was granted for: a refresh token, a user name, or the client itself."""
    grant_type: str
    issued_at: float
    expires_at: float
    scope: str = ""

    def live(self, now: float) -> bool:
        return self.expires_at > now


class TokenStore:
    """Access tokens by value; expiry read from ``clock``."""

    def __init__(
        self,
        clock: Callable[[], float],
        ttl_s: FloatSource = 3600.0,
        max_per_subject: IntOrNone = None,
        make_token: Callable[[], str] = random_token,
    ) -> None:
        self.clock = clock
        self.ttl_s = ttl_s
        self.max_per_subject = max_per_subject
        self.make_token = make_token
        self.tokens: dict[str, AccessToken] = {}
        self._by_subject: dict[str, deque[str]] = {}
        self.issued = 0

    def issue(self, client_id: str, subject: str, grant_type: str, scope: str = "") -> AccessToken:
        now = self.clock()
        token = AccessToken(
            token=self.make_token(),
            client_id=client_id,
            subject=subject,
            grant_type=grant_type,
            issued_at=now,
            expires_at=now + float(_read(self.ttl_s)),
            scope=scope,
        )
        self.tokens[token.token] = token
        active = self._by_subject.setdefault(subject, deque())
        active.append(token.token)
        cap = _read(self.max_per_subject)
        while cap is not None and len(active) > cap:
            self.tokens.pop(active.popleft(), None)
        self.issued += 1
        if len(self.tokens) > 50_000:
            self.purge()
        return token

    def get(self, token: str) -> AccessToken | None:
        """The token, live or not."""
        return self.tokens.get(token)

    def check(self, token: str, sliding_ttl_s: float | None = None) -> AccessToken | None:
        """The live token of that value (its expiry pushed out by ``sliding_ttl_s`` if given)."""
        found = self.tokens.get(token)
        now = self.clock()
        if found is None or not found.live(now):
            return None
        if sliding_ttl_s is not None:
            found.expires_at = now + sliding_ttl_s
        return found

    def revoke(self, token: str) -> bool:
        found = self.tokens.pop(token, None)
        if found is None:
            return False
        active = self._by_subject.get(found.subject)
        if active is not None:
            with contextlib.suppress(ValueError):
                active.remove(token)
        return True

    def revoke_subject(self, subject: str) -> int:
        """Revokes every access token granted for ``subject`` (a revoked refresh token)."""
        revoked = 0
        for token in self._by_subject.pop(subject, deque()):
            if self.tokens.pop(token, None) is not None:
                revoked += 1
        return revoked

    def expire(
        self,
        token: str | None = None,
        subject: str | None = None,
        client_id: str | None = None,
    ) -> int:
        """Expires now every live token matching all the given filters (all tokens if none)."""
        now = self.clock()
        expired = 0
        for access in self.tokens.values():
            if token is not None and access.token != token:
                continue
            if subject is not None and access.subject != subject:
                continue
            if client_id is not None and access.client_id != client_id:
                continue
            if access.live(now):
                access.expires_at = now
                expired += 1
        return expired

    def purge(self) -> None:
        """Forgets expired tokens."""
        now = self.clock()
        for value in [t for t, a in self.tokens.items() if not a.live(now)]:
            self.revoke(value)

    def live_count(self) -> int:
        now = self.clock()
        return sum(1 for a in self.tokens.values() if a.live(now))


class GrantError(Exception):
    """A refused grant. ``error`` is the RFC 6749 code: ``invalid_request``,
    ``invalid_client``, ``invalid_grant``, ``unsupported_grant_type``."""

    def __init__(self, error: str, description: str = "") -> None:
        super().__init__(description or error)
        self.error = error
        self.description = description


@dataclass
class Authorized:
    """A grant request that passed every check; :meth:`TokenServer.issue` completes it."""

    grant_type: str
    client_id: str
    subject: str
    scope: str = ""
    code: str | None = None


@dataclass
class Grant:
    access: AccessToken
    refresh_token: str | None = None
    """A refresh token minted by this grant (authorization_code; password when configured)."""


@dataclass
class TokenServer:
    """Grant checks over registered credentials; tokens come from ``store``."""

    store: TokenStore
    clients: dict[str, str] = field(default_factory=dict)
    """client_id -> client_secret."""
    refresh_tokens: dict[str, str] = field(default_factory=dict)
    """refresh token -> client_id."""
    users: dict[str, str] = field(default_factory=dict)
    """user name -> password (password grant)."""
    grant_codes: dict[str, str] = field(default_factory=dict)
    """one-time authorization code -> client_id."""
    grants: Collection[str] = GRANT_TYPES
    password_issues_refresh_token: bool = False
    make_refresh_token: Callable[[], str] = random_token

    @staticmethod
    async def read_params(request: web.Request, basic_client: bool = True) -> dict[str, str]:
        """Query string and form body; client credentials from ``Authorization: Basic`` too."""
        params: dict[str, str] = dict(request.query)
        if request.can_read_body:
            with contextlib.suppress(Exception):
                form = await request.post()
                params.update({k: str(v) for k, v in form.items()})
        header = request.headers.get("Authorization", "")
        if basic_client and header[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            client_id, sep, secret = decoded.partition(":")
            if sep:
                params["client_id"], params["client_secret"] = client_id, secret
        return params

    def authorize(self, params: Mapping[str, str]) -> Authorized:
        """Checks a grant request; raises :class:`GrantError`. Consumes nothing."""
        grant_type = params.get("grant_type", "")
        if grant_type not in self.grants:
            raise GrantError("unsupported_grant_type", f"grant type {grant_type!r}")
        client_id = params.get("client_id", "")
        secret = params.get("client_secret", "")
        known = self.clients.get(client_id)
        if known is None or not same_secret(known, secret):
            raise GrantError("invalid_client", "client identifier or secret invalid")
        scope = params.get("scope", "")
        if grant_type == "client_credentials":
            return Authorized(grant_type, client_id, client_id, scope)
        if grant_type == "refresh_token":
            refresh = params.get("refresh_token", "")
            if not refresh:
                raise GrantError("invalid_request", "refresh_token missing")
            if self.refresh_tokens.get(refresh) != client_id:
                raise GrantError("invalid_grant", "refresh token invalid or revoked")
            return Authorized(grant_type, client_id, refresh, scope)
        if grant_type == "password":
            user = params.get("username", "")
            password = params.get("password", "")
            expected = self.users.get(user)
            if not user or expected is None or not same_secret(expected, password):
                raise GrantError("invalid_grant", "user name or password invalid")
            return Authorized(grant_type, client_id, user, scope)
        code = params.get("code", "")
        if not code or self.grant_codes.get(code) != client_id:
            raise GrantError("invalid_grant", "authorization code invalid or used")
        return Authorized(grant_type, client_id, "", scope, code=code)

    def issue(self, authorized: Authorized) -> Grant:
        """Issues the access token (and a refresh token where the grant mints one)."""
        refresh: str | None = None
        subject = authorized.subject
        if authorized.grant_type == "authorization_code":
            self.grant_codes.pop(authorized.code or "", None)
            refresh = self.make_refresh_token()
            self.refresh_tokens[refresh] = authorized.client_id
            subject = refresh
        elif authorized.grant_type == "password" and self.password_issues_refresh_token:
            refresh = self.make_refresh_token()
            self.refresh_tokens[refresh] = authorized.client_id
        access = self.store.issue(
            authorized.client_id, subject, authorized.grant_type, authorized.scope
        )
        return Grant(access, refresh)

    def grant(self, params: Mapping[str, str]) -> Grant:
        return self.issue(self.authorize(params))

    def revoke(self, token: str) -> bool:
        """Revokes a refresh token (and every access token it granted) or an access token."""
        if token in self.refresh_tokens:
            del self.refresh_tokens[token]
            self.store.revoke_subject(token)
            return True
        return self.store.revoke(token)

    def register_refresh_token(self, client_id: str, token: str | None = None) -> str:
        token = token or self.make_refresh_token()
        self.refresh_tokens[token] = client_id
        return token


def bearer_response(grant: Grant, **extra: Any) -> dict[str, Any]:
    """The standard token answer: access_token, token_type, expires_in (+ refresh_token)."""
    access = grant.access
    body: dict[str, Any] = {
        "access_token": access.token,
        "token_type": "Bearer",
        "expires_in": max(0, round(access.expires_at - access.issued_at)),
    }
    if grant.refresh_token:
        body["refresh_token"] = grant.refresh_token
    body.update(extra)
    return body


def add_token_control_routes(
    app: web.Application, store: TokenStore, paths: Collection[str] = ("expire_tokens",)
) -> None:
    """``POST /_control/expire_tokens`` ``{"access_token"?, "refresh_token"?, "subject"?,
    "client_id"?}``: expire now every live access token matching (all of them for ``{}``)."""

    async def expire(request: web.Request) -> web.Response:
        body = await json_body(request)
        expired = store.expire(
            token=body.get("access_token") or None,
            subject=body.get("refresh_token") or body.get("subject") or None,
            client_id=body.get("client_id") or None,
        )
        return web.json_response({"expired": expired})

    for path in paths:
        app.router.add_post(f"{CONTROL_PREFIX}/{path}", expire)
