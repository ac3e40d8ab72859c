"""What every connector offers: auth, a source, a sink, ping.

A connector reads like a description of its API; the pipeline only sees these shapes:

- ``Source.changed_since(stream, since)``: async iterator over pages (lists of raw records) of
  everything changed since ``since`` (already widened by the overlap window), in a stable order
  (change field, then key); ``since=None`` reads everything (backfill, snapshot mode).
- ``Source.fetch(entity, ids)``: the full records a webhook named; ``ids`` are identity keys
  (``StreamSpec.key_of``), taken apart with ``shared.keys.decode_key``.
- ``Sink.upsert(entity, records, match_on)``: one ``WriteOutcome`` per record, in order.
- ``Sink.find_id(entity, field, value)``: the target id of the record whose ``field`` equals
  ``value`` exactly, or None (used to resolve a parent not yet in ``record_links``).
- ``ping()``: proves reach, auth, permissions and API version, in plain words.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from shared.failures import FailureClass
from shared.keys import encode_key


@dataclass(frozen=True)
class StreamSpec:
    """How one source entity is read (from the flow file and the connection's settings)."""

    entity: str
    key_fields: tuple[str, ...]
    change_field: str | None = None  # None: snapshot comparison by content hash
    select: tuple[str, ...] | None = None
    page_size: int | None = None
    # False: the source compares keys case-insensitively, and identity keys are upper-cased
    # (``shared.keys``; the poller sets it from the source connection)
    case_sensitive_keys: bool = True

    def key_of(self, record: dict[str, Any]) -> str:
        """The record's identity key (``shared.keys.encode_key``: composite keys escaped)."""
        get = record.get
        return encode_key(
            [get(name) for name in self.key_fields], case_sensitive=self.case_sensitive_keys
        )


@dataclass
class WriteOutcome:
    ok: bool
    target_id: str | None = None
    action: Literal["insert", "update"] | None = None
    failure: FailureClass | None = None
    error: str | None = None
    code: str | None = None


@dataclass
class PingCheck:
    name: str
    ok: bool
    detail: str


@dataclass
class PingResult:
    connection: str
    system: str
    checks: list[PingCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(PingCheck(name, ok, detail))
        return ok


@runtime_checkable
class Connector(Protocol):
    name: str
    system: str

    async def ping(self) -> PingResult: ...

    async def close(self) -> None: ...


@runtime_checkable
class Source(Connector, Protocol):
    def changed_since(
        self, stream: StreamSpec, since: str | None
    ) -> AsyncIterator[list[dict[str, Any]]]: ...

    async def fetch(self, stream: StreamSpec, ids: list[str]) -> list[dict[str, Any]]: ...


@runtime_checkable
class Sink(Connector, Protocol):
    max_batch: int

    async def upsert(
        self, entity: str, records: list[dict[str, Any]], match_on: list[str]
    ) -> list[WriteOutcome]: ...

    async def find_id(self, entity: str, field: str, value: str) -> str | None: ...
