"""SYSPRO 8 connector (source side).

SYSPRO offers two doors, and this connector uses each for what it is good at
(``reference/erp_apis.md`` section 1):

- **e.net Solutions REST** (``rest_url``, e.g. ``http://host:8101/SYSPROWCFService/Rest``): every
  call is a GET with query-string parameters. ``Logon`` (Operator, OperatorPassword, CompanyId,
  CompanyPassword) answers a session id (the ``UserId`` of every later call) as plain text or as a
  JSON-quoted string; a failure is *not* an HTTP error but a body starting ``ERROR``. The session
  is kept, renewed once (single flight) when SYSPRO says it is invalid or expired, and logged off
  on ``close()`` because an orphaned session holds a licence seat. Credentials travel in the URL,
  so no e.net URL is ever logged or put into an exception with its query.
- **OData v4** (``odata_url``, the service root; its path is UNVERIFIED, hence a setting): HTTP
  Basic auth, read-only, one entity set per table (``ArCustomer``, ``ArInvoice``; names UNVERIFIED,
  hence ``entity_sets``). Rows are read with ``$filter``/``$orderby``/``$select``, client paging
  with ``$top``/``$skip`` and server-driven paging with ``@odata.nextLink``.

Keys are the SQL table keys (ArCustomer: Customer; ArInvoice: Customer, Invoice, DocumentType); the
flow names them in its ``StreamSpec``. Every value that goes into ``$filter`` goes through
:func:`odata_literal`.

Answers are capped in size (``max_response_mb``, ``shared.http.send``); an OData page is decoded
into a model before it is trusted (a 200 that carries an OData error object raises the server's
message); a read ends with a clear error when the server pages in a loop or past
``max_pages_per_read`` pages (``shared.connectors.paging``). The session logon runs inside the
retries of the e.net call that needs it, never with retries of its own. The passwords, the
Basic credentials and every session id are registered with ``shared.logs`` and masked in every
text we write.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote, urljoin

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from yarl import URL

from shared.connectors.base import Capabilities, CursorKind, PingResult, StreamDecl, StreamSpec
from shared.connectors.paging import DEFAULT_MAX_PAGES, MAX_PAGES_LIMIT, PageGuard
from shared.connectors.registry import ConnectorType
from shared.failures import (
    AuthError,
    ConnectorError,
    PermanentError,
    ThrottledError,
    TransientError,
    http_error,
    parse_retry_after,
)
from shared.http import (
    DEFAULT_MAX_RESPONSE_MB,
    BodyCap,
    HttpAnswer,
    client_session,
    decode_answer,
    send,
    validation_problem,
)
from shared.keys import decode_key
from shared.logs import redact, register_secret, register_secrets
from shared.ratelimit import RateLimiter
from shared.retry import DEFAULT_POLICY, RetryPolicy, call_with_retries
from shared.tokens import Token, TokenCache, TokenManager, TokenRefusedError

log = logging.getLogger(__name__)

SYSTEM = "syspro"
DEFAULT_TABLES = ("ArCustomer", "ArInvoice")
EXAMPLE_REST_URL = "http://127.0.0.1:8101/SYSPROWCFService/Rest"
EXAMPLE_ODATA_URL = "https://syspro.example.com/SYSPRO8Odata/SYSPROOData"

# How long a session is trusted before a fresh logon. SYSPRO's idle timeout is not documented
# (UNVERIFIED); an expired session is detected from its ERROR answer and renewed anyway, so this
# only bounds how old a session shared through the token cache may get.
SESSION_MAX_AGE_S = 8 * 3600.0
# fetch(): ids per request and the longest encoded $filter (IIS's default maxQueryString is 2048).
FETCH_CHUNK_IDS = 40
FETCH_FILTER_MAX_CHARS = 1500
# ping(): fail fast rather than retry for a minute.
PING_POLICY = RetryPolicy(attempts=2, base_delay_s=0.2, max_delay_s=1.0, throttle_delay_s=1.0)

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# An ERROR answer that means "log on again" (not a business-object or logon failure).
_SESSION_GONE = re.compile(
    r"(?:session|user\s*id|guid)\b.*?\b(?:invalid|expired|timed?\s*out|unknown|not\s+(?:found|valid"
    r"|logged)|does\s+not\s+exist|no\s+longer|terminated)"
    r"|\b(?:invalid|expired|unknown)\b.*?\b(?:session|user\s*id)\b"
    r"|not\s+logged\s+on|logged\s+off",
    re.IGNORECASE | re.DOTALL,
)
_ERROR_PREFIX = re.compile(r"^ERROR[\s:-]*", re.IGNORECASE)
_XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>")
_XML_ENCODING = re.compile(rb"^\s*<\?xml[^>]*encoding=[\"']([A-Za-z0-9._-]+)[\"']")
_HTML_TITLE = re.compile(r"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ].*)?")
_SESSION_ID = re.compile(r"[A-Za-z0-9{}-]{8,100}")


# --------------------------------------------------------------------------------------------
# Settings and secrets
# --------------------------------------------------------------------------------------------


def _service_url(value: str, what: str, example: str) -> str:
    text = value.strip()
    try:
        url = URL(text)
    except ValueError:
        raise ValueError(f"{what} is not a URL (example: {example})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{what} must be an http(s) URL with a host (example: {example})")
    if url.user is not None or url.password is not None:
        raise ValueError(f"{what} must not carry a user name or password; use the secrets")
    if url.query_string or url.fragment:
        raise ValueError(f"{what} must not have a query string or fragment")
    return text.rstrip("/")


class SysproSettings(BaseModel):
    """Non-secret settings of a SYSPRO 8 connection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rest_url: str = Field(
        description="e.net Solutions REST base URL (the WCF service's REST binding)",
        examples=[EXAMPLE_REST_URL],
    )
    odata_url: str = Field(
        description=(
            "SYSPRO OData service root (path UNVERIFIED; commonly /SYSPRO8Odata/SYSPROOData)"
        ),
        examples=[EXAMPLE_ODATA_URL],
    )
    operator: str = Field(min_length=1, max_length=50, description="SYSPRO operator code")
    company_id: str = Field(min_length=1, max_length=20, description="SYSPRO company id")
    odata_user: str | None = Field(
        default=None,
        description=(
            "Basic-auth user of the OData service; default: the operator (format UNVERIFIED)"
        ),
    )
    entity_sets: dict[str, str] = Field(
        default_factory=lambda: {name: name for name in DEFAULT_TABLES},
        description="table -> OData entity-set name; a table not listed uses its own name",
    )
    page_size: int = Field(default=1000, ge=1, le=100_000, description="rows per request ($top)")
    max_concurrency: int = Field(default=4, ge=1, le=64)
    case_sensitive_keys: bool = Field(
        default=False,
        description=(
            "whether keys that differ only by case are different records; SQL Server's default"
            " collation says no, so c0001 and C0001 are one customer (keys are upper-cased)"
        ),
    )
    timeout_s: float = Field(default=60.0, gt=0, le=900)
    max_response_mb: float = Field(
        default=DEFAULT_MAX_RESPONSE_MB, gt=0, le=1024, description="largest answer accepted"
    )
    max_pages_per_read: int = Field(
        default=DEFAULT_MAX_PAGES, ge=1, le=MAX_PAGES_LIMIT, description="ceiling of pages a read"
    )

    @field_validator("rest_url")
    @classmethod
    def _check_rest_url(cls, value: str) -> str:
        return _service_url(value, "rest_url", EXAMPLE_REST_URL)

    @field_validator("odata_url")
    @classmethod
    def _check_odata_url(cls, value: str) -> str:
        return _service_url(value, "odata_url", EXAMPLE_ODATA_URL)

    @field_validator("operator", "company_id")
    @classmethod
    def _strip_code(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be blank")
        return value

    @field_validator("odata_user")
    @classmethod
    def _blank_user_is_operator(cls, value: str | None) -> str | None:
        value = value.strip() if value is not None else None
        return value or None

    @field_validator("entity_sets")
    @classmethod
    def _check_entity_sets(cls, value: dict[str, str]) -> dict[str, str]:
        for table, entity_set in value.items():
            for name in (table, entity_set):
                if not _IDENTIFIER.fullmatch(name):
                    raise ValueError(
                        f"{name!r} is not a table or entity-set name (letters, digits, _)"
                    )
        return value

    @property
    def odata_username(self) -> str:
        return self.odata_user or self.operator

    def entity_set(self, table: str) -> str:
        return self.entity_sets.get(table, table)


class SysproSecrets(BaseModel):
    """Secrets of a SYSPRO 8 connection; never shown in a repr, a log line or an error."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    operator_password: SecretStr
    company_password: SecretStr = SecretStr("")
    odata_password: SecretStr

    @field_validator("company_password", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return "" if value is None else value


@dataclass(frozen=True)
class LogonProfile:
    """What ``GetLogonProfile`` says about the session: company, operator, versions."""

    fields: dict[str, str] = field(default_factory=dict)

    @property
    def company_name(self) -> str:
        return self.fields.get("CompanyName", "")

    @property
    def company_id(self) -> str:
        return self.fields.get("CompanyId", "")

    @property
    def operator_code(self) -> str:
        return self.fields.get("OperatorCode", "")

    @property
    def syspro_version(self) -> str:
        return self.fields.get("SysproVersion", "")

    @property
    def enet_version(self) -> str:
        return self.fields.get("EnetVersion", "")


class _ODataMessage(BaseModel):
    """OData v3 wraps the message: ``{"lang": "en-US", "value": "..."}``."""

    value: str


class ODataErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    code: str | int | None = None
    message: str | _ODataMessage | None = None

    @property
    def text(self) -> str:
        message = self.message.value if isinstance(self.message, _ODataMessage) else self.message
        return str(message or self.code or "no message")[:500]


class ODataPage(BaseModel):
    """One page of an OData collection, or an OData error object (some services send one with
    HTTP 200)."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    value: list[dict[str, Any]] | None = None
    next_link: str | None = Field(None, alias="@odata.nextLink")
    error: ODataErrorDetail | None = None


def _odata_problem(exc: ValidationError) -> str:
    """What is wrong with an OData page, in the words an operator can act on."""
    first = exc.errors(include_url=False)[0]
    loc, got = first["loc"], type(first.get("input")).__name__
    if not loc:
        return f"JSON {got} instead of an object; is odata_url the service root?"
    if loc == ("value",):
        return f"not an OData collection (its 'value' is a {got}); is odata_url the service root?"
    if loc[0] == "value" and len(loc) == 2:
        return f"a row is a {got}, not an object"
    if loc[0] == "@odata.nextLink":
        return f"@odata.nextLink is a {got}, not a URL"
    return validation_problem(exc)


class SessionExpiredError(AuthError):
    """e.net answered that the session (UserId) is invalid or expired: log on again."""


# --------------------------------------------------------------------------------------------
# OData literals and query strings
# --------------------------------------------------------------------------------------------


def odata_literal(value: Any) -> str:
    """A value as an OData v4 literal for ``$filter``: strings quoted with ``''`` escaping,
    date/datetime as a DateTimeOffset ``YYYY-MM-DDTHH:MM:SSZ`` (UTC; naive means UTC)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        moment = value if value.tzinfo is None else value.astimezone(UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, date):
        return f"{value.isoformat()}T00:00:00Z"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float | Decimal):
        if not Decimal(value).is_finite():
            raise PermanentError(f"{value!r} cannot be used in an OData $filter")
        return str(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise PermanentError(f"a {type(value).__name__} cannot be used in an OData $filter")


def since_literal(since: str | date) -> str:
    """The ``$filter`` literal of a cursor: an ISO date or datetime becomes a DateTimeOffset
    (fractions dropped, which only widens ``ge``); anything else is compared as a string."""
    if isinstance(since, date):
        return odata_literal(since)
    text = since.strip()
    if _ISO_DATE.fullmatch(text):
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            return odata_literal(moment)
    return odata_literal(since)


def _encode_query(params: Mapping[str, str]) -> str:
    """``k=v&...`` with every reserved character percent-encoded and spaces as ``%20``: ``+``
    would read as a space to IIS/WCF, and ``&``/``#``/``%`` in a value would cut it short."""
    return "&".join(
        f"{quote(key, safe='$')}={quote(value, safe=chr(39) + '(),:')}"
        for key, value in params.items()
    )


def _check_name(name: str, what: str) -> str:
    if not _IDENTIFIER.fullmatch(name):
        raise PermanentError(f"{what} {name!r} is not a valid OData property or entity-set name")
    return name


# --------------------------------------------------------------------------------------------
# Bodies
# --------------------------------------------------------------------------------------------


def _decode(raw: bytes, charset: str | None) -> str:
    """e.net answers ``application/octet-stream`` with Windows-1252 XML; OData answers UTF-8."""
    encodings: list[str] = []
    if charset:
        encodings.append(charset)
    declared = _XML_ENCODING.match(raw)
    if declared:
        encodings.append(declared.group(1).decode("ascii"))
    encodings.append("utf-8-sig")
    for encoding in encodings:
        try:
            return raw.decode(encoding)
        except (LookupError, UnicodeDecodeError):
            continue
    return raw.decode("cp1252", errors="replace")


def _unwrap(text: str) -> str:
    """e.net answers a string plain or JSON-quoted (``"\\"<guid>\\""``), depending on version."""
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(value, str):
            return value.strip()
    return text


def _snippet(text: str, limit: int = 200) -> str:
    title = _HTML_TITLE.search(text)
    if title:
        text = title.group(1)
    return " ".join(text.split())[:limit]


def _error_detail(text: str) -> tuple[str, str | None]:
    """The message (and code) of an error body: OData JSON error, HTML page title, or text."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            body = json.loads(stripped)
        except json.JSONDecodeError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            error = body["error"]
            code = error.get("code")
            return str(error.get("message") or code or "")[:500], str(code) if code else None
    return _snippet(stripped), None


def parse_logon_profile(xml_text: str) -> LogonProfile:
    """The leaf elements of the ``GetLogonProfile`` XML, by tag (first occurrence wins)."""
    try:
        root = ET.fromstring(_XML_DECLARATION.sub("", xml_text.strip(), count=1))
    except ET.ParseError:
        raise PermanentError(
            f"SYSPRO e.net GetLogonProfile answered something that is not XML: "
            f"{_snippet(xml_text, 120)!r}",
            code="ENET_BAD_RESPONSE",
        ) from None
    fields: dict[str, str] = {}
    for element in root.iter():
        if len(element) == 0 and element is not root:
            fields.setdefault(element.tag, (element.text or "").strip())
    return LogonProfile(fields)


# --------------------------------------------------------------------------------------------
# The connector
# --------------------------------------------------------------------------------------------


class SysproConnector:
    """A SYSPRO 8 source: e.net session (logon, profile, logoff) and OData reads."""

    system = SYSTEM

    def __init__(
        self,
        name: str,
        settings: SysproSettings | Mapping[str, Any],
        secrets: SysproSecrets | Mapping[str, Any],
        *,
        token_cache: TokenCache | None = None,
        limiter: RateLimiter | None = None,
        retry_policy: RetryPolicy = DEFAULT_POLICY,
        **_unused: Any,
    ) -> None:
        self.name = name
        self.settings = (
            settings
            if isinstance(settings, SysproSettings)
            else SysproSettings.model_validate(settings)
        )
        self._secrets = (
            secrets if isinstance(secrets, SysproSecrets) else SysproSecrets.model_validate(secrets)
        )
        self.limiter = limiter or RateLimiter(name, max_concurrency=self.settings.max_concurrency)
        self.retry_policy = retry_policy
        self.cap = BodyCap.of(name, self.settings.max_response_mb)
        register_secrets(self._secrets)
        register_secret(self._basic_auth().removeprefix("Basic "))  # echoed headers too
        # The session id is a token: refreshed once for all concurrent callers, and shared by the
        # replicas through the token cache when there is one (SYSPRO may allow one session per
        # operator, so replicas that each logged on would evict each other).
        self._sessions = TokenManager(name, self._new_session, cache=token_cache, margin_s=0.0)
        self._session: Token | None = None
        self._created: set[str] = set()  # sessions this instance logged on (and so logs off)
        self._http: aiohttp.ClientSession | None = None
        self.logons = 0

    def __repr__(self) -> str:
        return (
            f"SysproConnector(name={self.name!r}, rest_url={self.settings.rest_url!r},"
            f" odata_url={self.settings.odata_url!r}, operator={self.settings.operator!r},"
            f" company_id={self.settings.company_id!r})"
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

    def _scrub(self, text: str) -> str:
        """``text`` without any registered secret (plain or URL-encoded) or session id."""
        return redact(text)

    async def _get(
        self,
        url: URL,
        *,
        what: str,
        operation: str,
        headers: Mapping[str, str] | None = None,
    ) -> HttpAnswer:
        """One GET, its answer capped in size; transport failures come back classified."""
        answer, _ = await send(
            self._client(),
            "GET",
            url,
            connection=self.name,
            operation=operation,
            what=what,
            cap=self.cap,
            timeout_s=self.settings.timeout_s,
            scrub=self._scrub,
            headers=headers,
        )
        log.debug("%s %s -> HTTP %s", operation, url.path, answer.status)
        return answer

    def _redirect_error(self, what: str, status: int, headers: Mapping[str, str]) -> ConnectorError:
        target = URL(headers.get("Location", ""))
        where = f"{target.scheme}://{target.host}{target.path}" if target.host else target.path
        return PermanentError(
            f"{what}: the server redirects (HTTP {status}) to {where or 'elsewhere'};"
            " put that address in the settings",
            status=status,
            code="REDIRECT",
        )

    # -- e.net REST ---------------------------------------------------------------------------

    def _rest_url(self, operation: str, params: Mapping[str, str]) -> URL:
        query = _encode_query(params)
        text = f"{self.settings.rest_url}/{operation}" + (f"?{query}" if query else "")
        return URL(text, encoded=True)

    async def _rest_once(self, operation: str, params: Mapping[str, str]) -> str:
        """One e.net call: the answer unwrapped; HTTP errors classified (query never shown)."""
        url = self._rest_url(operation, params)
        what = f"SYSPRO e.net {operation}"
        answer = await self._get(url, what=what, operation=f"enet.{operation}")
        status, text, headers = answer.status, _decode(answer.body, answer.charset), answer.headers
        if 300 <= status < 400:
            raise self._redirect_error(what, status, headers)
        if status == 404:
            raise PermanentError(
                f"{what}: {url.path} does not exist (HTTP 404); check rest_url"
                f" (the e.net REST base, e.g. {EXAMPLE_REST_URL})",
                status=404,
                code="ENET_NOT_FOUND",
            )
        if status >= 400:
            detail, _ = _error_detail(text)
            message = f"{what}: HTTP {status}: {self._scrub(detail)}"
            if status == 503:
                raise ThrottledError(
                    message,
                    status=503,
                    code="SERVICE_UNAVAILABLE",
                    retry_after=parse_retry_after(headers.get("Retry-After")),
                )
            raise http_error(status, message, retry_after=headers.get("Retry-After"))
        return _unwrap(text)

    async def _rest(
        self, operation: str, params: Mapping[str, str], *, policy: RetryPolicy | None = None
    ) -> str:
        """An e.net call that needs no session, with retries."""
        return await call_with_retries(
            lambda: self._rest_once(operation, params),
            policy=policy or self.retry_policy,
            limiter=self.limiter,
        )

    async def _new_session(self) -> Token:
        return Token(await self._logon(), time.time() + SESSION_MAX_AGE_S)

    async def _logon(self) -> str:
        """One logon attempt: it runs inside the retries of the call that needs the session."""
        settings, secrets = self.settings, self._secrets
        text = await self._rest_once(
            "Logon",
            {
                "Operator": settings.operator,
                "OperatorPassword": secrets.operator_password.get_secret_value(),
                "CompanyId": settings.company_id,
                "CompanyPassword": secrets.company_password.get_secret_value(),
            },
        )
        who = f"operator {settings.operator!r} to company {settings.company_id!r}"
        if text.upper().startswith("ERROR"):
            reason = self._scrub(_ERROR_PREFIX.sub("", text, count=1)) or self._scrub(text)
            raise TokenRefusedError(
                f"SYSPRO refused the logon of {who}: {reason}; check operator, company_id,"
                " operator_password and company_password",
                code="LOGON_FAILED",
            )
        if not _SESSION_ID.fullmatch(text):
            raise TransientError(
                f"SYSPRO e.net Logon of {who} answered something that is not a session id:"
                f" {self._scrub(_snippet(text, 80))!r}",
                code="ENET_BAD_RESPONSE",
            )
        self.logons += 1
        self._created.add(text)
        log.info(
            "SYSPRO e.net logon", extra={"connection": self.name, "operator": settings.operator}
        )
        return text

    async def _current_session(self) -> Token:
        token = await self._sessions.get()
        self._session = token
        return token

    async def _enet(
        self,
        operation: str,
        params: Mapping[str, str] | None = None,
        *,
        policy: RetryPolicy | None = None,
    ) -> str:
        """An e.net call inside the session; the session (and its logon, when there is none) is
        obtained inside the call's one retry layer. When SYSPRO says the session is invalid or
        expired, log on again (once for all concurrent callers) and repeat the call, once."""
        session: list[Token | None] = [None]

        async def call() -> str:
            current = session[0] = await self._current_session()
            text = await self._rest_once(operation, {"UserId": current.value, **(params or {})})
            if text.upper().startswith("ERROR"):
                reason = self._scrub(text)
                if _SESSION_GONE.search(text):
                    raise SessionExpiredError(
                        f"SYSPRO e.net {operation}: the session is no longer valid ({reason})",
                        code="SESSION_EXPIRED",
                    )
                raise PermanentError(f"SYSPRO e.net {operation}: {reason}", code="ENET_ERROR")
            return text

        async def log_on_again() -> None:
            log.info(
                "SYSPRO e.net session expired; logging on again", extra={"connection": self.name}
            )
            gone = session[0]
            if gone is not None:
                self._sessions.invalidate(gone)
                self._created.discard(gone.value)

        return await call_with_retries(
            call,
            policy=policy or self.retry_policy,
            limiter=self.limiter,
            refresh_auth=log_on_again,
        )

    async def get_logon_profile(self, *, policy: RetryPolicy | None = None) -> LogonProfile:
        """``GetLogonProfile``: company, operator, SYSPRO and e.net versions of the session."""
        return parse_logon_profile(await self._enet("GetLogonProfile", policy=policy))

    async def get_version(self, *, policy: RetryPolicy | None = None) -> str:
        """``GetVersion`` (no session): the e.net version string."""
        return await self._rest("GetVersion", {}, policy=policy)

    async def logoff(self) -> bool:
        """``Logoff`` the session this connector logged on (frees the licence seat). A session
        taken from the shared token cache belongs to the replica that opened it: it is left
        open, so that ``connections test`` does not log the running services off."""
        token, self._session = self._session, None
        if token is None:
            return False
        if token.value not in self._created:
            return False
        self._created.discard(token.value)
        self._sessions.invalidate(token)
        try:
            text = await self._rest(
                "Logoff", {"UserId": token.value}, policy=RetryPolicy(attempts=1)
            )
        except ConnectorError as exc:
            log.warning("SYSPRO e.net logoff failed: %s", exc, extra={"connection": self.name})
            return False
        if text.strip().lower() not in ("0", "true", ""):
            log.warning(
                "SYSPRO e.net logoff answered %r",
                _snippet(text.replace(token.value, "***"), 120),
                extra={"connection": self.name},
            )
            return False
        return True

    async def close(self) -> None:
        if self._http is not None and not self._http.closed:
            try:
                await self.logoff()
            finally:
                await self._http.close()
        self._http = None

    # -- OData --------------------------------------------------------------------------------

    def _basic_auth(self) -> str:
        """The ``Authorization`` header of the OData service (user:password, UTF-8)."""
        pair = f"{self.settings.odata_username}:{self._secrets.odata_password.get_secret_value()}"
        return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")

    def _odata_url(self, entity_set: str, params: Mapping[str, str]) -> URL:
        query = _encode_query(params)
        text = f"{self.settings.odata_url}/{entity_set}" + (f"?{query}" if query else "")
        return URL(text, encoded=True)

    def _next_url(self, current: URL, next_link: Any, entity_set: str) -> URL:
        if not isinstance(next_link, str) or not next_link:
            raise PermanentError(
                f"SYSPRO OData {entity_set}: @odata.nextLink is not a URL ({next_link!r})",
                code="ODATA_BAD_RESPONSE",
            )
        url = URL(urljoin(str(current), next_link.replace(" ", "%20")), encoded=True)
        if url.origin() != current.origin():
            # The Basic credentials must not travel to another host.
            raise PermanentError(
                f"SYSPRO OData {entity_set}: @odata.nextLink points to another server"
                f" ({url.origin()}); set odata_url to the address the service calls itself",
                code="ODATA_BAD_RESPONSE",
            )
        return url

    async def _odata_once(
        self, url: URL, entity_set: str
    ) -> tuple[list[dict[str, Any]], str | None]:
        what = f"SYSPRO OData {entity_set}"
        answer = await self._get(
            url,
            what=what,
            operation=f"odata.{entity_set}",
            headers={"Authorization": self._basic_auth(), "Accept": "application/json"},
        )
        status, headers = answer.status, answer.headers
        if 300 <= status < 400:
            raise self._redirect_error(what, status, headers)
        if status >= 400:
            text = _decode(answer.body, answer.charset)
            raise self._odata_http_error(status, text, headers, url, entity_set)
        page = decode_answer(
            ODataPage,
            answer.body,
            status=status,
            content_type=headers.get("Content-Type", ""),
            charset=answer.charset,
            what=what,
            code="ODATA_BAD_RESPONSE",
            describe_problem=_odata_problem,
        )
        if page.error is not None:
            code = str(page.error.code) if page.error.code is not None else None
            raise PermanentError(
                f"{what}: the service answered an error (with HTTP {status}):"
                f" {self._scrub(page.error.text)}",
                status=status,
                code=code or "ODATA_ERROR",
            )
        if page.value is None:
            raise PermanentError(
                f"{what}: the answer is not an OData collection (an object without a 'value'"
                " array); is odata_url the service root?",
                status=status,
                code="ODATA_BAD_RESPONSE",
            )
        rows: list[dict[str, Any]] = []
        for row in page.value:
            if "@" in "".join(row):  # a cheap test first: rows seldom carry annotations
                row = {k: v for k, v in row.items() if not k.startswith("@")}
            rows.append(row)
        return rows, page.next_link

    def _odata_http_error(
        self, status: int, text: str, headers: Mapping[str, str], url: URL, entity_set: str
    ) -> ConnectorError:
        what = f"SYSPRO OData {entity_set}"
        detail, code = _error_detail(text)
        detail = self._scrub(detail)
        user = self.settings.odata_username
        if status == 401:
            return AuthError(
                f"{what}: the OData service rejected user {user!r} and its password (HTTP 401);"
                " check odata_user and odata_password, and that the operator is set up for"
                " OData access",
                status=401,
                code="ODATA_UNAUTHORIZED",
            )
        if status == 403:
            return PermanentError(
                f"{what}: operator {user!r} lacks OData access to {entity_set} (HTTP 403):"
                f" {detail}",
                status=403,
                code="ODATA_FORBIDDEN",
            )
        if status == 404:
            return PermanentError(
                f"{what}: {url.path} does not exist (HTTP 404); check odata_url (the service"
                f" root, e.g. {EXAMPLE_ODATA_URL}) and the entity-set name {entity_set!r}"
                f" (entity_sets): {detail}",
                status=404,
                code="ODATA_NOT_FOUND",
            )
        if status == 503:
            return ThrottledError(
                f"{what}: service unavailable (HTTP 503): {detail}",
                status=503,
                code="SERVICE_UNAVAILABLE",
                retry_after=parse_retry_after(headers.get("Retry-After")),
            )
        return http_error(
            status,
            f"{what}: HTTP {status}: {detail}",
            code=code,
            retry_after=headers.get("Retry-After"),
        )

    async def _odata_page(
        self, url: URL, entity_set: str, policy: RetryPolicy | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        return await call_with_retries(
            lambda: self._odata_once(url, entity_set),
            policy=policy or self.retry_policy,
            limiter=self.limiter,
        )

    def _guard(self, stream: StreamSpec, what: str = "read") -> PageGuard:
        return PageGuard(
            self.name, stream.entity, max_pages=self.settings.max_pages_per_read, what=what
        )

    async def _follow(
        self, url: URL, entity_set: str, stream: StreamSpec, guard: PageGuard
    ) -> AsyncIterator[tuple[list[dict[str, Any]], bool, int]]:
        """The pages of one request, following ``@odata.nextLink`` (server-driven paging) as long
        as ``guard`` allows; yields (rows, whether the server paged, rows new to this read).
        Every row has the stream's key and change fields."""
        paged = False
        while True:
            rows, next_link = await self._odata_page(url, entity_set)
            self._validate_rows(stream, entity_set, rows)
            count, new = guard.add(stream.key_of(row) for row in rows)
            if next_link is not None:
                paged = True
                url = self._next_url(url, next_link, entity_set)
                guard.follow(str(url), count=count, new=new)
            yield rows, paged, new
            if next_link is None:
                return

    def _validate_rows(
        self, stream: StreamSpec, entity_set: str, rows: list[dict[str, Any]]
    ) -> None:
        required = (*stream.key_fields, *([stream.change_field] if stream.change_field else []))
        for row in rows:
            missing = [name for name in required if name not in row]
            if missing:
                raise PermanentError(
                    f"SYSPRO OData {entity_set}: rows have no field {missing[0]!r} (a key or change"
                    " field of the flow); check the field names",
                    code="ODATA_MISSING_FIELD",
                )

    def _stream_query(self, stream: StreamSpec) -> tuple[str, dict[str, str]]:
        entity_set = _check_name(self.settings.entity_set(stream.entity), "entity set")
        if not stream.key_fields:
            raise PermanentError(f"stream {stream.entity}: no key fields")
        for name in stream.key_fields:
            _check_name(name, "key field")
        params: dict[str, str] = {}
        if stream.select:
            wanted = [*stream.select, *stream.key_fields]
            if stream.change_field:
                wanted.append(stream.change_field)
            names = list(dict.fromkeys(_check_name(n, "field") for n in wanted))
            params["$select"] = ",".join(names)
        return entity_set, params

    async def changed_since(
        self, stream: StreamSpec, since: str | None
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Pages of the rows whose change field is at or after ``since``, ordered by change field
        then key; without a change field or ``since``: every row, ordered by key.

        Client paging with ``$top``/``$skip`` in windows of ``page_size``; inside a window the
        server may page with ``@odata.nextLink``, which is followed to the end of the window. The
        next window skips the rows actually received, so a server that caps rows silently loses
        nothing. The read ends on an empty window, or on a short one once this read has shown
        that a short window cannot be a silent cap: the server signalled its cap with nextLink,
        or a full window came back without one. (So a read that fits in its first, short window
        costs one more, empty request: the row cap of SYSPRO OData is UNVERIFIED.)"""
        entity_set, params = self._stream_query(stream)
        keys = ",".join(stream.key_fields)
        if stream.change_field and since is not None:
            change = _check_name(stream.change_field, "change field")
            params["$filter"] = f"{change} ge {since_literal(since)}"
            params["$orderby"] = f"{change},{keys}"
        else:
            params["$orderby"] = keys
        page_size = stream.page_size or self.settings.page_size
        guard = self._guard(stream)
        skip = 0
        previous_first: str | None = None
        cap_known = False  # a short window is the end, not a silent row cap
        url = self._odata_url(entity_set, {**params, "$top": str(page_size)})
        while True:
            received, new, first = 0, 0, None
            async for rows, paged, new_rows in self._follow(url, entity_set, stream, guard):
                cap_known = cap_known or paged
                new += new_rows
                if not rows:
                    continue
                if first is None:
                    first = stream.key_of(rows[0])
                    if first == previous_first:
                        raise PermanentError(
                            f"SYSPRO OData {entity_set}: the service ignores $skip (the same"
                            " rows came back twice)",
                            code="ODATA_SKIP_IGNORED",
                        )
                received += len(rows)
                yield rows
            cap_known = cap_known or received >= page_size
            if received == 0 or (cap_known and received < page_size):
                return
            previous_first = first
            skip += received
            url = self._odata_url(
                entity_set, {**params, "$top": str(page_size), "$skip": str(skip)}
            )
            guard.follow(str(url), count=received, new=new)

    async def fetch(self, stream: StreamSpec, ids: list[str]) -> list[dict[str, Any]]:
        """The rows whose key (``StreamSpec.key_of``, ``shared.keys``) is in ``ids``."""
        entity_set, params = self._stream_query(stream)
        params["$orderby"] = ",".join(stream.key_fields)
        clauses = [self._key_clause(stream, key) for key in dict.fromkeys(ids)]
        chunks = _chunks(clauses, FETCH_CHUNK_IDS, FETCH_FILTER_MAX_CHARS)

        async def read(chunk: list[str]) -> list[dict[str, Any]]:
            url = self._odata_url(entity_set, {**params, "$filter": " or ".join(chunk)})
            out: list[dict[str, Any]] = []
            guard = self._guard(stream, "fetch")
            async for rows, _, _ in self._follow(url, entity_set, stream, guard):
                out.extend(rows)
            return out

        # every chunk runs to its end (no orphaned request), then the first failure is raised
        results = await asyncio.gather(*(read(chunk) for chunk in chunks), return_exceptions=True)
        found: dict[str, dict[str, Any]] = {}
        for result in results:
            if isinstance(result, BaseException):
                raise result
            for row in result:
                found.setdefault(stream.key_of(row), row)
        return list(found.values())

    @staticmethod
    def _key_clause(stream: StreamSpec, key: str) -> str:
        try:
            parts = decode_key(key, len(stream.key_fields))
        except ValueError:
            raise PermanentError(
                f"{stream.entity} id {key!r} does not have the key {'|'.join(stream.key_fields)}",
                code="BAD_ID",
            ) from None
        terms = [
            f"{name} eq {odata_literal(value)}"
            for name, value in zip(stream.key_fields, parts, strict=True)
        ]
        return terms[0] if len(terms) == 1 else "(" + " and ".join(terms) + ")"

    # -- ping ---------------------------------------------------------------------------------

    async def ping(self) -> PingResult:
        """reach (e.net answers), logon (operator credentials), profile (company, versions),
        odata (Basic credentials, entity sets). Never raises for a failed check."""
        result = PingResult(self.name, SYSTEM)
        if await self._check(result, "reach", self._ping_reach):
            if await self._check(result, "logon", self._ping_logon):
                await self._check(result, "profile", self._ping_profile)
            else:
                result.add("profile", False, "not tried: the logon failed")
        else:
            result.add("logon", False, "not tried: the e.net REST service is not reachable")
            result.add("profile", False, "not tried: the e.net REST service is not reachable")
        await self._check(result, "odata", self._ping_odata)
        return result

    async def _check(
        self, result: PingResult, name: str, check: Callable[[], Awaitable[str]]
    ) -> bool:
        try:
            detail = await check()
        except ConnectorError as exc:
            return result.add(name, False, self._scrub(exc.message))
        except Exception as exc:
            log.exception("SYSPRO ping check %s failed", name, extra={"connection": self.name})
            return result.add(
                name,
                False,
                f"unexpected error ({type(exc).__name__}): {self._scrub(str(exc))[:300]}",
            )
        return result.add(name, True, detail)

    async def _ping_reach(self) -> str:
        version = await self.get_version(policy=PING_POLICY)
        url = URL(self.settings.rest_url)
        detail = f"e.net REST at {url.host}:{url.port} answers (e.net {_snippet(version, 40)})"
        if url.scheme == "http" and url.host not in ("127.0.0.1", "localhost", "::1"):
            detail += "; warning: plain HTTP, and e.net sends the passwords in the URL: use HTTPS"
        return detail

    async def _ping_logon(self) -> str:
        before = self.logons
        await call_with_retries(self._current_session, policy=PING_POLICY, limiter=self.limiter)
        who = f"operator {self.settings.operator!r}, company {self.settings.company_id!r}"
        if self.logons > before:
            return f"logged on as {who}"
        return f"session of {who} is open (shared with the running services)"

    async def _ping_profile(self) -> str:
        profile = await self.get_logon_profile(policy=PING_POLICY)
        return (
            f"company {profile.company_name or '?'} ({profile.company_id or '?'}),"
            f" SYSPRO {profile.syspro_version or '?'}, e.net {profile.enet_version or '?'},"
            f" operator {profile.operator_code or '?'}"
        )

    async def _ping_odata(self) -> str:
        sets = list(dict.fromkeys(self.settings.entity_sets.values())) or list(DEFAULT_TABLES)
        for entity_set in sets:
            _check_name(entity_set, "entity set")
            await self._odata_page(
                self._odata_url(entity_set, {"$top": "1"}), entity_set, PING_POLICY
            )
        return f"user {self.settings.odata_username!r} reads {', '.join(sets)}"


def _chunks(clauses: Sequence[str], max_items: int, max_chars: int) -> list[list[str]]:
    """Groups of ``or``-clauses that keep the encoded ``$filter`` short enough for IIS."""
    chunks: list[list[str]] = []
    current: list[str] = []
    size = 0
    for clause in clauses:
        length = len(quote(clause, safe="'(),:")) + 8  # " or " encoded
        if current and (len(current) >= max_items or size + length > max_chars):
            chunks.append(current)
            current, size = [], 0
        current.append(clause)
        size += length
    if current:
        chunks.append(current)
    return chunks


# The tables a SYSPRO connection reads, with their SQL keys; other tables are readable when
# the connection's ``entity_sets`` names them (the flow then names the key).
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "ArCustomer": ("Customer",),
    "ArInvoice": ("Customer", "Invoice", "DocumentType"),
}
_CURSORS = frozenset({CursorKind.TIMESTAMP, CursorKind.NONE})


def capabilities(settings: BaseModel | None) -> Capabilities:
    """Read only: the known tables and those the connection's ``entity_sets`` maps, filtered
    server-side ($filter); keys compared as the connection's collation says."""
    tables = dict.fromkeys([*TABLE_KEYS, *(getattr(settings, "entity_sets", None) or {})])
    case_sensitive = bool(getattr(settings, "case_sensitive_keys", False))
    return Capabilities(
        streams=tuple(
            StreamDecl(t, key=TABLE_KEYS.get(t, ()), cursors=_CURSORS, filter_pushdown=True)
            for t in tables
        ),
        keys_case_sensitive=case_sensitive,
    )


CONNECTOR = ConnectorType(
    system=SYSTEM,
    title=(
        "SYSPRO 8 (source): e.net Solutions REST for the session and the logon profile,"
        " the SYSPRO OData service (Basic auth) for ArCustomer, ArInvoice and other tables"
    ),
    settings_model=SysproSettings,
    secrets_model=SysproSecrets,
    factory=SysproConnector,
    capabilities=capabilities,
)
CONNECTOR_TYPE = CONNECTOR
