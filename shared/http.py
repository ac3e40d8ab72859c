"""The HTTP base every connector uses: one session factory, JSON reading with clear errors, and
per-connection call metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

from shared import metrics
from shared.failures import TransientError

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
    )


def parse_json(text: str, *, status: int, content_type: str, what: str) -> Any:
    """Decode a JSON body, or explain in plain words what came back instead."""
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
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
