"""The writer: idempotent upserts into the target, in the target's largest batches.

Each bus message (a CommandBatch) hands its commands to a ``Batcher``. The batcher gathers
commands per target connection, entity and match fields, and flushes at the sink's batch size
or after a short wait. A flush:

1. keeps the newest command per record and defers records another flush is writing
   (in this process, and across replicas through Postgres advisory locks);
2. skips commands older than, or identical to, the last write (``record_links``): no API call;
3. resolves parent lookups through ``record_links``, then the target, else retries later;
4. upserts, and records the links and the audit rows before anyone is told the outcome.

The message is acked after every one of its commands has an outcome in the audit trail; the
failed ones are split out, one message per failure class, to retry or the dead-letter queue.
Any exception in a flush fails the records of that flush with its class
(``shared.failures.classify``), except an outage of the database or broker: the message is then
left to the bus, which holds it and runs it again once they answer (nothing is audited as
failed, no attempt is spent).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from services.runtime import ServiceContext
from shared import db, metrics
from shared.audit import COLUMNS, outcome_row
from shared.bus import RecordFailure, WorkQueue, writer_queue
from shared.connectors.base import Sink, SinkRecord, WriteOutcome
from shared.failures import (
    ConnectorError,
    FailureClass,
    ParentNotWrittenError,
    PermanentError,
    classify,
    describe,
    exception_name,
    is_infrastructure,
)
from shared.messages import CommandBatch, ParentRef, UpsertCommand, encode, subset_body, utcnow

log = logging.getLogger(__name__)
_DETAILS = COLUMNS.index("details")


@dataclass(slots=True)
class Outcome:
    status: str  # insert, update, unchanged, stale, superseded, failed
    failure: FailureClass | None = None
    error: str | None = None
    target_id: str | None = None
    # the exception that failed the whole flush: the class of an unexpected one goes into the
    # dead letter; an outage of the database or broker makes the message wait for them
    cause: BaseException | None = None

    @property
    def failed(self) -> bool:
        return self.failure is not None


@dataclass(slots=True)
class Ticket:
    """The outcomes of one bus message's commands; ``done`` resolves when all are in."""

    outcomes: list[Outcome | None]
    remaining: int
    done: asyncio.Future[list[Outcome]]
    mapped_at: datetime | None = None  # the batch's, for the audit rows
    mapped_by: str | None = None


@dataclass(slots=True)
class Pending:
    command: UpsertCommand
    ticket: Ticket
    index: int
    record: tuple[str, str, str]  # (flow, source entity, source key)
    message_id: str | None = None
    exists: bool = False  # the target record exists already (insert-only fields are dropped)
    linked: bool = False  # record_links has a row for it
    held_back: list[str] | None = None  # fields the other side owns, not sent (an update)

    @property
    def settled(self) -> bool:
        return self.ticket.outcomes[self.index] is not None


GroupKey = tuple[str, str, tuple[str, ...]]


