"""Record keys: how the key fields of a source record become one identity key, and back.

The identity key names a record in ``record_links``, ``source_snapshots``, audit refs
(``system:entity:key``), change events and parent references. One function builds it
(:func:`encode_key`) and one takes it apart (:func:`decode_key`):

- a key of one field is that field's value, stripped (``C0001``);
- a composite key joins its fields' values with ``|``, and inside each value a ``\\`` or a
  ``|`` is escaped with a ``\\``: (``X|Y``, ``1``) is ``X\\|Y|1`` and (``X``, ``Y|1``) is
  ``X|Y\\|1``, two keys where joining alone made one. A key whose values hold neither
  character is exactly what it was before the escaping: existing links, snapshots and audit
  refs stay valid;
- an empty value (``None`` or blanks) is an empty component.

**Case.** Whether ``C0001`` and ``c0001`` are one record is the source's decision, declared per
connection (:func:`case_sensitive_keys`): a source whose keys are case-insensitive has its
identity keys upper-cased wherever they are built (the poller's record key, a child's
reference to its parent, the ``source_key`` computed field), so both spellings are one record
with one link, as they are one row in the source. SYSPRO runs on SQL Server, whose default
collation is case-insensitive: a SYSPRO connection says ``case_sensitive_keys: false`` unless
its settings say otherwise. A system whose settings have no such field has case-sensitive keys.
A case-sensitive source whose keys differ only by case cannot be told apart by a target that
matches case-insensitively (Zoho's duplicate check): map such keys to a match field the target
compares exactly, or declare the source case-insensitive.

A key the database cannot hold (a NUL character, a lone surrogate) or an empty key is no
identity at all: :func:`key_problem` says what is wrong, and the poller fails that record
alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import asyncpg

SEPARATOR = "|"
ESCAPE = "\\"
CASE_SETTING = "case_sensitive_keys"


def encode_key(values: Iterable[Any], *, case_sensitive: bool = True) -> str:
    """The identity key of a record from its key fields' values, in key order. Runs once a
    record: a key with nothing to escape is joined once and checked, not built part by part."""
    parts = ["" if value is None else str(value).strip() for value in values]
    if not case_sensitive:
        parts = [part.upper() for part in parts]
    if len(parts) == 1:
        return parts[0]
    key = SEPARATOR.join(parts)
    if ESCAPE not in key and key.count(SEPARATOR) == len(parts) - 1:
        return key
    return SEPARATOR.join(
        [
            part.replace(ESCAPE, ESCAPE + ESCAPE).replace(SEPARATOR, ESCAPE + SEPARATOR)
            for part in parts
        ]
    )


def decode_key(key: str, arity: int) -> list[str]:
    """The components of a key of ``arity`` fields; ValueError if it does not have them."""
    if arity == 1:
        return [key]
    if ESCAPE not in key:
        parts = key.split(SEPARATOR)
    else:
        parts, current, escaped = [], [], False
        for char in key:
            if escaped:
                current.append(char)
                escaped = False
            elif char == ESCAPE:
                escaped = True
            elif char == SEPARATOR:
                parts.append("".join(current))
                current = []
            else:
                current.append(char)
        if escaped:
            raise ValueError(f"key {key!r} ends in an unfinished escape")
        parts.append("".join(current))
    if len(parts) != arity:
        raise ValueError(f"key {key!r} has {len(parts)} components, not {arity}")
    return parts


def key_problem(key: str, arity: int = 1) -> str | None:
    """Why ``key`` cannot name a record (a sentence to follow the key), or None."""
    if "\x00" in key:
        return "contains a NUL character (U+0000), which PostgreSQL cannot store"
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid Unicode (it holds a lone surrogate, e.g. from a '\\udcff' escape)"
    if key == SEPARATOR * (arity - 1):
        return "is empty"
    return None


def case_sensitive_keys(system: str, settings: Mapping[str, Any] | None) -> bool:
    """Whether a connection's record keys are case-sensitive: its ``case_sensitive_keys``
    setting, else the default of its system's settings model, else True."""
    if settings and CASE_SETTING in settings:
        return bool(settings[CASE_SETTING])
    from shared.connections import ConnectionConfigError, connector_type

    try:
        model = connector_type(system).settings_model
    except ConnectionConfigError:
        return True
    field = model.model_fields.get(CASE_SETTING)
    return True if field is None or field.default is None else bool(field.default)


async def load_case_sensitive_keys(pool: asyncpg.Pool, connection: str) -> bool:
    """:func:`case_sensitive_keys` of a stored connection, read without opening its secrets.
    A connection that does not exist has case-sensitive keys (its use fails elsewhere)."""
    row = await pool.fetchrow(
        "SELECT system, settings FROM connections WHERE name = $1", connection
    )
    if row is None:
        return True
    return case_sensitive_keys(row["system"], row["settings"])
