"""The HTTP base every connector uses: one session factory, JSON reading with clear errors, and
per-connection call metrics."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from pydantic_core import from_json, to_json
from yarl import URL

from shared import metrics
from shared.failures import ConnectorError, PermanentError, TransientError

USER_AGENT = "ml-connector/0.1"


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
        snippet = " ".join(text[:120].split())
        kind = "an HTML page" if text.lstrip()[:1] == "<" else "a body that is not valid JSON"
        raise TransientError(
            f"{what}: expected JSON but got {kind} (HTTP {status}, {content_type or 'no type'}):"
            f" {snippet!r}",
            status=status,
            code="MALFORMED_RESPONSE",
        ) from None


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
