"""Structured JSON logs, and the one registry of secrets that every text we write is masked with.

Each log line carries the service, and where known the flow, record and message ids.

Secrets registry. Vendors echo what we send them (an error body that repeats the client secret,
a debug page that shows the access token), so every text we write (log lines, exception texts
through ``shared.failures.describe``, audit rows, dead-letter headers) passes through
:func:`redact`. What is registered:

- every secret of a connection, when it is opened (``shared.connections.build_connector``) and
  when a connector is built with its secrets (:func:`register_secrets`);
- every token issued to a connection (an access token, a SYSPRO session id), when the
  ``TokenManager`` obtains or loads it (:func:`register_token`); the last ``TOKENS_KEPT`` per
  connection are kept, so that a long-running process does not grow without bound.

Each value is also masked in the forms it takes on the wire and in our own JSON: URL-encoded
(``%2B``), form-encoded (``+`` for a space) and JSON-escaped.

Values shorter than ``MIN_SECRET_LENGTH`` (4) characters cannot be masked safely: masking
``ab`` would mangle every word that contains it, and a text that keeps it reveals nothing to
tell it apart. They are not registered; :func:`register_secret` says so by returning False, and
``ConnectionStore.add`` warns the operator (use longer secrets).
"""

from __future__ import annotations

import json
import logging
import sys
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote, quote_plus

from pydantic import BaseModel, SecretStr

MIN_SECRET_LENGTH = 4
TOKENS_KEPT = 32  # per connection; Zoho allows 15 live access tokens per refresh token
MASK = "********"

E = TypeVar("E", bound=BaseException)

_SECRETS: set[str] = set()
_TOKENS: dict[str, deque[str]] = {}
_FORMS: tuple[str, ...] = ()  # every masked form, longest first (rebuilt on registration)
_CONTEXT_FIELDS = (
    "service",
    "flow",
    "entity",
    "record",
    "message_id",
    "batch_id",
    "connection",
    "queue",
    "count",
    "error_class",
    "expires_in_s",
    "stage",
)


def _forms(value: str) -> set[str]:
    """The value as sent and as echoed back: plain, URL-encoded, form-encoded, JSON-escaped."""
    forms = {value, quote(value, safe=""), quote(value), quote_plus(value)}
    forms.add(json.dumps(value)[1:-1])
    forms.add(json.dumps(value, ensure_ascii=False)[1:-1])
    return {form for form in forms if len(form) >= MIN_SECRET_LENGTH}


def _rebuild() -> None:
    global _FORMS
    values = set(_SECRETS)
    for tokens in _TOKENS.values():
        values.update(tokens)
    forms: set[str] = set()
    for value in values:
        forms |= _forms(value)
    _FORMS = tuple(sorted(forms, key=len, reverse=True))


def register_secret(value: str | None) -> bool:
    """Mask ``value`` in every text we write from now on. False when it is too short to be
    masked safely (empty values are ignored and count as masked)."""
    if not value:
        return True
    if len(value) < MIN_SECRET_LENGTH:
        return False
    if value not in _SECRETS:
        _SECRETS.add(value)
        _rebuild()
    return True


def register_secrets(secrets: BaseModel | dict[str, Any]) -> list[str]:
    """Register every value of a connection's secrets (a pydantic model of ``SecretStr`` or a
    dict); returns the names of those too short to be masked."""
    items: Iterable[tuple[str, Any]] = (
        ((name, getattr(secrets, name)) for name in type(secrets).model_fields)
        if isinstance(secrets, BaseModel)
        else secrets.items()
    )
    too_short = []
    for name, value in items:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str) and not register_secret(value):
            too_short.append(name)
    return too_short


def register_token(connection: str, value: str | None) -> None:
    """Mask a token issued to ``connection`` (access token, session id); the newest
    ``TOKENS_KEPT`` per connection are kept."""
    if not value or len(value) < MIN_SECRET_LENGTH:
        return
    kept = _TOKENS.setdefault(connection, deque(maxlen=TOKENS_KEPT))
    if value in kept:
        return
    kept.append(value)
    _rebuild()


def redact(text: str) -> str:
    """``text`` with every registered secret and token masked."""
    for form in _FORMS:
        if form in text:
            text = text.replace(form, MASK)
    return text


def redact_error(exc: E) -> E:
    """Mask secrets in an exception's text in place (its ``message`` and ``args``); returns it."""
    if not _FORMS:
        return exc
    message = getattr(exc, "message", None)
    if isinstance(message, str):
        exc.message = redact(message)  # type: ignore[attr-defined]
    exc.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in exc.args)
    return exc


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str))


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiormq", "aio_pika", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
