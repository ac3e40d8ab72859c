"""Zoho's error shapes: per-record errors inside ``data``, and request-level flat errors."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from emulators.zoho_crm.schema import FieldDef

Json = dict[str, Any]


class ZohoError(Exception):
    """A per-record (or per-item) error in Zoho's shape."""

    def __init__(self, code: str, message: str, details: Json | None = None) -> None:
        super().__init__(message)
        self.body: Json = {
            "code": code,
            "details": details if details is not None else {},
            "message": message,
            "status": "error",
        }


class RequestError(Exception):
    """A request-level error: flat ``{"code","details","message","status"}`` body."""

    def __init__(self, status: int, code: str, message: str, details: Json | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body: Json = {
            "code": code,
            "details": details if details is not None else {},
            "message": message,
            "status": "error",
        }

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status)


def flat_error(status: int, code: str, message: str, details: Json | None = None) -> web.Response:
    return RequestError(status, code, message, details).response()


def wrapped_error(status: int, code: str, message: str, details: Json) -> web.Response:
    return web.json_response({"data": [ZohoError(code, message, details).body]}, status=status)


def invalid_type(fdef: FieldDef, path: str, expected: str | None = None) -> ZohoError:
    return ZohoError(
        "INVALID_DATA",
        "invalid data",
        {
            "expected_data_type": expected or fdef.data_type,
            "api_name": fdef.api_name,
            "json_path": path,
        },
    )


def invalid_value(api_name: str, path: str, **extra: Any) -> ZohoError:
    return ZohoError(
        "INVALID_DATA", "invalid data", {"api_name": api_name, "json_path": path, **extra}
    )


def mandatory_missing(api_name: str, path: str, **extra: Any) -> ZohoError:
    return ZohoError(
        "MANDATORY_NOT_FOUND",
        "required field not found",
        {"api_name": api_name, "json_path": path, **extra},
    )


def url_pattern_error() -> web.Response:
    return flat_error(
        404, "INVALID_URL_PATTERN", "Please check if the URL trying to access is a correct one"
    )


def bad_method() -> web.Response:
    return flat_error(
        405,
        "INVALID_REQUEST_METHOD",
        "The http request method type is not a valid one",
        {},
    )
