"""The one place where failures are classified.

Every connector raises (or lets through) exceptions; ``classify`` turns any of them into one of
four classes, and the bus and retry code act on the class only:

- throttled: the target asks us to slow down (429, vendor limit codes); honour Retry-After;
- transient: 5xx, timeouts, resets, locks, a parent record not written yet; retry with delays;
- auth: 401 or an expired session; refresh credentials once, then retry;
- permanent: validation errors, mapping errors; dead-letter at once.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
from datetime import UTC, datetime
from enum import StrEnum

import aiohttp
import aiormq
import asyncpg


class FailureClass(StrEnum):
    THROTTLED = "throttled"
    TRANSIENT = "transient"
    AUTH = "auth"
    PERMANENT = "permanent"


class ConnectorError(Exception):
    """An error with a known class. ``code`` is the vendor's code where it gave one."""

    failure_class: FailureClass = FailureClass.PERMANENT

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.retry_after = retry_after

    def __str__(self) -> str:
        parts = [self.message]
        if self.code:
            parts.append(f"code={self.code}")
        if self.status is not None:
            parts.append(f"http={self.status}")
        return " ".join(parts)


class ThrottledError(ConnectorError):
    failure_class = FailureClass.THROTTLED


class TransientError(ConnectorError):
    failure_class = FailureClass.TRANSIENT


class AuthError(ConnectorError):
    failure_class = FailureClass.AUTH


class PermanentError(ConnectorError):
    failure_class = FailureClass.PERMANENT


class MappingError(PermanentError):
    """A source record the flow cannot map (names the flow and the field)."""


class ParentNotWrittenError(TransientError):
    """A record's parent has no target id yet; try again later."""


_ERRORS_BY_CLASS: dict[FailureClass, type[ConnectorError]] = {
    FailureClass.THROTTLED: ThrottledError,
    FailureClass.TRANSIENT: TransientError,
    FailureClass.AUTH: AuthError,
    FailureClass.PERMANENT: PermanentError,
}


def error_for(failure_class: FailureClass) -> type[ConnectorError]:
    return _ERRORS_BY_CLASS[failure_class]


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def class_of_status(status: int) -> FailureClass | None:
    """The generic meaning of an HTTP status; connectors refine it with vendor codes."""
    if status < 400:
        return None
    if status == 429:
        return FailureClass.THROTTLED
    if status == 401:
        return FailureClass.AUTH
    if status in (408, 409, 423, 425) or status >= 500:
        return FailureClass.TRANSIENT
    return FailureClass.PERMANENT


def http_error(
    status: int, message: str, *, code: str | None = None, retry_after: str | None = None
) -> ConnectorError:
    failure_class = class_of_status(status) or FailureClass.PERMANENT
    return error_for(failure_class)(
        message, code=code, status=status, retry_after=parse_retry_after(retry_after)
    )


_INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    OSError,
)


def classify(exc: BaseException) -> FailureClass:
    """The failure class of any exception raised while talking to an external system."""
    if isinstance(exc, ConnectorError):
        return exc.failure_class
    if isinstance(exc, aiohttp.ClientResponseError):
        return class_of_status(exc.status) or FailureClass.PERMANENT
    if isinstance(
        exc,
        asyncio.TimeoutError
        | TimeoutError
        | aiohttp.ClientConnectionError
        | aiohttp.ClientPayloadError
        | ConnectionError,
    ):
        return FailureClass.TRANSIENT
    if isinstance(exc, _INFRASTRUCTURE_ERRORS):
        # Our own database or broker went away (a restart, a failover): retry, never blame
        # the record.
        return FailureClass.TRANSIENT
    if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError):
        # A truncated body or an HTML error page from a proxy: the record is not at fault.
        return FailureClass.TRANSIENT
    return FailureClass.PERMANENT


_QUERY = re.compile(r"(https?://[^\s'\"?#]*)\?[^\s'\"]*")
_USERINFO = re.compile(r"(https?://)[^/\s@'\"]+@")


def describe(exc: BaseException) -> str:
    """One line for logs, audit rows and dead-letter headers. URL query strings and user info
    are cut, because some clients put credentials there (and aiohttp echoes whole URLs), and
    every registered secret and token is masked (``shared.logs.redact``): vendors echo them."""
    from shared.logs import redact

    text = redact(str(exc) or exc.__class__.__name__)
    text = _USERINFO.sub(r"\1", _QUERY.sub(r"\1?…", text))
    return text[:2000]
