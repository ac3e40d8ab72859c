"""What every connector offers: auth, a source, a sink, ping.

A connector reads like a description of its API; the pipeline only sees these shapes:

- ``Source.changed_since(stream, since)``: async iterator over pages (lists of raw records) of
  everything changed since ``since`` (already widened by the overlap window), in a stable order
  (change field, then key); ``since=None`` reads everything (backfill, snapshot mode).
- ``Source.fetch(entity, ids)``: the full records a webhook named; ``ids`` are identity keys
  (``StreamSpec.key_of``), taken apart with ``shared.keys.decode_key``.
- ``Sink.upsert(entity, records, match_on)``: one ``WriteOutcome`` per ``SinkRecord``, in
  order; the sink renders the record's neutral parent references and line items itself.
- ``Sink.find_ids(entity, field, values)``: exact and batched, ``{value: target id}`` for every
  value found (used to resolve parents not yet in the identity table; one call per flush).
- ``capabilities``: what the connector can read and write (``Capabilities``), declared once
  and checked by ``flows apply`` and the services.
- ``ping()``: proves reach, auth, permissions and API version, in plain words.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from shared.failures import FailureClass
from shared.keys import encode_key

if TYPE_CHECKING:
    from shared.messages import LineItem, ParentRef


class CursorKind(StrEnum):
    """How a stream's changes are found: a change timestamp, a date + time pair, or none
    (snapshot comparison by content hash)."""

    TIMESTAMP = "timestamp"
    COMPOSITE = "composite"
    NONE = "none"


class MatchStrategy(StrEnum):
    """How a sink finds the record a write updates."""

    DUPLICATE_CHECK = "duplicate_check"  # Zoho upsert duplicate_check_fields
    EXTERNAL_ID = "external_id"  # Salesforce upsert on an external id field
    KEY = "key"  # ERP: PUT by key fields


@dataclass(frozen=True)
class StreamDecl:
    """One readable entity."""

    entity: str
    key: tuple[str, ...] = ()  # default key fields (empty: the flow must name them)
    cursors: frozenset[CursorKind] = frozenset({CursorKind.NONE})
    deletes: bool = False  # the API reports deletes for it
    filter_pushdown: bool = False  # the API can filter server-side


@dataclass(frozen=True)
class SinkDecl:
    """One writable entity."""

    entity: str
    match: frozenset[MatchStrategy]
    line_items: str | None = None  # the target field line items render into, if any


@dataclass(frozen=True)
class Capabilities:
    """What a connection can read and write, declared once by its connector type."""

    streams: tuple[StreamDecl, ...] = ()
    sinks: tuple[SinkDecl, ...] = ()
    open_streams: bool = False  # any entity name is readable (custom modules): checked by ping
    open_sinks: bool = False  # any entity name is writable
    max_batch: int = 1  # records per write call
    push: bool = False  # takes webhook notifications (PushSource)
    keys_case_sensitive: bool = True

    def stream(self, entity: str) -> StreamDecl | None:
        for decl in self.streams:
            if decl.entity == entity:
                return decl
        if self.open_streams:
            return StreamDecl(entity, cursors=frozenset(CursorKind))
        return None

    def sink(self, entity: str) -> SinkDecl | None:
        for decl in self.sinks:
            if decl.entity == entity:
                return decl
        if self.open_sinks:
            match = frozenset().union(*(d.match for d in self.sinks)) or frozenset(MatchStrategy)
            return SinkDecl(entity, match=match)
        return None

    @property
    def readable(self) -> bool:
        return bool(self.streams) or self.open_streams

    @property
    def writable(self) -> bool:
        return bool(self.sinks) or self.open_sinks


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
class SinkRecord:
    """One record to write, target-shaped but with its references still neutral: the sink
    renders ``refs`` (``target_id`` filled where known) and ``lines`` into its own shapes."""

    payload: dict[str, Any]  # plain fields, already mapped
    refs: list[ParentRef] = field(default_factory=list)
    lines: list[LineItem] = field(default_factory=list)
    exists: bool = False  # the target record exists (insert-only fields already dropped)


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
    capabilities: Capabilities
    max_batch: int
    refs_need_ids: bool  # references render as target ids (Zoho), not by external id

    async def upsert(
        self, entity: str, records: list[SinkRecord], match_on: list[str]
    ) -> list[WriteOutcome]: ...

    async def find_ids(self, entity: str, field: str, values: Sequence[str]) -> dict[str, str]:
        """Exact and batched: ``{value: target id}`` for every value found; one call per 100
        values at most."""
        ...
