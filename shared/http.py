"""The HTTP base every connector uses: one session factory, one exchange (:func:`send`) that
reads an answer up to a size cap, answers decoded into pydantic models with clear errors
(:func:`decode_answer`), and per-connection call metrics.

Connectors never read a body themselves: :func:`send` refuses an answer larger than the
connection's cap (``max_response_mb``), from its ``Content-Length`` before reading anything, or
while reading it in chunks, so a 100 MB answer costs at most the cap in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from multidict import CIMultiDictProxy
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json, to_json
from yarl import URL

from shared import metrics
from shared.failures import ConnectorError, PermanentError, TransientError

USER_AGENT = "ml-connector/0.1"
DEFAULT_MAX_RESPONSE_MB = 32.0
READ_CHUNK_BYTES = 64 * 1024

M = TypeVar("M", bound=BaseModel)


def client_session(
    *,
    total_timeout_s: float = 60.0,
    connect_timeout_s: float = 10.0,
    limit: int = 50,
    headers: Mapping[str, str] | None = None,
) -> aiohttp.ClientSession:
    """A session with timeouts on every call and a bounded connection pool."""
    timeout = aiohttp.ClientTimeout(
        total=total_timeout_s, connect=connect_timeout_s, sock_read=total_timeout_s
    )
    connector = aiohttp.TCPConnector(limit=limit, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        timeout=timeout,
        connector=connector,
        headers={"User-Agent": USER_AGENT, **(headers or {})},
        raise_for_status=False,
        json_serialize=dump_json,
    )


def dump_json(value: Any) -> str:
    """JSON request bodies, serialized by pydantic-core (a batch of records is built per call)."""
    return to_json(value).decode()


def parse_json(text: str, *, status: int, content_type: str, what: str) -> Any:
    """Decode a JSON body, or explain in plain words what came back instead."""
    if not text:
        return None
    try:
        return from_json(text)
    except ValueError:
        raise not_json(text, status=status, content_type=content_type, what=what) from None


def not_json(text: str, *, status: int, content_type: str, what: str) -> TransientError:
    """The error for an answer that should be JSON and is not (an HTML page from a proxy, a
    truncated body): transient, as the record is not at fault."""
    snippet = " ".join(text[:120].split())
    kind = "an HTML page" if text.lstrip()[:1] == "<" else "a body that is not valid JSON"
    return TransientError(
        f"{what}: expected JSON but got {kind} (HTTP {status}, {content_type or 'no type'}):"
        f" {snippet!r}",
        status=status,
        code="MALFORMED_RESPONSE",
    )


class CallTimer:
    """Records one API call's latency and status in the metrics, by connection."""

    def __init__(self, connection: str, operation: str) -> None:
        self.connection = connection
        self.operation = operation
        self.started = time.perf_counter()

    def done(self, status: int | str) -> None:
        elapsed = time.perf_counter() - self.started
        metrics.API_CALLS.labels(self.connection, self.operation, str(status)).inc()
        metrics.API_LATENCY.labels(self.connection, self.operation).observe(elapsed)


