"""Messages on the bus: pydantic models with a schema_version, serialized as JSON.

One bus message carries a batch: a page of ``ChangeEvent`` of one flow and entity
(``ChangeBatch``), or the ``UpsertCommand`` of one target entity (``CommandBatch``). Records that
fail are split out of their batch and travel together, a batch of the failed ones, to retry or
dead-letter.

A message is validated record by record (``decode_records``): a record that is not valid, or
that says it has a ``schema_version`` this build does not know, is set aside with the reason,
and the others go on. Only an envelope that is not valid (the batch's own fields) refuses the
whole message.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import from_json, to_json

from shared.failures import FailureClass

# The message schema this build writes, and the versions it reads. A message or record of any
# other version is refused with the reason (a newer producer during a rolling upgrade: replay
# the dead letters once every service runs the version that knows it).
SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = (1,)


def utcnow() -> datetime:
    return datetime.now(UTC)


_ID_PREFIX = os.urandom(8).hex()  # this process
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_id() -> str:
    """A unique id of 32 hex digits: 64 random bits drawn when the process starts, then a
    counter. Runs several times per record, so it costs a format, not a system call."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def canonical_hash(value: Any) -> str:
    """Hash of a JSON-like value whatever the order of its keys (flow definitions)."""
    return hashlib.sha256(canonical_json(value)).hexdigest()[:32]


def content_hash(value: Any) -> str:
    """Hash of a JSON-like value in its own key order: the version of a source record that has
    no change timestamp, and the hash of a target payload. Both are built in a fixed order (a
    record's columns sorted by name, a payload's fields in the order of the stored flow), so
    equal content gives an equal hash. Runs per record: serialized by pydantic-core, several
    times faster than ``json.dumps``."""
    return hashlib.sha256(to_json(value, fallback=str)).hexdigest()[:32]


_M = TypeVar("_M", bound=BaseModel)
_set_attribute = object.__setattr__
_ALL_FIELDS: dict[type[BaseModel], set[str]] = {}


def construct(cls: type[_M], values: dict[str, Any]) -> _M:
    """A model from trusted values that name every field and nothing else: what
    ``model_construct`` does, without its pass over each field's aliases and defaults (a third
    of the cost of turning an event into a command). Anything else goes to ``model_construct``."""
    fields = _ALL_FIELDS.get(cls)
    if fields is None:
        fields = _ALL_FIELDS[cls] = set(cls.__pydantic_fields__)
    if values.keys() != fields:
        return cls.model_construct(**values)
    model = cls.__new__(cls)
    _set_attribute(model, "__dict__", values)
    # Every field is set: the models share one set (pydantic only ever adds a name to it, on
    # assignment, and a copy gets its own), instead of building one a model.
    _set_attribute(model, "__pydantic_fields_set__", fields)
    _set_attribute(model, "__pydantic_extra__", None)
    _set_attribute(model, "__pydantic_private__", None)
    return model


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)
    kind: ClassVar[str] = "message"
    # bounds checked by pydantic-core, no Python per record; KNOWN_SCHEMA_VERSIONS is a range
    schema_version: int = Field(
        default=SCHEMA_VERSION, ge=min(KNOWN_SCHEMA_VERSIONS), le=max(KNOWN_SCHEMA_VERSIONS)
    )


class ChangeEvent(Message):
    """A source record as the poller saw it."""

    event_id: str = Field(default_factory=new_id)
    flow: str
    flow_version: int
    source_connection: str
    source_system: str
    entity: str
    key: str
    version: str = Field(description="source change marker: a timestamp, or a content hash")
    # with its offset: a time without one would be read in whatever zone a process is in
    observed_at: AwareDatetime = Field(
        default_factory=utcnow, description="orders versions of a key"
    )
    operation: Literal["upsert", "delete"] = "upsert"
    record: dict[str, Any]

    @classmethod
    def build(cls, **values: Any) -> ChangeEvent:
        """An event from values the poller made itself (a record as the source connector
        returned and validated it), without a second validation pass: one per record."""
        values.setdefault("event_id", new_id())
        values.setdefault("schema_version", SCHEMA_VERSION)
        values.setdefault("operation", "upsert")
        return construct(cls, values)


