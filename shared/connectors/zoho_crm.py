"""Zoho CRM (REST API v8): OAuth refresh per datacenter, records as source and sink.

- auth: refresh-token grant against the datacenter's accounts server; the API host is the
  ``api_domain`` of each token response; one token shared by replicas through ``token_cache``;
- sink: ``POST /{module}/upsert`` with ``duplicate_check_fields``, at most 100 records a call,
  one outcome per record in input order (200 all ok, 207 mixed, 400 all failed);
- source: ``GET /{module}`` with mandatory ``fields``, ``If-Modified-Since``, sorted by
  ``Modified_Time``; ``page`` for the first 2,000 rows, then ``page_token``;
- limits: a concurrency cap per connection; 429 pauses the connection (no Retry-After is sent).

Every answer is decoded into a pydantic model of what we consume (token answer, upsert results,
read and search pages) before it is trusted: an upsert "success" without a valid ``details.id``
fails that record, never links it to "None". Answers are capped in size (``max_response_mb``),
reads end on a page token that loops (``max_pages_per_read``, ``shared.connectors.paging``), and
the token endpoint is asked once per attempt of the API call that needs the token.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

import aiohttp
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_core import from_json
from yarl import URL

from shared.connectors.base import (
    Capabilities,
    CursorKind,
    MatchStrategy,
    PingResult,
    SinkDecl,
    SinkRecord,
    StreamDecl,
    StreamSpec,
    WriteOutcome,
)
from shared.connectors.paging import DEFAULT_MAX_PAGES, MAX_PAGES_LIMIT, PageGuard
from shared.connectors.registry import ConnectorType
from shared.failures import (
    AuthError,
    ConnectorError,
    FailureClass,
    PermanentError,
    ThrottledError,
    TransientError,
    http_error,
)
from shared.http import (
    DEFAULT_MAX_RESPONSE_MB,
    BodyCap,
    CallTimer,
    HttpAnswer,
    client_session,
    decode_answer,
    send,
    validation_problem,
)
from shared.logs import redact, register_secrets
from shared.ratelimit import RateLimiter
from shared.retry import DEFAULT_POLICY, RetryPolicy, call_with_retries
from shared.tokens import Token, TokenCache, TokenManager, TokenRefusedError

M = TypeVar("M", bound=BaseModel)

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
MAX_COQL_IN = 100  # values in one COQL ``in (...)``
COQL_PAGE = 200  # rows a COQL call (the safe limit, see the reference)
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

# The line-item subform of each inventory module (reference section 4).
LINE_ITEM_FIELDS = {
    "Invoices": "Invoiced_Items",
    "Sales_Orders": "Ordered_Items",
    "Quotes": "Quoted_Items",
    "Purchase_Orders": "Purchased_Items",
}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,99}")

# The standard modules whose records the API reads and upserts; an org's custom modules are
# named in the connection's ``custom_modules``.
STANDARD_MODULES = (
    "Accounts",
    "Contacts",
    "Deals",
    "Leads",
    "Products",
    "Vendors",
    "Campaigns",
    "Cases",
    "Solutions",
    "Price_Books",
    "Tasks",
    "Events",
    "Calls",
    *LINE_ITEM_FIELDS,
)
_UPSERT = frozenset({MatchStrategy.DUPLICATE_CHECK})
_CURSORS = frozenset({CursorKind.TIMESTAMP, CursorKind.NONE})


def _capabilities(modules: tuple[str, ...], max_batch: int) -> Capabilities:
    return Capabilities(
        streams=tuple(
            StreamDecl(module, key=("id",), cursors=_CURSORS, deletes=True) for module in modules
        ),
        sinks=tuple(
            SinkDecl(module, match=_UPSERT, line_items=LINE_ITEM_FIELDS.get(module))
            for module in modules
        ),
        max_batch=max_batch,
        push=True,
        keys_case_sensitive=True,
    )


CAPABILITIES = _capabilities(STANDARD_MODULES, MAX_UPSERT)


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
    max_response_mb: float = Field(
        DEFAULT_MAX_RESPONSE_MB, gt=0, le=1024, description="largest answer accepted"
    )
    max_pages_per_read: int = Field(
        DEFAULT_MAX_PAGES, ge=1, le=MAX_PAGES_LIMIT, description="ceiling of pages in one read"
    )
    custom_modules: tuple[Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,99}$")], ...] = (
        Field((), max_length=500, description="API names of the org's custom modules flows use")
    )

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


# -- the answers we consume, as models ----------------------------------------------------------


def _id_text(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


ZohoId = Annotated[str, BeforeValidator(_id_text), Field(pattern=r"^[0-9]{1,30}$")]


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class TokenAnswer(_Answer):
    """The accounts server's answer: a token, or ``{"error": ...}`` (with HTTP 200)."""

    access_token: str | None = Field(None, min_length=1)
    expires_in: float | None = Field(None, gt=0)
    expires_in_sec: float | None = Field(None, gt=0)  # legacy: expires_in is then in ms
    api_domain: str | None = None
    error: str | None = None
    error_description: str | None = None