def transport_error(
    exc: BaseException,
    what: str,
    url: URL,
    *,
    timeout_s: float,
    scrub: Callable[[str], str] = lambda text: text,
) -> ConnectorError:
    """A network failure in plain words, naming host and port only (some URLs carry secrets in
    their query, and aiohttp puts the whole URL into some messages)."""
    where = f"{url.host}:{url.port}"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return PermanentError(
            f"{what}: the TLS certificate of {where} is not trusted"
            f" ({scrub(str(exc.certificate_error))[:200]}); install the issuing CA"
            " or use the host name the certificate was issued for",
            code="TLS_CERTIFICATE",
        )
    if isinstance(exc, aiohttp.ClientSSLError):
        return PermanentError(
            f"{what}: the TLS handshake with {where} failed; is it an https port?",
            code="TLS_HANDSHAKE",
        )
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return TransientError(
            f"{what}: the host name {url.host!r} cannot be resolved (DNS); check the URL",
            code="DNS",
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        hint = ""
        if isinstance(exc.os_error, ConnectionRefusedError) or "refused" in reason.lower():
            hint = ": nothing listens on that port, or a firewall rejects the connection"
        return TransientError(f"{what}: cannot connect to {where} ({reason}){hint}", code="CONNECT")
    if isinstance(exc, TimeoutError):
        return TransientError(
            f"{what}: no answer from {where} within {timeout_s:g}s", code="TIMEOUT"
        )
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return TransientError(f"{what}: {where} closed the connection mid-answer", code="RESET")
    return TransientError(
        f"{what}: network error talking to {where} ({type(exc).__name__})", code="NETWORK"
    )


# -- one exchange, with a cap on the answer's size -----------------------------------------------


class ResponseTooLargeError(PermanentError):
    """An answer over the connection's size cap (``max_response_mb``)."""


@dataclass(frozen=True)
class BodyCap:
    """The largest answer a connection accepts, and where that is set (named in the error)."""

    max_bytes: int
    setting: str  # e.g. "max_response_mb of connection 'zoho'"

    @classmethod
    def of(cls, connection: str, max_response_mb: float) -> BodyCap:
        return cls(
            max(1, int(max_response_mb * 1024 * 1024)),
            f"max_response_mb of connection {connection!r}",
        )

    def error(self, what: str, size: str, status: int) -> ResponseTooLargeError:
        cap = _megabytes(self.max_bytes)
        return ResponseTooLargeError(
            f"{what}: the answer is {size}, over the cap of {cap}; raise {self.setting}"
            " or ask for smaller pages",
            status=status,
            code="RESPONSE_TOO_LARGE",
        )


def _megabytes(size: int) -> str:
    return f"{size / 1024 / 1024:.3g} MB"


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    body: bytes
    headers: CIMultiDictProxy[str]
    charset: str | None
    content_type: str

    def text(self) -> str:
        return self.body.decode(self.charset or "utf-8", errors="replace")


async def read_capped(response: aiohttp.ClientResponse, cap: BodyCap, what: str) -> bytes:
    """The body of ``response``, refused as soon as it is known to exceed ``cap``: from its
    ``Content-Length`` before reading, or while reading it in chunks. A refused answer's
    connection is closed (never returned to the pool half read)."""
    declared = response.content_length
    if declared is not None and declared > cap.max_bytes:
        response.close()
        raise cap.error(what, f"{_megabytes(declared)} (Content-Length)", response.status)
    body = bytearray()
    async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
        body += chunk
        if len(body) > cap.max_bytes:
            response.close()
            raise cap.error(what, f"more than {_megabytes(cap.max_bytes)}", response.status)
    return bytes(body)


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: URL,
    *,
    connection: str,
    operation: str,
    what: str,
    cap: BodyCap,
    timeout_s: float,
    record: bool = True,
    scrub: Callable[[str], str] = lambda text: text,
    **kwargs: Any,
) -> tuple[HttpAnswer, CallTimer]:
    """One HTTP exchange without redirects: the answer read up to ``cap``, and the call's
    timer. Transport failures come back classified (naming host and port, never the URL's
    query) and timed. With ``record=False`` the caller records the call's status itself with
    ``timer.done(...)`` once it has read the body (a token endpoint's error with HTTP 200)."""
    timer = CallTimer(connection, operation)
    try:
        async with session.request(method, url, allow_redirects=False, **kwargs) as response:
            body = await read_capped(response, cap, what)
            answer = HttpAnswer(
                response.status, body, response.headers, response.charset, response.content_type
            )
    except ResponseTooLargeError as exc:
        timer.done(exc.code or "too_large")
        raise
    except (aiohttp.ClientError, TimeoutError) as exc:
        timer.done(type(exc).__name__)
        raise transport_error(exc, what, url, timeout_s=timeout_s, scrub=scrub) from None
    if record:
        timer.done(answer.status)
    return answer, timer


# -- answers decoded into models -----------------------------------------------------------------


def decode_answer(
    model: type[M],
    body: bytes | str,
    *,
    status: int,
    content_type: str,
    what: str,
    charset: str | None = None,
    malformed: type[ConnectorError] = PermanentError,
    code: str = "MALFORMED_RESPONSE",
    describe_problem: Callable[[ValidationError], str] | None = None,
) -> M:
    """Decode a JSON answer straight into ``model`` (no intermediate dicts). A body that is not
    JSON is a ``TransientError`` (an HTML page from a proxy, a truncated answer); JSON of the
    wrong shape is a ``malformed`` error naming the first problem, never trusted."""
    data: bytes | str = body
    if isinstance(body, bytes):
        if charset and charset.lower().replace("-", "") not in ("utf8", "ascii"):
            data = body.decode(charset, errors="replace")
        elif body.startswith(b"\xef\xbb\xbf"):
            data = body[3:]
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "json_invalid":
            text = data if isinstance(data, str) else data.decode("utf-8", errors="replace")
            raise not_json(text, status=status, content_type=content_type, what=what) from None
        problem = describe_problem(exc) if describe_problem else validation_problem(exc)
        raise malformed(
            f"{what}: malformed response: {problem}", status=status, code=code
        ) from None


def validation_problem(exc: ValidationError) -> str:
    """The first problem of a validation error in plain words, naming where it is; the value
    itself is never shown (it may be anything a vendor sent)."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "the body"
    got = type(first.get("input")).__name__
    kind = {"dict": "an object", "list": "an array", "NoneType": "null"}.get(got, f"a {got}")
    if first["type"] == "missing":
        return f"{where} is missing"
    return f"{where}: {first['msg'].lower()} (got {kind})"