class ChangeNotice(Message):
    """A webhook said these records changed; carries ids only."""

    notice_id: str = Field(default_factory=new_id)
    connection: str
    system: str
    entity: str
    ids: list[str]
    operation: str = "edit"
    received_at: datetime = Field(default_factory=utcnow)


class ParentRef(BaseModel):
    """A child's link to its parent, target-neutral: the parent's identity on the source side
    (``flow``, ``source_entity``, ``source_key``), the target field it fills, and the parent's
    target id once known (filled by the writer, or ready from the mapping). Each sink renders
    it its own way (Zoho ``{"id": ...}``, Salesforce a relationship by external id, an ERP its
    key field)."""

    model_config = ConfigDict(extra="forbid")
    field: str
    flow: str
    source_entity: str
    source_key: str
    target_entity: str
    match_field: str | None = None  # the target field holding the parent's key
    match_value: str | None = None
    target_id: str | None = None
    # accepted from messages written before references were neutral, and ignored
    shape: Literal["id_object", "id"] | None = Field(default=None, exclude=True)


class LineItem(BaseModel):
    """One line of a record with lines (an invoice, an order), target-neutral: the sink
    renders it into its own line field (Zoho ``Invoiced_Items`` rows, ...)."""

    model_config = ConfigDict(extra="forbid")
    product: ParentRef | None = None
    quantity: float = 1
    unit_price: float | None = None
    description: str | None = None
    fields: dict[str, Any] = Field(default_factory=dict)  # extra target fields of the line


class UpsertCommand(Message):
    """A target-shaped record to upsert, with its lineage."""

    command_id: str = Field(default_factory=new_id)
    event_id: str
    flow: str
    flow_version: int
    transformation: str
    source_system: str
    source_entity: str
    source_key: str
    source_version: str
    observed_at: AwareDatetime
    target_connection: str
    target_system: str
    target_entity: str
    match_on: list[str]
    payload: dict[str, Any]
    parents: list[ParentRef] = Field(default_factory=list)
    lines: list[LineItem] = Field(default_factory=list)
    # the mapped field the lines came from (its insert_only rule applies to them)
    lines_field: str | None = None
    insert_only: list[str] = Field(default_factory=list)
    # fields the other side of a two-way pair owns: sent on create, held back on update
    owned_elsewhere: list[str] = Field(default_factory=list)
    # the flow's source connection: one identity per record between two connections. Empty on
    # commands mapped before it was carried: the writer looks it up from the flow, once.
    source_connection: str = ""
    # set by ``build`` (the mapper); required on the wire, so that decoding a command runs no
    # Python per command (a post-init hook cost the writer a fifth of its decoding)
    payload_hash: str = Field(min_length=1)

    @staticmethod
    def hash_of(
        payload: dict[str, Any], parents: list[ParentRef], lines: list[LineItem] | None = None
    ) -> str:
        refs = [(p.field, p.flow, p.source_entity, p.source_key) for p in parents]
        if not lines:  # the hash of a command without lines is what it was before lines
            return content_hash({"payload": payload, "parents": refs})
        rows = [line.model_dump(mode="json", exclude_defaults=True) for line in lines]
        return content_hash({"payload": payload, "parents": refs, "lines": rows})

    @classmethod
    def build(cls, **values: Any) -> UpsertCommand:
        """A command from trusted, already validated values, without re-validation."""
        values.setdefault("command_id", new_id())
        values.setdefault("schema_version", SCHEMA_VERSION)
        values.setdefault("parents", [])
        values.setdefault("insert_only", [])
        values.setdefault("lines", [])
        values.setdefault("owned_elsewhere", [])
        values.setdefault("lines_field", None)
        values.setdefault("source_connection", "")
        values.setdefault(
            "payload_hash", cls.hash_of(values["payload"], values["parents"], values["lines"])
        )
        return construct(cls, values)

    @property
    def source_ref(self) -> str:
        return f"{self.source_system}:{self.source_entity}:{self.source_key}"


