"""Request plumbing: the JSON body read once, what the middlewares learnt about a call, query
parameters and the time formats Zoho accepts."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from aiohttp import web

from emulators.zoho_crm.errors import RequestError


class _BadBody:
    """Marker for a request body that is not JSON."""


BAD_BODY = _BadBody()


@dataclass
class CallInfo:
    """What the middlewares learnt about one API call."""

    body: Any = None
    body_read: bool = False
    nrecords: int | None = None
    coql_limit: int | None = None
    reject: bool = False


_REQUEST_KEY_TYPE = getattr(web, "RequestKey", None)
CALL_INFO_KEY: Any = (
    _REQUEST_KEY_TYPE("zoho_call_info", CallInfo) if _REQUEST_KEY_TYPE else "zoho_call_info"
)


def call_info(request: web.Request) -> CallInfo:
    info: CallInfo | None = request.get(CALL_INFO_KEY)
    if info is None:
        info = CallInfo()
        request[CALL_INFO_KEY] = info
    return info


def parse_datetime(text: str) -> float | None:
    """ISO-8601 with an offset -> epoch seconds; None when not valid."""
    try:
        parsed = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()


def parse_http_time(text: str) -> float | None:
    """If-Modified-Since: ISO-8601 with offset (Zoho's documented form) or RFC 1123."""
    value = parse_datetime(text.strip())
    if value is not None:
        return value
    try:
        parsed = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def to_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            return None
        return result if math.isfinite(result) else None
    return None


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, read once per request (middlewares peek at it); BAD_BODY when
    it is not JSON."""
    info = call_info(request)
    if info.body_read:
        return info.body
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = BAD_BODY
    info.body, info.body_read = body, True
    return body


def int_param(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise RequestError(
            400,
            "INVALID_DATA",
            "invalid data",
            {"param_name": name, "expected_data_type": "integer"},
        )
    return value


def if_modified_since(request: web.Request) -> float | None:
    """The ``If-Modified-Since`` header as epoch seconds (None when absent)."""
    header = request.headers.get("If-Modified-Since")
    if not header:
        return None
    since = parse_http_time(header)
    if since is None:
        raise RequestError(
            400,
            "INVALID_DATA",
            "invalid data",
            {"header_name": "If-Modified-Since", "expected_data_type": "datetime"},
        )
    return since
