"""Zoho CRM (REST API v8): OAuth refresh per datacenter, records as source and sink.

- auth: refresh-token grant against the datacenter's accounts server; the API host is the
  ``api_domain`` of each token response; one token shared by replicas through ``token_cache``;
- sink: ``POST /{module}/upsert`` with ``duplicate_check_fields``, at most 100 records a call,
  one outcome per record in input order (200 all ok, 207 mixed, 400 all failed);
- source: ``GET /{module}`` with mandatory ``fields``, ``If-Modified-Since``, sorted by
  ``Modified_Time``; ``page`` for the first 2,000 rows, then ``page_token``;
- limits: a concurrency cap per connection; 429 pauses the connection (no Retry-After is sent).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from yarl import URL

from shared.connections import ConnectorType
from shared.connectors.base import PingResult, StreamSpec, WriteOutcome
from shared.failures import (
    AuthError,
    ConnectorError,
    FailureClass,
    PermanentError,
    ThrottledError,
    TransientError,
    http_error,
)
from shared.http import CallTimer, client_session, parse_json, transport_error
from shared.ratelimit import RateLimiter
from shared.retry import DEFAULT_POLICY, RetryPolicy, call_with_retries
from shared.tokens import Token, TokenCache, TokenManager

ACCOUNTS_SERVERS = {
    "us": "https://accounts.zoho.com",
    "eu": "https://accounts.zoho.eu",
    "in": "https://accounts.zoho.in",
    "au": "https://accounts.zoho.com.au",
    "jp": "https://accounts.zoho.jp",
    "cn": "https://accounts.zoho.com.cn",
    "ca": "https://accounts.zohocloud.ca",
    "sa": "https://accounts.zoho.sa",
    "uk": "https://accounts.zoho.uk",
}
MAX_UPSERT = 100
MAX_FIELDS = 50
DISCRETE_PAGE_LIMIT = 2000

# Per-record codes that are the data's fault; the rest of a batch is still written.
PERMANENT_RECORD_CODES = {
    "INVALID_DATA",
    "MANDATORY_NOT_FOUND",
    "DUPLICATE_DATA",
    "MULTIPLE_OR_MULTI_ERRORS",
    "DEPENDENT_FIELD_MISSING",
    "DEPENDENT_MISMATCH",
    "INVALID_MODULE",
    "AUTHORIZATION_FAILED",
    "NOT_APPROVED",
    "ID_ALREADY_CONVERTED",
    "LIMIT_EXCEEDED",
}
TRANSIENT_RECORD_CODES = {"RECORD_LOCKED", "DEPENDENT_SERVICE_ERROR", "INTERNAL_ERROR"}


class ZohoCrmSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    datacenter: Literal["us", "eu", "in", "au", "jp", "cn", "ca", "sa", "uk"] = "us"
    accounts_url: str | None = Field(None, description="overrides the datacenter's server")
    api_domain: str | None = Field(None, description="overrides the token's api_domain")
    api_path: str = "/crm/v8"
    client_id: str = Field(min_length=1)
    max_concurrency: int = Field(10, ge=1, le=25)
    upsert_batch_size: int = Field(MAX_UPSERT, ge=1, le=MAX_UPSERT)
    read_page_size: int = Field(200, ge=1, le=200)
    token_margin_s: float = Field(300, ge=0, le=3000)
    timeout_s: float = Field(60, gt=0, le=900)

    @field_validator("accounts_url", "api_domain")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.host or url.user or url.query_string:
            raise ValueError("must be an http(s) URL with a host and nothing after the path")
        return value.rstrip("/")

    @field_validator("api_path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not re.fullmatch(r"(/[A-Za-z0-9._-]+)+", value):
            raise ValueError("must look like /crm/v8")
        return value

    @property
    def token_url(self) -> str:
        return (self.accounts_url or ACCOUNTS_SERVERS[self.datacenter]) + "/oauth/v2/token"


class ZohoCrmSecrets(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    client_secret: SecretStr
    refresh_token: SecretStr


def escape_criteria(value: str) -> str:
    """Escape a value for ``criteria=(Field:equals:value)``."""
    return re.sub(r"([\\(),])", r"\\\1", value)


def _record_error(item: Mapping[str, Any]) -> tuple[FailureClass, str, str]:
    code = str(item.get("code") or "UNKNOWN")
    details = item.get("details") or {}
    where = ", ".join(
        f"{k}={details[k]}" for k in ("api_name", "json_path", "expected_data_type") if k in details
    )
    message = str(item.get("message") or "rejected")
    text = f"{message}" + (f" ({where})" if where else "")
    if code in TRANSIENT_RECORD_CODES:
        return FailureClass.TRANSIENT, code, text
    return FailureClass.PERMANENT, code, text


class ZohoCrmConnector:
    system = "zoho_crm"

    def __init__(
        self,
        name: str,
        settings: ZohoCrmSettings | Mapping[str, Any],
        secrets: ZohoCrmSecrets | Mapping[str, Any],
        *,
        token_cache: TokenCache | None = None,
        retry_policy: RetryPolicy = DEFAULT_POLICY,
        **_unused: Any,
    ) -> None:
        self.name = name
        self.settings = (
            settings
            if isinstance(settings, ZohoCrmSettings)
            else ZohoCrmSettings.model_validate(settings)
        )
        self._secrets = (
            secrets
            if isinstance(secrets, ZohoCrmSecrets)
            else ZohoCrmSecrets.model_validate(secrets)
        )
        self.max_batch = self.settings.upsert_batch_size
        self.retry_policy = retry_policy
        self.limiter = RateLimiter(name, max_concurrency=self.settings.max_concurrency)
        self.tokens = TokenManager(
            name, self._refresh, cache=token_cache, margin_s=self.settings.token_margin_s
        )
        self._token: Token | None = None
        self._http: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return (
            f"ZohoCrmConnector(name={self.name!r}, datacenter={self.settings.datacenter!r},"
            f" token_url={self.settings.token_url!r})"
        )

    # -- plumbing -----------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = client_session(
                total_timeout_s=self.settings.timeout_s,
                connect_timeout_s=min(10.0, self.settings.timeout_s),
                limit=self.settings.max_concurrency * 2,
            )
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _scrub(self, text: str) -> str:
        for secret in (
            self._secrets.client_secret.get_secret_value(),
            self._secrets.refresh_token.get_secret_value(),
            self._token.value if self._token else "",
        ):
            if secret:
                text = text.replace(secret, "***")
        return text

    async def _send(
        self, method: str, url: URL, *, what: str, operation: str, **kwargs: Any
    ) -> tuple[int, str, str]:
        """One HTTP exchange: status, body text and content type; transport failures come back
        classified and timed."""
        timer = CallTimer(self.name, operation)
        try:
            async with self._client().request(
                method, url, allow_redirects=False, **kwargs
            ) as response:
                status, text = response.status, await response.text()
                ctype = response.content_type
        except (aiohttp.ClientError, TimeoutError) as exc:
            timer.done(type(exc).__name__)
            raise transport_error(
                exc, what, url, timeout_s=self.settings.timeout_s, scrub=self._scrub
            ) from None
        timer.done(status)
        return status, text, ctype

    # -- auth ---------------------------------------------------------------------------------

    async def _refresh(self) -> Token:
        url = URL(self.settings.token_url)
        what = f"Zoho token refresh at {url.scheme}://{url.host}"
        form = {
            "grant_type": "refresh_token",
            "refresh_token": self._secrets.refresh_token.get_secret_value(),
            "client_id": self.settings.client_id,
            "client_secret": self._secrets.client_secret.get_secret_value(),
        }

        async def once() -> Token:
            status, text, ctype = await self._send(
                "POST", url, what=what, operation="oauth.token", data=form
            )
            if status >= 500:
                raise TransientError(f"{what}: HTTP {status}", status=status)
            body = parse_json(text, status=status, content_type=ctype, what=what)
            return self._token_from(body, what, status)

        return await call_with_retries(once, policy=self.retry_policy)

    def _token_from(self, body: Any, what: str, status: int) -> Token:
        if not isinstance(body, dict):
            raise TransientError(f"{what}: unexpected answer (HTTP {status})", status=status)
        if "access_token" in body:
            expires = body.get("expires_in", 3600)
            if "expires_in_sec" in body:  # legacy: expires_in in milliseconds
                expires = body["expires_in_sec"]
            try:
                seconds = float(expires)
            except (TypeError, ValueError):
                seconds = 3600.0
            api_domain = self.settings.api_domain or body.get("api_domain")
            if not isinstance(api_domain, str) or not api_domain.startswith("http"):
                raise TransientError(f"{what}: the token answer has no api_domain")
            return Token(
                str(body["access_token"]),
                time.time() + seconds,
                {"api_domain": api_domain.rstrip("/")},
            )
        error = str(body.get("error") or "")
        if error == "invalid_client":
            raise AuthError(
                f"{what}: invalid_client: the client id or secret is wrong, or the account lives"
                f" in another datacenter than {URL(self.settings.token_url).host}"
                " (set datacenter or accounts_url)",
                code="invalid_client",
                status=status,
            )
        if error == "invalid_code":
            raise AuthError(
                f"{what}: invalid_code: the refresh token is revoked or wrong; generate a new"
                " one and update the connection's secrets",
                code="invalid_code",
                status=status,
            )
        if (
            error == "Access Denied"
            or "too many requests" in str(body.get("error_description", "")).lower()
        ):
            raise ThrottledError(
                f"{what}: token limit reached (10 tokens per refresh token in 10 minutes)",
                code="TOKEN_THROTTLED",
                retry_after=60,
            )
        raise AuthError(f"{what}: {error or 'no access_token in the answer'}", code=error or None)

    async def _auth(self) -> Token:
        token = await self.tokens.get()
        self._token = token
        return token

    async def _refresh_after_401(self) -> None:
        self.tokens.invalidate(self._token)

    # -- one API call -------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        operation: str,
    ) -> tuple[int, Any]:
        """An API call with retries: (status, decoded body). Raises classified errors."""

        async def once() -> tuple[int, Any]:
            token = await self._auth()
            url = URL(token.context["api_domain"] + self.settings.api_path + path)
            what = f"Zoho CRM {method} {self.settings.api_path}{path}"
            status, text, ctype = await self._send(
                method,
                url,
                what=what,
                operation=operation,
                params=params,
                json=json,
                headers={"Authorization": f"Zoho-oauthtoken {token.value}", **(headers or {})},
            )
            if status in (204, 304):
                return status, None
            body = parse_json(text, status=status, content_type=ctype, what=what)
            if status >= 400 and not (status == 400 and isinstance(body, dict) and "data" in body):
                raise self._request_error(status, body, what)
            return status, body

        return await call_with_retries(
            once,
            policy=self.retry_policy,
            limiter=self.limiter,
            refresh_auth=self._refresh_after_401,
        )

    def _request_error(self, status: int, body: Any, what: str) -> ConnectorError:
        code = str(body.get("code")) if isinstance(body, dict) and body.get("code") else None
        message = str(body.get("message")) if isinstance(body, dict) else ""
        text = f"{what}: HTTP {status} {code or ''} {message}".strip()
        if status == 429 or code == "TOO_MANY_REQUESTS":
            return ThrottledError(
                f"{text} (API credits or the concurrency limit)", code=code, status=status
            )
        if status == 401 and code == "OAUTH_SCOPE_MISMATCH":
            return PermanentError(
                f"{text}: the token's scopes do not allow this call; re-consent with"
                " ZohoCRM.modules.ALL and ZohoCRM.settings.ALL",
                code=code,
                status=status,
            )
        if status == 401:
            return AuthError(text, code=code, status=status)
        if status == 403:
            return PermanentError(
                f"{text}: the Zoho user lacks permission for this module", code=code, status=status
            )
        if status == 404:
            return PermanentError(
                f"{text}: the URL does not exist; check api_path (e.g. /crm/v8)",
                code=code,
                status=status,
            )
        return http_error(status, text, code=code)

    # -- sink ---------------------------------------------------------------------------------

    async def upsert(
        self, entity: str, records: list[dict[str, Any]], match_on: list[str]
    ) -> list[WriteOutcome]:
        chunks = [records[i : i + self.max_batch] for i in range(0, len(records), self.max_batch)]
        results = await asyncio.gather(*(self._upsert_chunk(entity, c, match_on) for c in chunks))
        return [outcome for chunk in results for outcome in chunk]

    async def _upsert_chunk(
        self, entity: str, records: list[dict[str, Any]], match_on: list[str]
    ) -> list[WriteOutcome]:
        _, body = await self._call(
            "POST",
            f"/{entity}/upsert",
            json={"data": records, "duplicate_check_fields": match_on, "trigger": []},
            operation=f"upsert.{entity}",
        )
        items = body.get("data") if isinstance(body, dict) else None
        if not isinstance(items, list) or len(items) != len(records):
            raise TransientError(
                f"Zoho CRM upsert {entity}: malformed response: expected {len(records)} results,"
                f" got {len(items) if isinstance(items, list) else type(items).__name__}",
                code="MALFORMED_RESPONSE",
            )
        outcomes = []
        for item in items:
            if not isinstance(item, dict):
                outcomes.append(
                    WriteOutcome(False, failure=FailureClass.TRANSIENT, error="malformed result")
                )
                continue
            if item.get("status") == "success":
                details = item.get("details") or {}
                action = "insert" if item.get("action") == "insert" else "update"
                outcomes.append(WriteOutcome(True, target_id=str(details.get("id")), action=action))
            else:
                failure, code, text = _record_error(item)
                outcomes.append(WriteOutcome(False, failure=failure, error=text, code=code))
        return outcomes

    async def find_id(self, entity: str, field: str, value: str) -> str | None:
        _, body = await self._call(
            "GET",
            f"/{entity}/search",
            params={"criteria": f"({field}:equals:{escape_criteria(value)})", "fields": field},
            operation=f"search.{entity}",
        )
        for record in (body or {}).get("data") or []:
            if isinstance(record, dict) and str(record.get(field, "")) == value:
                return str(record["id"])
        return None

    # -- source -------------------------------------------------------------------------------

    def _fields(self, stream: StreamSpec) -> str:
        names = list(stream.select or ())
        for extra in ("id", "Modified_Time", *stream.key_fields):
            if extra not in names:
                names.append(extra)
        if len(names) > MAX_FIELDS:
            raise PermanentError(
                f"Zoho CRM reads at most {MAX_FIELDS} fields a call; {stream.entity} asks for"
                f" {len(names)}"
            )
        return ",".join(names)

    async def changed_since(
        self, stream: StreamSpec, since: str | None
    ) -> AsyncIterator[list[dict[str, Any]]]:
        params = {
            "fields": self._fields(stream),
            "per_page": str((stream.page_size and min(stream.page_size, 200)) or 200),
            "sort_by": "Modified_Time",
            "sort_order": "asc",
        }
        headers = {"If-Modified-Since": since.replace("Z", "+00:00")} if since else {}
        per_page = int(params["per_page"])
        page, token = 1, None
        while True:
            query = dict(params)
            if token is None:
                query["page"] = str(page)
            else:
                query["page_token"] = token
            status, body = await self._call(
                "GET",
                f"/{stream.entity}",
                params=query,
                headers=headers,
                operation=f"read.{stream.entity}",
            )
            if status in (204, 304) or not body:
                return
            rows = body.get("data")
            if not isinstance(rows, list):
                raise TransientError(f"Zoho CRM read {stream.entity}: no data array")
            if rows:
                yield rows
            info = body.get("info") or {}
            if not info.get("more_records"):
                return
            next_token = info.get("next_page_token")
            if token is not None or (page + 1) * per_page > DISCRETE_PAGE_LIMIT:
                if not next_token:
                    raise TransientError(
                        f"Zoho CRM read {stream.entity}: more records but no next_page_token"
                    )
                token = str(next_token)
            else:
                page += 1

    async def fetch(self, stream: StreamSpec, ids: list[str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i in range(0, len(ids), 100):
            _status, body = await self._call(
                "GET",
                f"/{stream.entity}",
                params={"ids": ",".join(ids[i : i + 100]), "fields": self._fields(stream)},
                operation=f"fetch.{stream.entity}",
            )
            if body:
                out.extend(r for r in body.get("data") or [] if isinstance(r, dict))
        return out

    # -- ping ---------------------------------------------------------------------------------

    async def ping(self) -> PingResult:
        result = PingResult(self.name, self.system)
        try:
            token = await self._auth()
        except ConnectorError as exc:
            result.add("token", False, self._scrub(str(exc)))
            return result
        result.add(
            "token",
            True,
            f"access token from {URL(self.settings.token_url).host};"
            f" API at {token.context['api_domain']}",
        )
        try:
            _, body = await self._call("GET", "/org", operation="ping.org")
            org = ((body or {}).get("org") or [{}])[0]
            result.add(
                "api", True, f"{self.settings.api_path} answers; org {org.get('company_name', '?')}"
            )
        except ConnectorError as exc:
            result.add("api", False, self._scrub(str(exc)))
            return result
        try:
            _, body = await self._call("GET", "/settings/modules", operation="ping.modules")
            modules = {m.get("api_name") for m in (body or {}).get("modules") or []}
            wanted = {"Accounts", "Deals"}
            missing = wanted - modules
            result.add(
                "permissions",
                not missing,
                f"modules readable: {len(modules)}"
                + (f"; missing {', '.join(sorted(missing))}" if missing else ""),
            )
        except ConnectorError as exc:
            result.add("permissions", False, self._scrub(str(exc)))
        return result


CONNECTOR_TYPE = ConnectorType(
    system="zoho_crm",
    settings_model=ZohoCrmSettings,
    secrets_model=ZohoCrmSecrets,
    factory=ZohoCrmConnector,
    description="Zoho CRM REST API v8 (OAuth refresh token, per datacenter)",
)
