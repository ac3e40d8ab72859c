"""The one place where failures are classified.

Every connector raises (or lets through) exceptions; ``classify`` turns any exception at all into
one of four classes, and the bus and retry code act on the class only:

- throttled: the target asks us to slow down (429, vendor limit codes); honour Retry-After;
- transient: 5xx, timeouts, resets, locks, a parent record not written yet; retry with delays;
- auth: 401 or an expired session; refresh credentials once, then retry;
- permanent: validation errors, mapping errors; dead-letter at once.

Three kinds of exception that no connector declares are decided here too:

- An outage of our own infrastructure (PostgreSQL or RabbitMQ: ``is_infrastructure``) is
  transient, and more: the record is not at fault and no attempt should be spent on it. The
  bus holds such a message and runs its handler again, with capped back-off, until the database
  and broker answer; the message is neither requeued nor counted as a delivery.
- A configuration error (a connection that does not exist or is invalid,
  ``shared.connections.ConnectionConfigError``; a secret the vault cannot open with the
  configured master keys, ``shared.vault.VaultError``; a flow that does not exist,
  ``shared.flow_store.FlowNotFoundError``) is permanent. Retrying the record cannot heal it:
  only the operator can, by fixing the configuration and then replaying the dead letters
  (``ml-connector dlq replay``). Dead-lettering at once says so right away, with the reason,
  instead of after the whole retry schedule (hours), and nothing is lost.
- Any other exception (a bug, an API answer of a shape nobody expected) is transient: retried
  with growing delays through the retry queues, then dead-lettered. ``describe`` names its class,
  so a dead letter tells what went wrong (``ZeroDivisionError: division by zero``).

An exception class may also declare its class with a ``failure_class`` attribute.
"""

from __future__ import annotations

import email.utils
import functools
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
# Errors of these types are the database's or the broker's whatever raised them.
_OUR_CLIENT_ERRORS: tuple[type[BaseException], ...] = _INFRASTRUCTURE_ERRORS[:-1]
# ... but for these, which say the broker answers and refuses us: wrong credentials, a vhost we
# may not use, another protocol. Waiting does not heal them. (aiormq's
# ProbableAuthenticationError stays an outage: it is also what a broker going down says.)
_REFUSALS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AuthenticationError,
    aiormq.exceptions.ConnectionNotAllowed,
    aiormq.exceptions.IncompatibleProtocolError,
)
# A bare OSError (a refused connection, a timeout, a reset) is ours only when it came out of
# the database or broker client; out of an HTTP call to a vendor it is that vendor's.
_OUR_CLIENT_MODULES = frozenset({"asyncpg", "aiormq", "aio_pika", "pamqp"})


def is_infrastructure(exc: BaseException) -> bool:
    """Whether ``exc`` says that our own PostgreSQL or RabbitMQ is unreachable or went away (a
    restart, a failover, a full connection table), as opposed to a fault of the record or of an
    external system. Such a failure is retried in place until they answer, burning nothing."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectorError, aiohttp.ClientError, *_REFUSALS)):
            return False
        if isinstance(current, _OUR_CLIENT_ERRORS):
            return True
        if isinstance(current, OSError) and _raised_in(current, _OUR_CLIENT_MODULES):
            return True
        current = current.__cause__
    return False


def _raised_in(exc: BaseException, packages: frozenset[str]) -> bool:
    """Whether the traceback of ``exc`` passes through code of one of ``packages``."""
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module.partition(".")[0] in packages:
            return True
        tb = tb.tb_next
    return False


@functools.cache
def _configuration_errors() -> tuple[type[BaseException], ...]:
    # imported when first needed: these modules import this one
    from shared.connections import ConnectionConfigError
    from shared.flow_store import FlowNotFoundError
    from shared.vault import VaultError

    return (ConnectionConfigError, VaultError, FlowNotFoundError)


def is_configuration_error(exc: BaseException) -> bool:
    """A connection, secret or flow the operator has to fix (then replay the dead letters)."""
    return isinstance(exc, _configuration_errors())


def classify(exc: BaseException) -> FailureClass:
    """The failure class of any exception at all (see the module docstring)."""
    if isinstance(exc, ConnectorError):
        return exc.failure_class
    if not isinstance(exc, Exception):
        # a cancellation, an interrupt, an exit: not a failure, and nothing may retry it
        return FailureClass.PERMANENT
    declared = getattr(exc, "failure_class", None)
    if isinstance(declared, FailureClass):
        return declared
    if isinstance(exc, aiohttp.ClientResponseError):
        return class_of_status(exc.status) or FailureClass.PERMANENT
    if is_configuration_error(exc):
        return FailureClass.PERMANENT
    # Everything else is transient: timeouts, resets and connection errors (a vendor's, or our
    # own database's or broker's going away: never the record's fault), a truncated body or an
    # HTML error page from a proxy, and any exception nobody foresaw. Retrying costs a few
    # delayed attempts; dead-lettering at once would lose a record to a blip.
    return FailureClass.TRANSIENT


def exception_name(exc: BaseException) -> str:
    """The exception's class as a reader finds it: ``ZeroDivisionError``,
    ``asyncpg.exceptions.CannotConnectNowError``."""
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


_QUERY = re.compile(r"(https?://[^\s'\"?#]*)\?[^\s'\"]*")
_USERINFO = re.compile(r"(https?://)[^/\s@'\"]+@")


def describe(exc: BaseException) -> str:
    """One line for logs, audit rows and dead-letter headers. An error we classified ourselves
    (a ``ConnectorError``) says what happened in its message; any other names its class first
    (``KeyError: 'Name'``), since its message alone often says nothing. URL query strings and
    user info are cut, because some clients put credentials there (and aiohttp echoes whole
    URLs), and every registered secret and token is masked (``shared.logs.redact``): vendors
    echo them."""
    from shared.logs import redact

    text = str(exc)
    if not isinstance(exc, ConnectorError):
        name = exc.__class__.__name__
        text = f"{name}: {text}" if text else name
    text = redact(text)
    text = _USERINFO.sub(r"\1", _QUERY.sub(r"\1?…", text))
    return " ".join(text.split())[:2000]
