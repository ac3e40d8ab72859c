"""Dead letters: list, show, replay to where they came from, discard. Over AMQP only."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from services.writer.service import load_links
from shared import bus as busmod
from shared.audit import AuditEvent, AuditWriter
from shared.bus import Bus
from shared.flow_store import FlowStore
from shared.messages import ChangeBatch, CommandBatch, MessageFormatError, NoticeBatch, decode
from shared.messages import Message as BusMessage


@dataclass
class DeadLetter:
    queue: str
    message: AbstractIncomingMessage
    decoded: BusMessage | None
    headers: dict[str, Any] = field(default_factory=dict)

    @property
    def message_id(self) -> str:
        return self.message.message_id or ""

    @property
    def flows(self) -> set[str]:
        d = self.decoded
        if isinstance(d, ChangeBatch):
            return {d.flow}
        if isinstance(d, CommandBatch):
            return {c.flow for c in d.commands}
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
        return []

    @property
    def failed_at(self) -> datetime | None:
        value = self.headers.get(busmod.H_FAILED_AT)
        try:
            return datetime.fromisoformat(str(value)) if value else None
        except ValueError:
            return None

    def summary(self) -> dict[str, Any]:
        h = self.headers
        return {
            "queue": self.queue,
            "message_id": self.message_id,
            "type": self.message.type,
            "flows": sorted(self.flows),
            "records": self.records,
            "error_class": h.get(busmod.H_ERROR_CLASS),
            "error": h.get(busmod.H_ERROR),
            "attempts": h.get(busmod.H_ATTEMPTS),
            "first_failed_at": h.get(busmod.H_FIRST_FAILED),
            "failed_at": h.get(busmod.H_FAILED_AT),
            "original_exchange": h.get(busmod.H_ORIG_EXCHANGE),
            "original_routing_key": h.get(busmod.H_ORIG_ROUTING_KEY),
            "replays": h.get(busmod.H_REPLAYS, 0),
        }


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
        if self.error_class and letter.headers.get(busmod.H_ERROR_CLASS) != self.error_class:
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
        the replay in the audit trail, then remove the dead letter."""
        headers = {
            k: v
            for k, v in letter.headers.items()
            if not k.startswith("x-mlc-")
            and not k.startswith("x-death")
            and not k.startswith("x-first-death")
            and not k.startswith("x-last-death")
        }
        headers[busmod.H_REPLAYS] = int(letter.headers.get(busmod.H_REPLAYS, 0) or 0) + 1
        exchange = str(letter.headers.get(busmod.H_ORIG_EXCHANGE) or "")
        routing_key = str(letter.headers.get(busmod.H_ORIG_ROUTING_KEY) or "")
        if not routing_key:
            raise ValueError(f"dead letter {letter.message_id} has no original routing key")
        amqp = Bus.build_message(
            letter.message.body,
            kind=letter.message.type,
            message_id=letter.message_id,
            headers=headers,
        )
        await self.bus.publish_raw(exchange, routing_key, amqp)
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

    async def discard(self, letter: DeadLetter, *, audit: AuditWriter, actor: str) -> None:
        await audit.write(
            _audit_rows(
                letter,
                stage="discarded",
                status="discarded",
                actor=actor,
                error_class=letter.headers.get(busmod.H_ERROR_CLASS),
                error=letter.headers.get(busmod.H_ERROR),
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
