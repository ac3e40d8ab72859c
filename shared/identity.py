"""One identity per record across flows and directions (issue 18, point 5): the fingerprint
of what a write put into the target, and the comparison that finds that write coming back.

``normalised`` is the ONE normalisation both sides use: the writer when it stores the
fingerprint of a write (``fingerprint``), the mapper when it compares a record read back from
that target (``is_echo``). Strings are stripped, numbers are Decimal text (``1``, ``1.0`` and
``1.00`` are one number), booleans and dates as themselves, a lookup ``{"id": x, ...}`` is
``x``, and None and "" are equal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic_core import to_json


def normalised(value: Any) -> Any:
    """``value`` as the fingerprint compares it."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float | Decimal):
        return _number(value)
    if isinstance(value, str):
        text = value.strip()
        return text or None
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Mapping):
        if "id" in value:
            return normalised(value["id"])
        return {str(k): normalised(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [normalised(v) for v in value]
    return str(value)


def _number(value: int | float | Decimal) -> str:
    try:
        number = Decimal(str(value)).normalize()
    except InvalidOperation:
        return str(value)
    if number == number.to_integral_value():
        number = number.quantize(Decimal(1))
    return format(number, "f")


def field_hash(value: Any) -> str:
    """A short hash of one field's normalised value."""
    return hashlib.sha256(to_json(normalised(value), fallback=str)).hexdigest()[:16]


def fingerprint(payload: Mapping[str, Any]) -> dict[str, str]:
    """What a write put into the target: ``{target field: short hash}``."""
    return {name: field_hash(value) for name, value in payload.items()}


def is_echo(written: Mapping[str, str] | None, record: Mapping[str, Any]) -> bool:
    """True when ``record`` (read back from the target) carries what we wrote: every written
    field that the record carries has the hash of what was written, and it carries at least
    one. A record that differs in any of them is a change made on that side."""
    if not written:
        return False
    carried = [name for name in written if name in record]
    if not carried:
        return False
    return all(field_hash(record[name]) == written[name] for name in carried)
