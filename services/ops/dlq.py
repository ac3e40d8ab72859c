"""Dead letters: list, show, replay to where they came from, discard. Over AMQP only.

Any message in a dead-letter queue is handled, whoever put it there and whatever it holds:

- a letter ml-connector routed carries its failure in ``x-mlc-*`` headers (class, error,
  attempts, when, the original exchange and routing key);
- a letter the broker dead-lettered itself (a work queue's delivery limit, a reject, an
  expiry) carries RabbitMQ's ``x-death`` header instead: the reason, the queue, and the exchange
  and routing keys the message was published with, which is where ``replay`` sends it;
- a body that is not JSON, or not a message type this build knows, is shown as it is (its
  records cannot be named) and can still be replayed or discarded.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pydantic_core import from_json

from services.writer.service import load_links
from shared import bus as busmod
from shared.audit import AuditEvent, AuditWriter
from shared.bus import Bus
from shared.flow_store import FlowStore
from shared.messages import (
    ChangeBatch,
    CommandBatch,
    MessageFormatError,
    NoticeBatch,
    decode,
    record_ref,
)
from shared.messages import Message as BusMessage

# What RabbitMQ's x-death reasons mean, for a reader.
BROKER_REASONS = {
    "delivery_limit": "returned to the queue more often than its delivery limit allows (a"
    " consumer kept failing, or dying, on it)",
    "rejected": "rejected by a consumer (nack without requeue)",
    "expired": "expired (its time to live ran out) in the queue",
    "maxlen": "dropped by the queue's length limit",
}


class ReplayError(Exception):
    """A dead letter that cannot be replayed; the message says why, in one line."""


@dataclass(frozen=True)
class Death:
    """One entry of RabbitMQ's ``x-death`` header: why and from where the broker
    dead-lettered the message."""

    reason: str
    queue: str
    exchange: str
    routing_keys: tuple[str, ...]
    count: int
    time: datetime | None

    @classmethod
    def parse(cls, value: Any) -> Death | None:
        if not isinstance(value, dict):
            return None
        keys = value.get("routing-keys")
        return cls(
            reason=_text(value.get("reason")),
            queue=_text(value.get("queue")),
            exchange=_text(value.get("exchange")),
            routing_keys=tuple(_text(k) for k in keys) if isinstance(keys, list) else (),
            count=_int(value.get("count")) or 1,
            time=_moment(value.get("time")),
        )

    def describe(self) -> str:
        what = BROKER_REASONS.get(self.reason, f"dead-lettered ({self.reason or 'no reason'})")
        return (
            f"the broker dead-lettered it from {self.queue or '?'}: {what.format(count=self.count)}"
        )


@dataclass
class DeadLetter:
    queue: str
    message: AbstractIncomingMessage
    decoded: BusMessage | None
    headers: dict[str, Any] = field(default_factory=dict)

    @property
    def message_id(self) -> str:
        """The message id, or for a message that has none an id made from its body (what
        ``--message-id`` selects it by)."""
        if self.message.message_id:
            return self.message.message_id
        return "body-" + hashlib.sha256(self.message.body).hexdigest()[:16]

    # -- what the broker says ----------------------------------------------------------------

    @cached_property
    def deaths(self) -> list[Death]:
        """The ``x-death`` entries, latest first (as RabbitMQ keeps them)."""
        value = self.headers.get("x-death")
        if not isinstance(value, list):
            return []
        return [d for d in (Death.parse(v) for v in value) if d is not None]

    @property
    def broker_death(self) -> Death | None:
        """The broker's dead-lettering that brought the message here, if it was the broker's
        (ml-connector publishes its letters straight into the queue, which adds no entry)."""
        if not self.deaths:
            return None
        latest = self.deaths[0]
        work_queue = self.queue.removesuffix(".dlq")
        if latest.queue == work_queue or not self.headers.get(busmod.H_ERROR_CLASS):
            return latest
        return None

    def _first_death(self) -> Death | None:
        """The first time the broker dead-lettered the message: it still had the exchange and
        routing key it was published with."""
        if not self.deaths:
            return None
        queue = _text(self.headers.get("x-first-death-queue"))
        reason = _text(self.headers.get("x-first-death-reason"))
        for death in self.deaths:
            if death.queue == queue and death.reason == reason:
                return death
        return self.deaths[-1]

    # -- the failure, whoever recorded it ----------------------------------------------------

    @property
    def error_class(self) -> str | None:
        if self.broker_death is not None:
            return None
        return _text(self.headers.get(busmod.H_ERROR_CLASS)) or None

    @property
    def reason(self) -> str:
        """Who dead-lettered it and why, in a word: the failure class, or the broker's
        reason (``broker:delivery_limit``), or ``unknown``."""
        death = self.broker_death
        if death is not None:
            return f"broker:{death.reason or 'unknown'}"
        return self.error_class or "unknown"

    @property
    def error(self) -> str:
        death = self.broker_death
        own = _text(self.headers.get(busmod.H_ERROR))
        if death is not None:
            before = f" (before that: {own})" if own else ""
            return death.describe() + before
        return own or "no reason recorded (no x-mlc-error or x-death header)"

    @property
    def attempts(self) -> int | None:
        """ml-connector's count of attempts; for a letter the broker dead-lettered, the
        deliveries it counted when it still had them (None when not known)."""
        if self.broker_death is not None:
            return _int(self.headers.get(busmod.H_DELIVERY_COUNT)) or None
        return _int(self.headers.get(busmod.H_ATTEMPTS))

    @property
    def original_exchange(self) -> str | None:
        if busmod.H_ORIG_EXCHANGE in self.headers:
            return _text(self.headers[busmod.H_ORIG_EXCHANGE])
        first = self._first_death()
        if first is not None:
            exchange = self.headers.get("x-first-death-exchange")
            return _text(exchange) if exchange is not None else first.exchange
        return None

    @property
    def original_routing_key(self) -> str | None:
        if self.headers.get(busmod.H_ORIG_ROUTING_KEY):
            return _text(self.headers[busmod.H_ORIG_ROUTING_KEY])
        first = self._first_death()
        if first is not None and first.routing_keys:
            return first.routing_keys[0]
        return None

    @property
    def failed_at(self) -> datetime | None:
        death = self.broker_death
        if death is not None and death.time is not None:
            return death.time
        return _moment(self.headers.get(busmod.H_FAILED_AT))

    # -- what it carries ---------------------------------------------------------------------

    @cached_property
    def raw(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return from_json(self.message.body)
        except ValueError:
            return None

    @property
    def body_text(self) -> str:
        """The body for a reader: JSON as it is, anything else as text (bytes that are not
        UTF-8 escaped)."""
        return self.message.body.decode("utf-8", "backslashreplace")

    @property
    def flows(self) -> set[str]:
        d = self.decoded
        if isinstance(d, ChangeBatch):
            return {d.flow}
        if isinstance(d, CommandBatch):
            return {c.flow for c in d.commands}
        raw = self.raw
        if d is None and isinstance(raw, dict):
            out = {raw["flow"]} if isinstance(raw.get("flow"), str) else set()
            for item in _items(raw):
                if isinstance(item, dict) and isinstance(item.get("flow"), str):
                    out.add(item["flow"])
            return out
        return set()

    @property
    def records(self) -> list[str]:
        d = self.decoded
        if isinstance(d, ChangeBatch):
            return [f"{e.source_system}:{e.entity}:{e.key}" for e in d.events]
        if isinstance(d, CommandBatch):
            return [c.source_ref for c in d.commands]
        if isinstance(d, NoticeBatch):
            return [f"{n.system}:{n.entity}:{i}" for n in d.notices for i in n.ids]
        if d is None and isinstance(self.raw, dict):
            # not a valid message (the records a build refused): name them as well as it can
            return [record_ref(i, item) for i, item in enumerate(_items(self.raw))]
        return []

    def summary(self) -> dict[str, Any]:
        h = self.headers
        return {
            "queue": self.queue,
            "message_id": self.message_id,
            "type": self.message.type,
            "decoded": self.decoded is not None,
            "flows": sorted(self.flows),
            "records": self.records,
            "dead_lettered_by": "broker" if self.broker_death is not None else "ml-connector",
            "reason": self.reason,
            "error_class": self.error_class,
            "error": self.error,
            "exception": _text(h.get(busmod.H_EXCEPTION)) or None,
            "record_errors": [_text(e) for e in h.get(busmod.H_RECORD_ERRORS) or []],
            "attempts": self.attempts,
            "first_failed_at": _text(h.get(busmod.H_FIRST_FAILED)) or None,
            "failed_at": self.failed_at.isoformat() if self.failed_at else None,
            "original_exchange": self.original_exchange,
            "original_routing_key": self.original_routing_key,
            "replays": _int(h.get(busmod.H_REPLAYS)) or 0,
        }


def _items(raw: dict[str, Any]) -> list[Any]:
    for name in ("events", "commands", "notices"):
        value = raw.get(name)
        if isinstance(value, list):
            return value
    return []


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _moment(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(_text(value))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass
class Filters:
    queue: str | None = None
    flow: str | None = None
    error_class: str | None = None
    message_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def match(self, letter: DeadLetter) -> bool:
        if self.flow and self.flow not in letter.flows:
            return False
        if self.error_class == "broker":
            if letter.broker_death is None:
                return False
        elif self.error_class and letter.error_class != self.error_class:
            return False
        if self.message_id and letter.message_id != self.message_id:
            return False
        failed_at = letter.failed_at
        if self.since and (failed_at is None or failed_at < self.since):
            return False
        return not (self.until and (failed_at is None or failed_at > self.until))


class DeadLetterBrowser:
    """Reads dead letters without removing them: messages taken are unacked, and go back to
    their queue when the browser closes, except those acked by replay or discard."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._channel: AbstractChannel | None = None

    async def __aenter__(self) -> DeadLetterBrowser:
        assert self.bus.connection is not None
        self._channel = await self.bus.connection.channel()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()

    def dlq_names(self, pattern: str | None) -> list[str]:
        names = [self.bus.topology.dlq(wq) for wq in self.bus.topology.work_queues]
        if pattern:
            names = [n for n in names if fnmatch.fnmatch(n, pattern) or pattern in n]
        return names

    async def read(self, filters: Filters, limit: int = 1000) -> list[DeadLetter]:
        assert self._channel is not None
        letters: list[DeadLetter] = []
        for name in self.dlq_names(filters.queue):
            try:
                queue = await self._channel.get_queue(name, ensure=True)
            except aio_pika.exceptions.ChannelClosed:
                assert self.bus.connection is not None
                self._channel = await self.bus.connection.channel()
                continue
            while len(letters) < limit:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                try:
                    decoded: BusMessage | None = decode(message.type, message.body)
                except MessageFormatError:
                    decoded = None
                letter = DeadLetter(name, message, decoded, dict(message.headers or {}))
                if filters.match(letter):
                    letters.append(letter)
        return letters

    async def replay(
        self,
        letter: DeadLetter,
        *,
        audit: AuditWriter,
        actor: str,
    ) -> None:
        """Publish to the original exchange and routing key with a fresh attempt count, record
        the replay in the audit trail, then remove the dead letter. Raises ``ReplayError``
        (one line) when the letter names no destination or its destination is gone."""
        headers = {
            k: v
            for k, v in letter.headers.items()
            if not k.startswith("x-mlc-")
            and not k.startswith("x-death")
            and not k.startswith("x-first-death")
            and not k.startswith("x-last-death")
            and k != busmod.H_DELIVERY_COUNT
        }
        headers[busmod.H_REPLAYS] = (_int(letter.headers.get(busmod.H_REPLAYS)) or 0) + 1
        exchange = letter.original_exchange or ""
        routing_key = letter.original_routing_key or ""
        if not routing_key:
            raise ReplayError(
                f"dead letter {letter.message_id} names no original routing key (no"
                " x-mlc-original-routing-key or x-death header): see it with `dlq show`, then"
                " publish it yourself or discard it"
            )
        await self._check_exchange(letter, exchange)
        amqp = Bus.build_message(
            letter.message.body,
            kind=letter.message.type,
            message_id=letter.message.message_id,
            headers=headers,
        )
        try:
            await self.bus.publish_raw(exchange, routing_key, amqp)
        except busmod.UnroutableError:
            raise ReplayError(
                f"dead letter {letter.message_id}: no queue is bound to"
                f" {exchange or '(default exchange)'} for {routing_key!r} any more; start the"
                " service that consumes it (MLC_WRITER_TARGETS), then replay"
            ) from None
        await audit.write(
            _audit_rows(
                letter,
                stage="replayed",
                status="republished",
                actor=actor,
                details={"queue": letter.queue, "exchange": exchange, "routing_key": routing_key},
            )
        )
        await letter.message.ack()

    async def _check_exchange(self, letter: DeadLetter, exchange: str) -> None:
        """An exchange outside this topology (a letter of another prefix, an old name) is
        checked first on a channel of its own: publishing to a missing one would close the
        channel every other replay uses."""
        topology = self.bus.topology
        if exchange == "" or exchange in {topology.exchange(e) for e in busmod.EXCHANGES}:
            return
        channel = await self.bus.plain_channel()
        try:
            await channel.get_exchange(exchange, ensure=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            raise ReplayError(
                f"dead letter {letter.message_id}: its original exchange {exchange!r} does"
                " not exist"
            ) from None
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def discard(self, letter: DeadLetter, *, audit: AuditWriter, actor: str) -> None:
        await audit.write(
            _audit_rows(
                letter,
                stage="discarded",
                status="discarded",
                actor=actor,
                error_class=letter.error_class or letter.reason,
                error=letter.error,
            )
        )
        await letter.message.ack()


def _audit_rows(letter: DeadLetter, **fields: Any) -> list[AuditEvent]:
    """One audit row per record of a dead letter (what an operator did to it)."""
    return [
        AuditEvent(
            flow=next(iter(letter.flows), None),
            source_ref=record,
            message_id=letter.message_id,
            **fields,
        )
        for record in letter.records or [""]
    ]


async def disabled_flows(flows: FlowStore, letter: DeadLetter) -> list[str]:
    out = []
    for name in letter.flows:
        try:
            stored = await flows.get(name)
        except LookupError:
            out.append(f"{name} (no longer exists)")
            continue
        if not stored.enabled:
            out.append(name)
    return out


async def superseded(pool: asyncpg.Pool, letter: DeadLetter) -> list[str]:
    """The letter's records that were written since at a newer version (a later reading of
    the source landed): replaying them changes nothing, and a change that failed its mapping
    would fail again with the old data it carries."""
    d = letter.decoded
    if isinstance(d, ChangeBatch):
        seen = {(e.flow, e.entity, e.key): (e.observed_at, e.source_system) for e in d.events}
    elif isinstance(d, CommandBatch):
        seen = {
            (c.flow, c.source_entity, c.source_key): (c.observed_at, c.source_system)
            for c in d.commands
        }
    else:
        return []
    async with pool.acquire() as conn:
        links = await load_links(conn, list(seen))
    out = []
    for key, link in links.items():
        observed_at, system = seen[key]
        if link["target_id"] and link["observed_at"] and link["observed_at"] > observed_at:
            out.append(f"{system}:{key[1]}:{key[2]}")
    return sorted(out)


Printer = Callable[[str], None]