class ChangeBatch(Message):
    kind: ClassVar[str] = "change_batch"
    batch_id: str = Field(default_factory=new_id)
    flow: str
    entity: str
    events: list[ChangeEvent]

    items_field: ClassVar[str] = "events"

    def split(self, event: ChangeEvent) -> ChangeBatch:
        return self.subset([event])

    def subset(self, events: list[ChangeEvent]) -> ChangeBatch:
        return ChangeBatch(flow=self.flow, entity=self.entity, events=events)


class NoticeBatch(Message):
    kind: ClassVar[str] = "notice_batch"
    items_field: ClassVar[str] = "notices"
    batch_id: str = Field(default_factory=new_id)
    notices: list[ChangeNotice]

    def subset(self, notices: list[ChangeNotice]) -> NoticeBatch:
        return NoticeBatch(notices=notices)


class CommandBatch(Message):
    kind: ClassVar[str] = "command_batch"
    batch_id: str = Field(default_factory=new_id)
    target_connection: str
    target_entity: str
    # when and by which mapper replica the commands were mapped: the writer's audit rows keep
    # them (the mapper appends no row of its own for a mapped record); absent on batches
    # mapped before they were carried
    mapped_at: AwareDatetime | None = None
    mapped_by: str | None = None
    commands: list[UpsertCommand]

    items_field: ClassVar[str] = "commands"

    def split(self, command: UpsertCommand) -> CommandBatch:
        return self.subset([command])

    def subset(self, commands: list[UpsertCommand]) -> CommandBatch:
        return CommandBatch(
            target_connection=self.target_connection,
            target_entity=self.target_entity,
            mapped_at=self.mapped_at,
            mapped_by=self.mapped_by,
            commands=commands,
        )


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.kind: cls for cls in (ChangeBatch, NoticeBatch, CommandBatch)
}


ITEM_TYPES: dict[str, type[BaseModel]] = {
    ChangeBatch.kind: ChangeEvent,
    NoticeBatch.kind: ChangeNotice,
    CommandBatch.kind: UpsertCommand,
}


class MessageFormatError(ValueError):
    """A bus message body that is not a valid message of its declared type."""

    failure_class = FailureClass.PERMANENT


def decode(kind: str | None, body: bytes) -> Message:
    """The message, all or nothing (``decode_records`` sets invalid records aside instead)."""
    cls = MESSAGE_TYPES.get(kind or "")
    if cls is None:
        raise MessageFormatError(f"unknown message type {kind!r}")
    try:
        return cls.model_validate_json(body)
    except ValidationError as exc:
        raise MessageFormatError(f"invalid {kind} message: {explain(exc)}") from None
    except ValueError as exc:
        raise MessageFormatError(f"invalid {kind} message: {exc}") from None


@dataclass
class RejectedRecord:
    """A record of a batch that is not valid: its position, what names it, why, and the record
    as it came (to dead-letter it as it was)."""

    index: int
    ref: str
    reason: str
    raw: Any


@dataclass
class DecodedBatch:
    """A batch message with its valid records (``message``, None when none is valid) and the
    records it set aside (``rejected``)."""

    message: Message | None
    rejected: list[RejectedRecord] = field(default_factory=list)
    envelope: dict[str, Any] | None = None  # the message as parsed, when records were rejected

    def rejected_body(self) -> bytes:
        """The message with only its rejected records, as they came: a dead letter that
        ``dlq replay`` can send again (once a build that reads them runs)."""
        assert self.envelope is not None and self.message is not None
        items = type(self.message).items_field  # type: ignore[attr-defined]
        return to_json({**self.envelope, items: [r.raw for r in self.rejected]})

    def summary(self) -> str:
        """One line: how many records were refused and why, the first few named."""
        total = len(self.rejected) + len(self.items())
        shown = "; ".join(f"{r.ref}: {r.reason}" for r in self.rejected[:5])
        more = f"; and {len(self.rejected) - 5} more" if len(self.rejected) > 5 else ""
        return f"{len(self.rejected)} of {total} records invalid: {shown}{more}"

    def items(self) -> list[Any]:
        if self.message is None:
            return []
        return list(getattr(self.message, type(self.message).items_field))  # type: ignore[attr-defined]


