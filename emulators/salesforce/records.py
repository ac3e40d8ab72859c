"""The record store of one object, and how JSON values become field values and back.

Stored values: text as ``str``, numbers as ``int``/``float``, booleans as ``bool``, dates as
``"YYYY-MM-DD"``, datetimes as epoch seconds (``float``), references as 18-character ids.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from emulators.salesforce.describe import NUMBER_TYPES, TEXT_TYPES, FieldDef, ObjectDef
from emulators.salesforce.errors import ApiError, json_error

Json = dict[str, Any]

DATE_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
DATETIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,9})?)?"
    r"(Z|[+-]\d{2}:?\d{2})?$"
)


def format_datetime(ts: float) -> str:
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}+0000"


def parse_datetime(text: str) -> float | None:
    match = DATETIME_RE.match(text)
    if not match:
        return None
    year, month, day, hour, minute = (int(match.group(i)) for i in range(1, 6))
    second = int(match.group(6) or 0)
    fraction = float(match.group(7) or 0)
    offset = match.group(8) or "Z"
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:
        return None
    ts = moment.timestamp() + fraction
    if offset != "Z":
        sign = 1 if offset[0] == "+" else -1
        digits = offset[1:].replace(":", "")
        ts -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return ts


def parse_date(text: str) -> str | None:
    match = DATE_RE.match(text)
    if not match:
        return None
    try:
        date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    except ValueError:
        return None
    return text


def _deserialize_error(fdef: FieldDef, value: Any) -> ApiError:
    kind = "VALUE_STRING" if isinstance(value, str) else type(value).__name__.upper()
    type_name = {"datetime": "datetime", "int": "int"}.get(fdef.type, fdef.type)
    if fdef.type in NUMBER_TYPES and fdef.type != "int":
        type_name = "double"
    return json_error(
        f"Cannot deserialize instance of {type_name} from {kind} value {value} "
        "or request may be missing a required field"
    )


def coerce(fdef: FieldDef, value: Any) -> Any:
    """The stored form of a JSON value for this field; ApiError (JSON_PARSER_ERROR) if the JSON
    type cannot be deserialized, as Salesforce fails the whole request then."""
    if value is None:
        return None
    ftype = fdef.type
    if ftype in TEXT_TYPES or ftype in ("id", "reference"):
        if value == "":
            return None  # Salesforce stores an empty string as null
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value) if isinstance(value, float) else str(value)
        if isinstance(value, str):
            return value
        raise _deserialize_error(fdef, value)
    if ftype in NUMBER_TYPES:
        number: float | int
        if isinstance(value, bool):
            raise _deserialize_error(fdef, value)
        if isinstance(value, int | float):
            number = value
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise _deserialize_error(fdef, value) from None
        else:
            raise _deserialize_error(fdef, value)
        if isinstance(number, float) and not math.isfinite(number):
            raise _deserialize_error(fdef, value)
        if ftype == "int":
            if isinstance(number, float) and not number.is_integer():
                raise _deserialize_error(fdef, value)
            return int(number)
        return float(number)
    if ftype == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _deserialize_error(fdef, value)
    if ftype == "date":
        if isinstance(value, str):
            text = value[:10] if DATETIME_RE.match(value) else value
            parsed = parse_date(text)
            if parsed is not None:
                return parsed
        raise _deserialize_error(fdef, value)
    if ftype == "datetime":
        if isinstance(value, str):
            ts = parse_datetime(value)
            if ts is None and parse_date(value) is not None:
                ts = parse_datetime(value + "T00:00:00Z")
            if ts is not None:
                return float(math.floor(ts))
        raise _deserialize_error(fdef, value)
    raise _deserialize_error(fdef, value)


def render_value(fdef: FieldDef, value: Any) -> Any:
    if value is None:
        return None
    if fdef.type == "datetime":
        return format_datetime(value)
    if fdef.type in NUMBER_TYPES and fdef.type != "int":
        return float(value)
    return value


@dataclass
class Store:
    """The records of one object and the indexes of its unique and external id fields."""

    obj: ObjectDef
    case_sensitive: bool = False
    records: dict[str, Json] = field(default_factory=dict)
    indexes: dict[str, dict[Any, set[str]]] = field(default_factory=dict)
    next_number: int = 0

    def __post_init__(self) -> None:
        self.rebuild_indexes()

    def key(self, fdef: FieldDef, value: Any) -> Any:
        if isinstance(value, str) and not (fdef.case_sensitive or self.case_sensitive):
            return value.lower()
        return value

    def rebuild_indexes(self) -> None:
        self.indexes = {f.name: {} for f in self.obj.unique_fields}
        for rid, record in self.records.items():
            self._index(rid, record)

    def _index(self, rid: str, record: Json) -> None:
        for name, index in self.indexes.items():
            value = record.get(name)
            if value is not None:
                fdef = self.obj.fields[name.lower()]
                index.setdefault(self.key(fdef, value), set()).add(rid)

    def _unindex(self, rid: str, record: Json) -> None:
        for name, index in self.indexes.items():
            value = record.get(name)
            if value is None:
                continue
            fdef = self.obj.fields[name.lower()]
            key = self.key(fdef, value)
            ids = index.get(key)
            if ids is not None:
                ids.discard(rid)
                if not ids:
                    del index[key]

    def find(self, fdef: FieldDef, value: Any) -> list[str]:
        """Ids of the records whose field equals value (indexed fields: fast)."""
        if fdef.type == "id":
            rid = value if isinstance(value, str) else None
            return [rid] if rid in self.records else []
        index = self.indexes.get(fdef.name)
        if index is not None:
            return sorted(index.get(self.key(fdef, value), ()))
        key = self.key(fdef, value)
        return [
            rid
            for rid, record in self.records.items()
            if record.get(fdef.name) is not None and self.key(fdef, record[fdef.name]) == key
        ]

    def put(self, record: Json) -> None:
        rid = record["Id"]
        old = self.records.get(rid)
        if old is not None:
            self._unindex(rid, old)
        self.records[rid] = record
        self._index(rid, record)

    def remove(self, rid: str) -> None:
        old = self.records.pop(rid, None)
        if old is not None:
            self._unindex(rid, old)

    def duplicates(self) -> dict[str, int]:
        """Per unique or external id field: how many values are held by more than one record."""
        return {
            name: sum(1 for ids in index.values() if len(ids) > 1)
            for name, index in self.indexes.items()
        }

    def __iter__(self) -> Iterator[Json]:
        return iter(self.records.values())