class UpsertAnswer(_Answer):
    data: list[Any]  # one item per record; each is checked alone (a bad one fails its record)


class WrittenDetails(_Answer):
    id: ZohoId


class UpsertSuccess(_Answer):
    status: Literal["success"]
    action: str | None = None
    details: WrittenDetails


class RecordError(_Answer):
    status: str | None = None
    code: str | None = None
    message: str | None = None
    details: dict[str, Any] | None = None


class PageInfo(_Answer):
    more_records: bool = False
    next_page_token: str | None = None


class RecordsPage(_Answer):
    """A read, fetch or search page: ``{"data": [...], "info": {...}}``."""

    data: list[dict[str, Any]]
    info: PageInfo = PageInfo()


class AnyObject(RootModel[dict[str, Any]]):
    pass


class AnyValue(RootModel[Any]):
    pass


class ReadRecord(_Answer):
    id: ZohoId


def escape_criteria(value: str) -> str:
    """Escape a value for ``criteria=(Field:equals:value)``."""
    return re.sub(r"([\\(),])", r"\\\1", value)


def escape_coql(value: str) -> str:
    """A COQL string literal: quoted, with backslashes and quotes escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _record_error(item: RecordError) -> tuple[FailureClass, str, str]:
    code = str(item.code or "UNKNOWN")
    details = item.details or {}
    where = ", ".join(
        f"{k}={details[k]}" for k in ("api_name", "json_path", "expected_data_type") if k in details
    )
    message = str(item.message or "rejected")
    text = redact(f"{message}" + (f" ({where})" if where else ""))
    if code in TRANSIENT_RECORD_CODES:
        return FailureClass.TRANSIENT, code, text
    return FailureClass.PERMANENT, code, text


def _error_body(answer: HttpAnswer) -> Any:
    """An error answer's JSON, or None when it is not JSON (a proxy's HTML page)."""
    try:
        return from_json(answer.body) if answer.body else None
    except ValueError:
        return None


class ZohoCrmConnector:
    system = "zoho_crm"
    refs_need_ids = True  # a lookup is written as {"id": target id}

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
        register_secrets(self._secrets)
        self.max_batch = self.settings.upsert_batch_size
        self.capabilities = capabilities(self.settings)
        self.retry_policy = retry_policy
        self.cap = BodyCap.of(name, self.settings.max_response_mb)
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

    async def _send(
        self,
        method: str,
        url: URL,
        *,
        what: str,
        operation: str,
        record: bool = True,
        **kwargs: Any,
    ) -> tuple[HttpAnswer, CallTimer]:
        """One HTTP exchange, its answer capped in size; transport failures come back classified
        and timed. Returns the answer and the call's timer (see ``shared.http.send``)."""
        return await send(
            self._client(),
            method,
            url,
            connection=self.name,
            operation=operation,
            what=what,
            cap=self.cap,
            timeout_s=self.settings.timeout_s,
            record=record,
            scrub=redact,
            **kwargs,
        )

    # -- auth ---------------------------------------------------------------------------------

    async def _refresh(self) -> Token:
        """One request for an access token: no retries of its own, as it runs inside the API
        call that needs the token, whose retries are the only ones."""
        url = URL(self.settings.token_url)
        what = f"Zoho token refresh at {url.scheme}://{url.host}"
        form = {
            "grant_type": "refresh_token",
            "refresh_token": self._secrets.refresh_token.get_secret_value(),
            "client_id": self.settings.client_id,
            "client_secret": self._secrets.client_secret.get_secret_value(),
        }
        answer, timer = await self._send(
            "POST", url, what=what, operation="oauth.token", record=False, data=form
        )
        try:
            if answer.status >= 500:
                raise TransientError(f"{what}: HTTP {answer.status}", status=answer.status)
            body = decode_answer(
                TokenAnswer,
                answer.body,
                status=answer.status,
                content_type=answer.content_type,
                charset=answer.charset,
                what=what,
                malformed=TransientError,
            )
            token = self._token_from(body, what, answer.status)
        except ConnectorError as exc:
            # a token endpoint's error is a failed call whatever its HTTP status (Zoho answers
            # {"error": "invalid_code"} with 200)
            timer.done(exc.code if exc.code and answer.status < 300 else answer.status)
            raise
        timer.done(answer.status)
        return token

    def _token_from(self, body: TokenAnswer, what: str, status: int) -> Token:
        if body.access_token:
            seconds = body.expires_in if body.expires_in is not None else 3600.0
            if body.expires_in_sec is not None:  # legacy: expires_in in milliseconds
                seconds = body.expires_in_sec
            api_domain = self.settings.api_domain or body.api_domain
            if not isinstance(api_domain, str) or not api_domain.startswith("http"):
                raise TransientError(
                    f"{what}: the token answer has no api_domain", code="MALFORMED_RESPONSE"
                )
            return Token(
                body.access_token, time.time() + seconds, {"api_domain": api_domain.rstrip("/")}
            )
        error = body.error or ""
        if error == "invalid_client":
            raise TokenRefusedError(
                f"{what}: invalid_client: the client id or secret is wrong, or the account lives"
                f" in another datacenter than {URL(self.settings.token_url).host}"
                " (set datacenter or accounts_url)",
                code="invalid_client",
                status=status,
            )
        if error == "invalid_code":
            raise TokenRefusedError(
                f"{what}: invalid_code: the refresh token is revoked or wrong; generate a new"
                " one and update the connection's secrets",
                code="invalid_code",
                status=status,
            )
        if (
            error == "Access Denied"
            or "too many requests" in (body.error_description or "").lower()
        ):
            raise ThrottledError(
                f"{what}: token limit reached (10 tokens per refresh token in 10 minutes)",
                code="TOKEN_THROTTLED",
                status=status,
                retry_after=60,
            )
        raise AuthError(
            redact(f"{what}: {error or 'no access_token in the answer'}"),
            code=error or "NO_ACCESS_TOKEN",
            status=status,
        )

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
        """An API call (``_request``) whose answer is any JSON value: (status, the decoded
        body, None for 204/304). Raises classified errors."""
        status, body = await self._request(
            method, path, AnyValue, params=params, json=json, headers=headers, operation=operation
        )
        return status, body.root if body is not None else None

    async def _request(
        self,
        method: str,
        path: str,
        model: type[M],
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        operation: str,
        data_on_400: bool = False,
    ) -> tuple[int, M | None]:
        """An API call with retries (the only retry layer: the token is obtained inside it):
        (status, the answer as ``model``, None for 204/304). Raises classified errors.
        ``data_on_400``: a 400 that carries per-record results is an answer (upsert)."""

        async def once() -> tuple[int, M | None]:
            token = await self._auth()
            url = URL(token.context["api_domain"] + self.settings.api_path + path)
            what = f"Zoho CRM {method} {self.settings.api_path}{path}"
            answer, _ = await self._send(
                method,
                url,
                what=what,
                operation=operation,
                params=params,
                json=json,
                headers={"Authorization": f"Zoho-oauthtoken {token.value}", **(headers or {})},
            )
            status = answer.status
            if status in (204, 304):
                return status, None
            if status >= 400:
                body = _error_body(answer)
                if not (
                    data_on_400 and status == 400 and isinstance(body, dict) and "data" in body
                ):
                    raise self._request_error(status, body, what)
            return status, decode_answer(
                model,
                answer.body,
                status=status,
                content_type=answer.content_type,
                charset=answer.charset,
                what=what,
                malformed=TransientError,
            )

        return await call_with_retries(
            once,
            policy=self.retry_policy,
            limiter=self.limiter,
            refresh_auth=self._refresh_after_401,
        )

    def _request_error(self, status: int, body: Any, what: str) -> ConnectorError:
        code = str(body.get("code")) if isinstance(body, dict) and body.get("code") else None
        message = str(body.get("message") or "") if isinstance(body, dict) else ""
        text = redact(f"{what}: HTTP {status} {code or ''} {message}".strip())
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
        self, entity: str, records: Sequence[SinkRecord | dict[str, Any]], match_on: list[str]
    ) -> list[WriteOutcome]:
        """One outcome per record, in order. A ``SinkRecord``'s parent references render as
        ``{"id": ...}`` and its line items as rows of the module's subform (a plain dict is
        sent as it is)."""
        lines_field = LINE_ITEM_FIELDS.get(entity)
        payloads = [
            _render(record, lines_field) if isinstance(record, SinkRecord) else record
            for record in records
        ]
        size = self.max_batch
        chunks = [payloads[i : i + size] for i in range(0, len(payloads), size)]
        results = await asyncio.gather(*(self._upsert_chunk(entity, c, match_on) for c in chunks))
        return [outcome for chunk in results for outcome in chunk]

    async def _upsert_chunk(
        self, entity: str, records: list[dict[str, Any]], match_on: list[str]
    ) -> list[WriteOutcome]:
        what = f"Zoho CRM upsert {entity}"
        status, body = await self._request(
            "POST",
            f"/{entity}/upsert",
            UpsertAnswer,
            json={"data": records, "duplicate_check_fields": match_on, "trigger": []},
            operation=f"upsert.{entity}",
            data_on_400=True,
        )
        items = body.data if body is not None else None
        if items is not None and status == 400:
            request_error = _request_level_error(what, items, len(records), match_on)
            if request_error is not None:
                return [request_error] * len(records)
        if items is None or len(items) != len(records):
            raise TransientError(
                f"{what}: malformed response: expected {len(records)} results,"
                f" got {len(items) if items is not None else 'none'}",
                code="MALFORMED_RESPONSE",
            )
        return [_outcome(what, index, item) for index, item in enumerate(items)]

    async def find_ids(self, entity: str, field: str, values: Sequence[str]) -> dict[str, str]:
        """``{value: id}`` of the records whose ``field`` equals a value exactly, by COQL
        (``in`` with at most 100 values a call, every page followed); never the search API,
        whose ``equals`` matches words and prefixes."""
        for name, what in ((entity, "module"), (field, "field")):
            if not _NAME.fullmatch(name):
                raise PermanentError(f"Zoho CRM lookup: {what} {name!r} is not an API name")
        wanted = list(dict.fromkeys(str(v) for v in values if v is not None and str(v) != ""))
        found: dict[str, str] = {}
        what = f"Zoho CRM COQL {entity}.{field}"
        for i in range(0, len(wanted), MAX_COQL_IN):
            chunk = wanted[i : i + MAX_COQL_IN]
            literals = ", ".join(escape_coql(v) for v in chunk)
            chunk_set = set(chunk)
            offset = 0
            guard = PageGuard(self.name, entity, max_pages=self.settings.max_pages_per_read)
            while True:
                query = (
                    f"select id, {field} from {entity} where {field} in ({literals})"
                    f" order by id limit {offset}, {COQL_PAGE}"
                )
                _, page = await self._request(
                    "POST",
                    "/coql",
                    RecordsPage,
                    json={"select_query": query},
                    operation=f"coql.{entity}",
                )
                if page is None:
                    break
                for record in page.data:
                    value = record.get(field)
                    if isinstance(value, str | int) and not isinstance(value, bool):
                        text = str(value)
                        if text in chunk_set and text not in found:
                            found[text] = _record_id(what, record)
                if not page.info.more_records or not page.data:
                    break
                offset += len(page.data)
                guard.page((r.get("id") for r in page.data), f"offset={offset}")
        return found

    async def find_id(self, entity: str, field: str, value: str) -> str | None:
        """Transitional: the writer of today asks one value at a time (``find_ids`` batched
        replaces it once the writer resolves parents per flush)."""
        return (await self.find_ids(entity, field, [value])).get(value)

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
        guard = PageGuard(self.name, stream.entity, max_pages=self.settings.max_pages_per_read)
        page, token = 1, None
        while True:
            query = dict(params)
            if token is None:
                query["page"] = str(page)
            else:
                query["page_token"] = token
            status, body = await self._request(
                "GET",
                f"/{stream.entity}",
                RecordsPage,
                params=query,
                headers=headers,
                operation=f"read.{stream.entity}",
            )
            if status in (204, 304) or body is None:
                return
            rows = body.data
            keys = (row.get("id") or stream.key_of(row) for row in rows)
            if not body.info.more_records:
                guard.page(keys, None)
                if rows:
                    yield rows
                return
            next_token = body.info.next_page_token
            if token is not None or (page + 1) * per_page > DISCRETE_PAGE_LIMIT:
                if not next_token:
                    raise TransientError(
                        f"Zoho CRM read {stream.entity}: more records but no next_page_token",
                        code="MALFORMED_RESPONSE",
                    )
                token = next_token
                guard.page(keys, f"page_token={token}")
            else:
                page += 1
                guard.page(keys, f"page={page}")
            if rows:
                yield rows

    async def fetch(self, stream: StreamSpec, ids: list[str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i in range(0, len(ids), 100):
            _status, body = await self._request(
                "GET",
                f"/{stream.entity}",
                RecordsPage,
                params={"ids": ",".join(ids[i : i + 100]), "fields": self._fields(stream)},
                operation=f"fetch.{stream.entity}",
            )
            if body is not None:
                out.extend(body.data)
        return out

    # -- ping ---------------------------------------------------------------------------------

    async def ping(self) -> PingResult:
        result = PingResult(self.name, self.system)
        try:
            token = await call_with_retries(self._auth, policy=self.retry_policy)
        except ConnectorError as exc:
            result.add("token", False, redact(str(exc)))
            return result
        result.add(
            "token",
            True,
            f"access token from {URL(self.settings.token_url).host};"
            f" API at {token.context['api_domain']}",
        )
        try:
            _, body = await self._request("GET", "/org", AnyObject, operation="ping.org")
            orgs = (body.root if body is not None else {}).get("org") or [{}]
            org = orgs[0] if isinstance(orgs, list) and isinstance(orgs[0], dict) else {}
            result.add(
                "api", True, f"{self.settings.api_path} answers; org {org.get('company_name', '?')}"
            )
        except ConnectorError as exc:
            result.add("api", False, redact(str(exc)))
            return result
        try:
            _, body = await self._request(
                "GET", "/settings/modules", AnyObject, operation="ping.modules"
            )
            listed = (body.root if body is not None else {}).get("modules") or []
            modules = {m.get("api_name") for m in listed if isinstance(m, dict)}
            wanted = {"Accounts", "Deals"}
            missing = wanted - modules
            result.add(
                "permissions",
                not missing,
                f"modules readable: {len(modules)}"
                + (f"; missing {', '.join(sorted(missing))}" if missing else ""),
            )
        except ConnectorError as exc:
            result.add("permissions", False, redact(str(exc)))
        return result


def _outcome(what: str, index: int, item: Any) -> WriteOutcome:
    """One record's result of an upsert, checked before it is trusted: a success must name the
    written record's id (a success without one fails the record, it never links "None")."""
    if isinstance(item, dict) and item.get("status") == "success":
        try:
            success = UpsertSuccess.model_validate(item)
        except ValidationError as exc:
            return WriteOutcome(
                False,
                failure=FailureClass.TRANSIENT,
                error=f"{what}: result {index} says success but is malformed"
                f" ({validation_problem(exc)}); the record is not linked, and will be"
                " written again (the upsert matches it)",
                code="MALFORMED_RESULT",
            )
        action: Literal["insert", "update"] = "insert" if success.action == "insert" else "update"
        return WriteOutcome(True, target_id=success.details.id, action=action)
    try:
        error = RecordError.model_validate(item)
    except ValidationError as exc:
        return WriteOutcome(
            False,
            failure=FailureClass.TRANSIENT,
            error=f"{what}: result {index} is malformed ({validation_problem(exc)})",
            code="MALFORMED_RESULT",
        )
    failure, code, text = _record_error(error)
    return WriteOutcome(False, failure=failure, error=text, code=code)


def _render(record: SinkRecord, lines_field: str | None) -> dict[str, Any]:
    """A record as Zoho takes it: lookups as ``{"id": ...}``, line items as subform rows."""
    if not record.refs and not record.lines:
        return record.payload
    payload = dict(record.payload)
    for ref in record.refs:
        target_id = getattr(ref, "target_id", None)
        if target_id:
            payload[ref.field] = {"id": target_id}
    if record.lines:
        if lines_field is None:
            raise PermanentError("Zoho CRM: this module has no line items; remove the lines")
        payload[lines_field] = [_line(line) for line in record.lines]
    return payload


def _line(line: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"Quantity": line.quantity}
    product = line.product
    if product is not None and getattr(product, "target_id", None):
        row["Product_Name"] = {"id": product.target_id}
    if line.unit_price is not None:
        row["List_Price"] = line.unit_price
    if line.description is not None:
        row["Description"] = line.description
    row.update(line.fields)
    return row


def _request_level_error(
    what: str, items: list[Any], count: int, match_on: list[str]
) -> WriteOutcome | None:
    """A 400 that answers the whole request rather than its records (one ``data`` item about
    the request, e.g. a ``duplicate_check_fields`` the module does not have): every record of
    the batch fails with its cause, classified from its code, never as a malformed answer."""
    if len(items) != 1 or not isinstance(items[0], dict):
        return None
    try:
        error = RecordError.model_validate(items[0])
    except ValidationError:
        return None
    details = error.details or {}
    path = str(details.get("json_path") or "")
    if count == 1 and not path.startswith("$.duplicate_check_fields"):
        return None  # one record, one answer: its own
    code = str(error.code or "UNKNOWN")
    if path.startswith("$.duplicate_check_fields") or details.get("api_name") in (
        "duplicate_check_fields",
        *match_on,
    ):
        field = details.get("api_name") if path.startswith("$.duplicate_check_fields[") else None
        supported = details.get("supported_values")
        text = (
            f"{what}: {code}: the module has no unique field"
            f" {field or ', '.join(match_on)!r} to match on (duplicate_check_fields"
            + (f"; it has {', '.join(map(str, supported))}" if isinstance(supported, list) else "")
            + "); fix the flow's match_on or make the field unique in Zoho"
        )
        return WriteOutcome(False, failure=FailureClass.PERMANENT, error=redact(text), code=code)
    failure, code, text = _record_error(error)
    return WriteOutcome(
        False, failure=failure, error=f"{what}: the whole request was refused: {text}", code=code
    )


def capabilities(settings: BaseModel | None) -> Capabilities:
    """What a Zoho CRM connection reads and writes: the standard modules and the custom
    modules its settings name, upserted by duplicate-check fields, 100 records a call."""
    max_batch = getattr(settings, "upsert_batch_size", MAX_UPSERT)
    custom = tuple(getattr(settings, "custom_modules", ()))
    if max_batch == CAPABILITIES.max_batch and not custom:
        return CAPABILITIES
    return _capabilities(tuple(dict.fromkeys((*STANDARD_MODULES, *custom))), max_batch)


def _record_id(what: str, record: dict[str, Any]) -> str:
    try:
        return ReadRecord.model_validate(record).id
    except ValidationError as exc:
        raise TransientError(
            f"{what}: a record without a valid id ({validation_problem(exc)})",
            code="MALFORMED_RESPONSE",
        ) from None


CONNECTOR = ConnectorType(
    system="zoho_crm",
    title="Zoho CRM REST API v8 (OAuth refresh token, per datacenter)",
    settings_model=ZohoCrmSettings,
    secrets_model=ZohoCrmSecrets,
    factory=ZohoCrmConnector,
    capabilities=capabilities,
)
CONNECTOR_TYPE = CONNECTOR