def decode_records(kind: str | None, body: bytes) -> DecodedBatch:
    """A batch message, validated record by record.

    The whole message is validated at once first (pydantic-core, no Python per record): the
    usual case costs what ``decode`` costs. Only when that fails is each record validated
    alone. Raises ``MessageFormatError`` when the message itself is not valid: not JSON, an
    unknown type or schema version, a field of the batch (not of a record) wrong."""
    cls = MESSAGE_TYPES.get(kind or "")
    if cls is None:
        raise MessageFormatError(f"unknown message type {kind!r}")
    try:
        return DecodedBatch(cls.model_validate_json(body))
    except ValidationError:
        pass
    try:
        envelope = from_json(body)
    except ValueError as exc:
        raise MessageFormatError(f"invalid {kind} message: not JSON ({exc})") from None
    items_field: str = cls.items_field  # type: ignore[attr-defined]
    items = envelope.get(items_field) if isinstance(envelope, dict) else None
    if not isinstance(items, list):
        raise MessageFormatError(
            f"invalid {kind} message: it is not an object with a list {items_field!r}"
        )
    try:
        batch = cls.model_validate({**envelope, items_field: []})
    except ValidationError as exc:
        raise MessageFormatError(f"invalid {kind} message: {explain(exc)}") from None
    item_cls = ITEM_TYPES[cls.kind]
    valid: list[Any] = []
    rejected: list[RejectedRecord] = []
    for index, raw in enumerate(items):
        try:
            valid.append(item_cls.model_validate(raw))
        except ValidationError as exc:
            rejected.append(RejectedRecord(index, record_ref(index, raw), explain(exc), raw))
    setattr(batch, items_field, valid)
    return DecodedBatch(batch if valid else None, rejected, envelope)


def record_ref(index: int, raw: Any) -> str:
    """Names a record of a batch as well as it can: its source reference, else its key, else
    its position (``#3``)."""
    if isinstance(raw, dict):
        system = raw.get("source_system")
        entity = raw.get("entity") or raw.get("source_entity")
        key = raw.get("key", raw.get("source_key"))
        if isinstance(key, str | int) and isinstance(system, str) and isinstance(entity, str):
            return f"{system}:{entity}:{key}"
        if isinstance(key, str | int):
            return f"#{index} (key {key!r})"
    return f"#{index}"


def explain(exc: ValidationError, limit: int = 5) -> str:
    """A pydantic validation error in one line: each field and what is wrong with it, a
    schema version named as such."""
    parts = []
    for error in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in error["loc"]) or "(the message)"
        if error["loc"] and error["loc"][-1] == "schema_version":
            known = ", ".join(str(v) for v in KNOWN_SCHEMA_VERSIONS)
            parts.append(
                f"{loc} {error.get('input')!r} is not a schema version this build knows ({known})"
            )
        else:
            parts.append(f"{loc}: {error['msg']}")
    if exc.error_count() > limit:
        parts.append(f"and {exc.error_count() - limit} more")
    return "; ".join(parts)


def encode(message: Message) -> bytes:
    return message.model_dump_json().encode()


def subset_body(batch: Message, indexes: Sequence[int]) -> bytes:
    """The body of a message carrying the records of ``batch`` at ``indexes``."""
    items = getattr(batch, batch.items_field)  # type: ignore[attr-defined]
    return encode(batch.subset([items[i] for i in indexes]))  # type: ignore[attr-defined]
