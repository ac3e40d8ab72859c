"""Salesforce's two error shapes, and the 18-character record ids.

- Request-level errors: HTTP 4xx/5xx with a JSON array ``[{"message", "errorCode", "fields"?}]``.
- Per-record errors (upsert results, Collections): ``{"statusCode", "message", "fields"}``.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

Json = dict[str, Any]

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SUFFIX = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"


class ApiError(Exception):
    """A request-level error: the whole call fails with this status and body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fields: list[str] | None = None,
        headers: dict[str, str] | None = None,
        extra: Json | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> list[Json]:
        item: Json = {"message": self.message, "errorCode": self.code}
        if self.fields is not None:
            item["fields"] = self.fields
        item.update(self.extra)
        return [item]

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            text=json.dumps(self.body()),
            content_type="application/json",
            headers=self.headers,
        )


class RecordError(Exception):
    """A per-record failure: that record fails, the call goes on."""

    def __init__(
        self, code: str, message: str, fields: list[str] | None = None, **extra: Any
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.fields = fields or []
        self.extra = extra

    def item(self) -> Json:
        return {
            "statusCode": self.code,
            "message": self.message,
            "fields": self.fields,
            **self.extra,
        }

    def as_api_error(self, status: int = 400) -> ApiError:
        return ApiError(status, self.code, self.message, self.fields, extra=self.extra)


def not_found() -> ApiError:
    return ApiError(404, "NOT_FOUND", "The requested resource does not exist")


def session_invalid() -> ApiError:
    return ApiError(401, "INVALID_SESSION_ID", "Session expired or invalid")


def json_error(message: str) -> ApiError:
    return ApiError(400, "JSON_PARSER_ERROR", message)


def id18(id15: str) -> str:
    """The case-safe 18-character form of a 15-character Salesforce id."""
    suffix = ""
    for chunk in range(3):
        bits = 0
        for pos in range(5):
            char = id15[chunk * 5 + pos]
            if "A" <= char <= "Z":
                bits |= 1 << pos
        suffix += _SUFFIX[bits]
    return id15 + suffix


def base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, rest = divmod(number, 62)
        digits.append(BASE62[rest])
    return "".join(reversed(digits))


def make_id(key_prefix: str, number: int, pod: str = "5e") -> str:
    """``<key prefix 3><pod 2><0><9 base62 digits>`` plus the 3-character case suffix."""
    return id18(f"{key_prefix}{pod}0{base62(number, 9)}")


def normalize_id(value: str) -> str | None:
    """18-character form of a 15- or 18-character id; None when it is not an id."""
    if len(value) == 15 and all(c in BASE62 for c in value):
        return id18(value)
    if len(value) == 18 and all(c in BASE62 for c in value) and id18(value[:15]) == value:
        return value
    if len(value) == 18 and all(c in BASE62 for c in value):
        # the suffix is case-insensitive: recompute it from the 15 case-sensitive characters
        if id18(value[:15]).lower() == value.lower():
            return id18(value[:15])
    return None