@dataclass
class Group:
    items: list[Pending] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class Batcher:
    def __init__(
        self,
        ctx: ServiceContext,
        *,
        max_wait_s: float = 0.2,
        concurrency: int = 4,
        batch_size: int | None = None,
    ) -> None:
        self.ctx = ctx
        self.max_wait_s = max_wait_s
        self.batch_size = batch_size
        self._groups: dict[GroupKey, Group] = defaultdict(Group)
        self._slots = asyncio.Semaphore(concurrency)
        self._in_flight: set[tuple[str, str, str]] = set()
        # records with a command in this writer that has no outcome yet
        self._known: dict[tuple[str, str, str], int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.api_batches = 0

    def submit(
        self,
        commands: list[UpsertCommand],
        message_id: str | None = None,
        *,
        mapped_at: datetime | None = None,
        mapped_by: str | None = None,
    ) -> asyncio.Future[list[Outcome]]:
        """Queue one message's commands; the future gives their outcomes, in order."""
        done: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        ticket = Ticket([None] * len(commands), len(commands), done, mapped_at, mapped_by)
        if not commands:
            done.set_result([])
        known = self._known
        for index, c in enumerate(commands):
            record = (c.flow, c.source_entity, c.source_key)
            known[record] = known.get(record, 0) + 1
            self._add(Pending(c, ticket, index, record, message_id))
        return done

    def _settle(self, pending: Pending, outcome: Outcome) -> None:
        """Give ``pending`` its outcome (the first one counts) and forget its record."""
        ticket = pending.ticket
        if ticket.outcomes[pending.index] is not None:
            return
        ticket.outcomes[pending.index] = outcome
        ticket.remaining -= 1
        if ticket.remaining == 0 and not ticket.done.done():
            ticket.done.set_result(ticket.outcomes)  # type: ignore[arg-type]
        record = pending.record
        left = self._known[record] - 1
        if left > 0:
            self._known[record] = left
        else:
            del self._known[record]

    def _add(self, pending: Pending) -> None:
        c = pending.command
        key: GroupKey = (c.target_connection, c.target_entity, tuple(c.match_on))
        group = self._groups[key]
        group.items.append(pending)
        if len(group.items) >= self._size_for(c.target_connection):
            self._flush_now(key)
        elif group.timer is None:
            loop = asyncio.get_running_loop()
            group.timer = loop.call_later(self.max_wait_s, self._flush_now, key)

    def _size_for(self, connection: str) -> int:
        if self.batch_size:
            return self.batch_size
        connector = self.ctx._connectors.get(connection)
        return getattr(connector, "max_batch", 100)

    def _flush_now(self, key: GroupKey) -> None:
        group = self._groups.get(key)
        if group is None or not group.items:
            return
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None
        size = self._size_for(key[0])
        items, group.items = group.items[:size], group.items[size:]
        if group.items:
            group.timer = asyncio.get_running_loop().call_later(0, self._flush_now, key)
        task = asyncio.create_task(self._flush(key, items))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        for key in list(self._groups):
            self._flush_now(key)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- one flush ----------------------------------------------------------------------------

    async def _flush(self, key: GroupKey, items: list[Pending]) -> None:
        async with self._slots:
            try:
                await self._write(key, items)
            except Exception as exc:  # the sink or the database failed for the whole batch
                outcome = Outcome("failed", classify(exc), describe(exc), cause=exc)
                open_items = [item for item in items if not item.settled]
                try:
                    if is_infrastructure(exc):
                        # Not the records' fault, and nowhere to audit: their messages wait.
                        log.warning(
                            "write batch waits for the database or broker: %s", outcome.error
                        )
                    else:
                        log.warning("write batch failed (%s): %s", outcome.failure, outcome.error)
                        await self._audit_outcomes([(item, outcome) for item in open_items])
                except Exception as audit_exc:
                    outcome.cause = audit_exc  # if the database went away: their messages wait
                    log.warning("cannot audit the failed batch: %s", describe(audit_exc))
                finally:
                    for item in open_items:
                        self._settle(item, outcome)

    async def _write(self, key: GroupKey, items: list[Pending]) -> None:
        connection, entity, match_on = key
        # 1. newest command per record; records being written elsewhere wait for the next flush
        newest: dict[tuple[str, str, str], Pending] = {}
        superseded: list[Pending] = []
        for item in items:
            current = newest.get(item.record)
            if current is None or item.command.observed_at >= current.command.observed_at:
                if current is not None:
                    superseded.append(current)
                newest[item.record] = item
            else:
                superseded.append(item)
        deferred = [p for r, p in newest.items() if r in self._in_flight]
        mine = {r: p for r, p in newest.items() if r not in self._in_flight}
        self._in_flight.update(mine)
        try:
            async with self.ctx.pool.acquire() as conn:
                locked = await self._lock_records(conn, list(mine))
                for record in list(mine):
                    if record not in locked:
                        deferred.append(mine.pop(record))
                results = await self._write_records(
                    conn, connection, entity, match_on, mine, deferred
                )
            # the locks went with the connection back to the pool (see _lock_records)
        finally:
            self._in_flight.difference_update(mine)
        results += [(p, Outcome("superseded")) for p in superseded]
        await self._audit_outcomes(results)
        for pending, outcome in results:
            self._settle(pending, outcome)
        for pending in deferred:
            asyncio.get_running_loop().call_later(self.max_wait_s, self._add, pending)

    async def _lock_records(
        self, conn: asyncpg.Connection, records: list[tuple[str, str, str]]
    ) -> set[tuple[str, str, str]]:
        """Session advisory locks on the records no other writer replica holds. They are held
        while the connection is out of the pool: the pool releases them when it takes the
        connection back (``db.release_session_locks_on_return``), so when the flush ends,
        whatever happened in it."""
        if not records:
            return set()
        db.release_session_locks_on_return(conn)
        names = ["\x1f".join(r) for r in records]
        # Only the records another replica holds come back: usually none.
        rows = await conn.fetch(
            "SELECT n FROM unnest($1::text[]) AS n"
            " WHERE NOT pg_try_advisory_lock(hashtextextended(n, 7))",
            names,
        )
        held = {row["n"] for row in rows}
        return {r for r, n in zip(records, names, strict=True) if n not in held}

    async def _write_records(
        self,
        conn: asyncpg.Connection,
        connection: str,
        entity: str,
        match_on: tuple[str, ...],
        mine: dict[tuple[str, str, str], Pending],
        deferred: list[Pending],
    ) -> list[tuple[Pending, Outcome]]:
        results: list[tuple[Pending, Outcome]] = []
        if not mine:
            return results
        # the records' links and their parents' links, in one query
        parents = {
            (ref.flow, ref.source_entity, ref.source_key): ref
            for p in mine.values()
            for ref in p.command.parents
        }
        links = await load_links(conn, list(mine.keys() | parents.keys()))
        to_write: list[Pending] = []
        for record, pending in mine.items():
            link = links.get(record)
            command = pending.command
            if link is not None and link["target_id"]:
                if link["observed_at"] and command.observed_at < link["observed_at"]:
                    results.append((pending, Outcome("stale", target_id=link["target_id"])))
                    continue
                if link["payload_hash"] == command.payload_hash:
                    results.append((pending, Outcome("unchanged", target_id=link["target_id"])))
                    continue
            pending.linked = link is not None
            pending.exists = link is not None and bool(link["target_id"])
            to_write.append(pending)
        if not to_write:
            return results
        sink = await self.ctx.connector(connection)
        if not callable(getattr(sink, "upsert", None)):
            raise PermanentError(f"connection {connection!r} cannot be a target (it cannot write)")
        payloads, ready = await self._with_parents(
            sink, to_write, parents, links, results, deferred
        )
        if not ready:
            return results
        outcomes = await _upsert(
            sink, entity, payloads, list(match_on), [p.command.lines_field for p in ready]
        )
        self.api_batches += 1
        if len(outcomes) != len(ready):
            raise RuntimeError(f"sink returned {len(outcomes)} outcomes for {len(ready)} records")
        written: list[tuple[Pending, WriteOutcome]] = []
        for pending, result in zip(ready, outcomes, strict=True):
            if result.ok:
                written.append((pending, result))
                results.append(
                    (pending, Outcome(result.action or "update", target_id=result.target_id))
                )
            else:
                failure = result.failure or FailureClass.PERMANENT
                text = result.error or "rejected by the target"
                if result.code:
                    text = f"{result.code}: {text}"
                results.append((pending, Outcome("failed", failure, text)))
        await _save_links(conn, connection, entity, written)
        return results

    async def _with_parents(
        self,
        sink: Sink,
        pending: list[Pending],
        refs: dict[tuple[str, str, str], ParentRef],
        links: dict[tuple[str, str, str], asyncpg.Record],
        results: list[tuple[Pending, Outcome]],
        deferred: list[Pending],
    ) -> tuple[list[SinkRecord], list[Pending]]:
        """Each record as the sink takes it, its parent references with the parents' target
        ids: from the identity links, else from the target (a parent created outside this
        flow), with ONE ``find_ids`` call per (entity, match field) for all the flush's
        parents; only when the sink renders references as target ids. A parent that this
        writer is about to write makes the child wait for the next flush; one that nobody
        wrote fails the child as transient (retried later)."""
        ids = {r: links[r]["target_id"] for r in refs if r in links and links[r]["target_id"]}
        need_ids = getattr(sink, "refs_need_ids", True)
        if need_ids:
            ids.update(await self._find_parents(sink, refs, ids))
        records: list[SinkRecord] = []
        ready: list[Pending] = []
        for item in pending:
            command = item.command
            payload = dict(command.payload)
            lines = command.lines
            if item.exists:
                for name in command.insert_only:
                    payload.pop(name, None)
                if command.lines_field in command.insert_only:
                    lines = []
                if command.owned_elsewhere:
                    # field ownership: what the other side owns is never written to an
                    # existing record (the audit row lists what was held back)
                    item.held_back = [n for n in command.owned_elsewhere if n in payload]
                    for name in item.held_back:
                        payload.pop(name)
                    if command.lines_field in command.owned_elsewhere:
                        lines = []
            missing = waiting = None
            filled: list[ParentRef] = []
            for ref in command.parents:
                record = (ref.flow, ref.source_entity, ref.source_key)
                target_id = ids.get(record)
                if target_id is None and need_ids:
                    if record in self._known:
                        waiting = ref
                    else:
                        missing = ref
                    break
                filled.append(ref.model_copy(update={"target_id": target_id}))
            if waiting is not None:
                deferred.append(item)
                continue
            if missing is not None:
                error = ParentNotWrittenError(
                    f"parent {missing.source_entity} {missing.source_key!r} of"
                    f" {command.source_key!r} is not in {missing.target_entity} yet"
                )
                results.append((item, Outcome("failed", error.failure_class, str(error))))
                continue
            records.append(SinkRecord(payload, filled, list(lines), item.exists))
            ready.append(item)
        return records, ready

    async def _find_parents(
        self,
        sink: Sink,
        refs: dict[tuple[str, str, str], ParentRef],
        known: dict[tuple[str, str, str], str],
    ) -> dict[tuple[str, str, str], str]:
        """The target ids of parents not in the identity links, one batched lookup per
        (target entity, match field): ``{parent record: target id}`` for those found."""
        wanted: dict[tuple[str, str], dict[str, list[tuple[str, str, str]]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for record, ref in refs.items():
            if record in known or record in self._known or not ref.match_field:
                continue
            value = ref.match_value or ref.source_key
            wanted[(ref.target_entity, ref.match_field)][value].append(record)
        found: dict[tuple[str, str, str], str] = {}
        for (target_entity, match_field), by_value in wanted.items():
            values = list(by_value)
            ids = await _find_ids(sink, target_entity, match_field, values)
            for value, target_id in ids.items():
                for record in by_value.get(value, ()):
                    found[record] = target_id
        return found

    async def _audit_outcomes(self, results: list[tuple[Pending, Outcome]]) -> None:
        rows = []
        counts: dict[tuple[str, str], int] = defaultdict(int)
        now, actor = utcnow(), self.ctx.actor
        for pending, outcome in results:
            c = pending.command
            stage = (
                "written"
                if outcome.status in ("insert", "update")
                else "failed"
                if outcome.failed
                else "skipped"
            )
            counts[(c.flow, stage)] += 1
            row = outcome_row(
                at=now,
                actor=actor,
                stage=stage,
                status=outcome.status,
                flow=c.flow,
                direction=f"{c.source_system}->{c.target_system}",
                source_ref=c.source_ref,
                target_ref=f"{c.target_system}:{c.target_entity}:{outcome.target_id}"
                if outcome.target_id
                else None,
                event_id=c.event_id,
                command_id=c.command_id,
                message_id=pending.message_id,
                error_class=str(outcome.failure) if outcome.failure else None,
                error=outcome.error,
                transformation=c.transformation,
                source_version=c.source_version,
                flow_version=c.flow_version,
                mapped_at=pending.ticket.mapped_at,
                mapped_by=pending.ticket.mapped_by,
            )
            if pending.held_back and stage == "written":
                row = (*row[:_DETAILS], {"held_back": pending.held_back}, *row[_DETAILS + 1 :])
            rows.append(row)
        if rows:
            await self.ctx.audit.write_rows(rows)
        for (flow, stage), n in counts.items():
            metrics.RECORDS.labels(flow, stage).inc(n)


# One primary-key probe per record, whatever the statistics say (see shared.db). Only the
# columns the writer reads: decoding the other five doubled the client's cost of a lookup
# (6.6 -> 3.6 us of CPU a key, 100 keys a batch, measured on 200,000 links).
LINKS_BY_KEY_SQL = """
    SELECT l.flow, l.source_entity, l.source_key, l.target_id, l.observed_at, l.payload_hash
    FROM unnest($1::text[], $2::text[], $3::text[]) AS k(flow, entity, key)
    CROSS JOIN LATERAL (SELECT * FROM record_links
        WHERE flow = k.flow AND source_entity = k.entity AND source_key = k.key LIMIT 1) l"""


async def load_links(
    conn: asyncpg.Connection, records: list[tuple[str, str, str]]
) -> dict[tuple[str, str, str], asyncpg.Record]:
    rows = await conn.fetch(
        LINKS_BY_KEY_SQL,
        [r[0] for r in records],
        [r[1] for r in records],
        [r[2] for r in records],
    )
    return {(row["flow"], row["source_entity"], row["source_key"]): row for row in rows}


# Upserted rows travel as one jsonb document: asyncpg checks each element of an array
# parameter against three abstract base classes, which made eight arrays of 100 cost the client
# twice what encoding the same rows as JSON does (6.0 -> 2.9 us a record, measured). A flush
# writes one target connection and entity: those two travel as scalars.
UPSERT_LINKS_SQL = """
    INSERT INTO record_links (flow, source_entity, source_key, target_connection, target_entity,
        target_id, source_version, observed_at, payload_hash, last_command_id, updated_at)
    SELECT k.flow, k.entity, k.key, $2, $3, k.target_id, k.version, k.observed_at,
           k.payload_hash, k.command_id, now()
    FROM jsonb_to_recordset($1::jsonb)
         AS k(flow text, entity text, key text, target_id text, version text,
              observed_at timestamptz, payload_hash text, command_id text)
    ON CONFLICT (flow, source_entity, source_key) DO UPDATE SET
        target_connection = EXCLUDED.target_connection,
        target_entity = EXCLUDED.target_entity,
        target_id = COALESCE(EXCLUDED.target_id, record_links.target_id),
        source_version = EXCLUDED.source_version, observed_at = EXCLUDED.observed_at,
        payload_hash = EXCLUDED.payload_hash, last_command_id = EXCLUDED.last_command_id,
        updated_at = now()
    WHERE record_links.observed_at IS NULL
       OR record_links.observed_at <= EXCLUDED.observed_at"""
# the columns a first write's link is copied with (created_at and updated_at: their default)
LINK_COLUMNS = (
    "flow",
    "source_entity",
    "source_key",
    "target_connection",
    "target_entity",
    "target_id",
    "source_version",
    "observed_at",
    "payload_hash",
    "last_command_id",
)


async def _save_links(
    conn: asyncpg.Connection,
    connection: str,
    entity: str,
    written: list[tuple[Pending, WriteOutcome]],
) -> None:
    """Links of records written for the first time are copied in, the others upserted. The
    writer holds each record's lock from its links lookup until here, so no other replica
    links it in between; should a link exist after all, the upsert writes them all."""
    first = [(p.command, outcome) for p, outcome in written if not p.linked]
    again = [_link_row(p.command, outcome) for p, outcome in written if p.linked]
    if first:
        await db.copy_else(
            conn,
            "record_links",
            LINK_COLUMNS,
            [_link_record(c, o, connection, entity) for c, o in first],
            lambda: conn.execute(
                UPSERT_LINKS_SQL, [_link_row(c, o) for c, o in first], connection, entity
            ),
        )
    if again:
        await conn.execute(UPSERT_LINKS_SQL, again, connection, entity)


def _link_record(
    c: UpsertCommand, outcome: WriteOutcome, connection: str, entity: str
) -> tuple[Any, ...]:
    """A first write's link, in LINK_COLUMNS order."""
    # fmt: off
    return (c.flow, c.source_entity, c.source_key, connection, entity, outcome.target_id,
            c.source_version, c.observed_at, c.payload_hash, c.command_id)
    # fmt: on


def _link_row(c: UpsertCommand, outcome: WriteOutcome) -> dict[str, Any]:
    return {
        "flow": c.flow,
        "entity": c.source_entity,
        "key": c.source_key,
        "target_id": outcome.target_id,
        "version": c.source_version,
        "observed_at": c.observed_at,
        "payload_hash": c.payload_hash,
        "command_id": c.command_id,
    }


async def _find_ids(sink: Any, entity: str, field: str, values: list[str]) -> dict[str, str]:
    """``sink.find_ids``; a sink that only has the one-value ``find_id`` of the old protocol
    is asked value by value (ADAPTER until every connector speaks ``find_ids``)."""
    if callable(getattr(sink, "find_ids", None)):
        found: dict[str, str] = await sink.find_ids(entity, field, values)
        return {v: tid for v, tid in found.items() if tid}
    ids = await asyncio.gather(*(sink.find_id(entity, field, v) for v in values))
    return {v: tid for v, tid in zip(values, ids, strict=True) if tid}


async def _upsert(
    sink: Any,
    entity: str,
    records: list[SinkRecord],
    match_on: list[str],
    lines_fields: list[str | None],
) -> list[WriteOutcome]:
    """``sink.upsert`` with neutral records; a sink of the old protocol (no ``refs_need_ids``)
    gets them rendered the Zoho way here (ADAPTER until the Zoho connector renders them)."""
    if getattr(sink, "refs_need_ids", None) is not None:
        return list(await sink.upsert(entity, records, match_on))
    rendered = [_zoho_shaped(r, f) for r, f in zip(records, lines_fields, strict=True)]
    return list(await sink.upsert(entity, rendered, match_on))


def _zoho_shaped(record: SinkRecord, lines_field: str | None) -> dict[str, Any]:
    payload = dict(record.payload)
    for ref in record.refs:
        payload[ref.field] = {"id": ref.target_id}
    if record.lines and lines_field:
        rows = []
        for line in record.lines:
            row: dict[str, Any] = {
                "Quantity": line.quantity,
                "List_Price": line.unit_price or 0,
                **line.fields,
            }
            if line.product is not None:
                row["Product_Name"] = {"id": line.product.target_id}
            if line.description is not None:
                row["Description"] = line.description
            rows.append(row)
        payload[lines_field] = rows
    return payload


class Writer:
    def __init__(
        self,
        ctx: ServiceContext,
        *,
        targets: list[str] | None = None,
        prefetch: int = 10,
        concurrency: int = 4,
        max_wait_s: float = 0.2,
    ) -> None:
        self.ctx = ctx
        self.targets = targets or list(ctx.settings.writer_targets)
        self.prefetch = prefetch
        self.batcher = Batcher(ctx, concurrency=concurrency, max_wait_s=max_wait_s)

    async def run(self, stop: asyncio.Event) -> None:
        for target in self.targets:
            queue = writer_queue(target)
            await self.ctx.bus.consume(
                queue, lambda m, q=queue: self.on_message(m, q), prefetch=self.prefetch
            )
        await stop.wait()
        await self.batcher.drain()

    async def on_message(self, message: AbstractIncomingMessage, queue: WorkQueue) -> None:
        bus = self.ctx.bus
        batch = await self.ctx.decode_or_dead_letter(message, queue, CommandBatch)
        if batch is None:
            return
        try:
            # Make sure the sink is open so that its batch size is known before batching.
            await self.ctx.connector(batch.target_connection)
        except Exception as exc:
            if is_infrastructure(exc):
                raise  # the bus holds the message until the database answers
            # The target connection is missing or its secrets cannot be opened: every command
            # of the message fails alike, with its class.
            await self._fail_whole(message, queue, batch, exc)
            return
        outcomes = await self.batcher.submit(
            batch.commands, batch.batch_id, mapped_at=batch.mapped_at, mapped_by=batch.mapped_by
        )
        for outcome in outcomes:
            if outcome.cause is not None and is_infrastructure(outcome.cause):
                # The flush could not reach the database (or broker): not the records' fault.
                # The bus holds the message and runs this again once they answer.
                raise outcome.cause
        failures = [
            RecordFailure(
                index,
                command.source_ref,
                outcome.failure,
                outcome.error or "",
                _exception_of(outcome),
            )
            for index, (command, outcome) in enumerate(zip(batch.commands, outcomes, strict=True))
            if outcome.failure is not None
        ]
        if failures:
            await bus.route_records(
                message,
                queue,
                failures,
                lambda indexes: subset_body(batch, indexes),
                service=self.ctx.actor,
            )
        await message.ack()

    async def _fail_whole(
        self,
        message: AbstractIncomingMessage,
        queue: WorkQueue,
        batch: CommandBatch,
        exc: Exception,
    ) -> None:
        outcome = Outcome("failed", classify(exc), describe(exc), cause=exc)
        log.warning(
            "commands for %s failed (%s): %s",
            batch.target_connection,
            outcome.failure,
            outcome.error,
        )
        ticket = Ticket(
            [None] * len(batch.commands),
            len(batch.commands),
            asyncio.get_running_loop().create_future(),
            batch.mapped_at,
            batch.mapped_by,
        )
        await self.batcher._audit_outcomes(
            [
                (
                    Pending(c, ticket, i, (c.flow, c.source_entity, c.source_key), batch.batch_id),
                    outcome,
                )
                for i, c in enumerate(batch.commands)
            ]
        )
        await self.ctx.bus.route_failure(
            message,
            queue,
            outcome.failure,  # type: ignore[arg-type]
            outcome.error or "",
            body=encode(batch),
            service=self.ctx.actor,
            exception=exc,
        )
        await message.ack()


def _exception_of(outcome: Outcome) -> str | None:
    """The class of the unexpected exception behind a failed outcome, if there was one."""
    cause = outcome.cause
    if cause is None or isinstance(cause, ConnectorError):
        return None
    return exception_name(cause)


async def run(ctx: ServiceContext, stop: asyncio.Event) -> None:
    settings = ctx.settings
    await Writer(
        ctx, concurrency=settings.writer_concurrency, max_wait_s=settings.writer_max_wait_s
    ).run(stop)


__all__ = ["Batcher", "Outcome", "Writer", "run"]
