"""The poller: reads what changed in each enabled flow's source and publishes ChangeEvents.

For every flow, on its own interval and under a lease (one replica polls a flow at a time):
for each entity mapping in file order, read every page changed since the cursor (widened by the
overlap window), drop records whose content hash equals the last published one, publish a page
of events per message with publisher confirms, then record the hashes and, once every page is
confirmed, advance the cursor. It also consumes ``notices`` (ids named by webhooks) and fetches
those records in full.

What one record or one entity does wrong stays with it:

- an entity whose read fails is recorded as failed on its cursor row and logged; the flow's
  other entities are polled all the same (a child whose parent is not written yet waits in the
  writer's retries);
- a record whose key cannot name it (a NUL character, a lone surrogate, an empty key: see
  ``shared.keys``) is dead-lettered with the reason, into the dead-letter queue of the changes'
  consumers, and audited; the page's other records are published. This process dead-letters a
  record once per version, not on every poll that reads it again;
- a NUL character or a lone surrogate in any other column is cleaned, not failed: PostgreSQL's
  jsonb and text cannot carry them, JSON cannot carry a lone surrogate, and the value without
  them is what people see in the source (a NUL is most often a C string's terminator stored
  with the value): failing the record would hold back a customer for an invisible character.
  NULs are removed, lone surrogates become U+FFFD, with a warning naming the record and the
  columns (``mlc_source_values_cleaned_total``). The content hash is taken after cleaning, so a
  later fix in the source changes nothing downstream;
- the cursor never moves past the time of the read plus ``FUTURE_TOLERANCE``: a record dated in
  the far future (9999-12-31) is published like any other and reported (a warning naming flow,
  entity, key and value, and ``mlc_future_change_values_total``), and the high-water mark is
  capped, so that records changed after this read are read by the next one. A cursor left in
  the future by an older version is capped by the next poll the same way.

Identity keys are built by ``shared.keys`` (the stream's ``key_of``), upper-cased for a source
whose keys are case-insensitive (``case_sensitive_keys`` of the source connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import Collection
from datetime import UTC, date, datetime, timedelta
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from pydantic_core import PydanticSerializationError, to_json

from services.runtime import ServiceContext, sleep_or_stop
from shared import db, metrics
from shared.audit import AuditEvent, published_row
from shared.bus import MAPPER_QUEUE, NOTICES_QUEUE
from shared.connectors.base import Source, StreamSpec
from shared.connectors.registry import require_source
from shared.failures import FailureClass, classify, describe
from shared.flows import EntityMapping, Flow
from shared.keys import key_problem, load_case_sensitive_keys
from shared.logs import redact
from shared.mapping import is_time_dependent, to_datetime
from shared.messages import ChangeBatch, ChangeEvent, NoticeBatch, content_hash, decode, utcnow
from shared.text import clean_text, clean_value

log = logging.getLogger(__name__)

# One primary-key probe per record, whatever the statistics say (see shared.db).
SNAPSHOTS_BY_KEY_SQL = """
    SELECT s.key, s.hash FROM unnest($3::text[]) AS k(key)
    CROSS JOIN LATERAL (SELECT key, hash FROM source_snapshots
        WHERE flow = $1 AND entity = $2 AND key = k.key LIMIT 1) s"""

UPSERT_SNAPSHOTS_SQL = """
    INSERT INTO source_snapshots (flow, entity, key, hash, seen_at)
    SELECT $1, $2, k, h, now() FROM unnest($3::text[], $4::text[]) AS t(k, h)
    ON CONFLICT (flow, entity, key) DO UPDATE SET hash = EXCLUDED.hash,
        seen_at = EXCLUDED.seen_at"""

LEASE_S = 30  # renewed every LEASE_S / 3 while a poll runs; a dead poller's lease lapses
PUBLISH_BATCH = 500  # events per bus message
# How far past the time of the read the cursor may move: the source's clock may run a little
# ahead of ours. No more than a usual overlap window, which then re-reads what it skipped.
FUTURE_TOLERANCE = timedelta(minutes=5)
TIME_TYPES = ("datetime", "date")


@dataclasses.dataclass(slots=True)
class Rejected:
    """A record read from the source that cannot be published, and why."""

    key: str
    record: dict[str, Any]
    reason: str


class Poller:
    def __init__(
        self,
        ctx: ServiceContext,
        *,
        tick_s: float = 1.0,
        publish_batch: int = PUBLISH_BATCH,
        page_size: int | None = None,
    ) -> None:
        self.ctx = ctx
        self.tick_s = tick_s
        self.publish_batch = publish_batch
        self.page_size = page_size
        self._running: dict[str, asyncio.Task[None]] = {}
        # records dead-lettered by this process: (flow, entity, key) -> the version
        self._dead_lettered: dict[tuple[str, str, str], str] = {}

    # -- scheduling ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self.ctx.bus.consume(NOTICES_QUEUE, self.on_notice, prefetch=20)
        try:
            while not stop.is_set():
                try:
                    await self.start_due_flows()
                except Exception:
                    log.exception("poller scheduling failed")
                await sleep_or_stop(stop, self.tick_s)
        finally:
            for task in self._running.values():
                task.cancel()
            for task in list(self._running.values()):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def start_due_flows(self) -> None:
        for name in await self.ctx.flows.enabled_names():
            if name in self._running:
                continue
            if await self.take_lease(name):
                self._running[name] = asyncio.create_task(self._poll_and_release(name))

    async def take_lease(self, flow: str) -> bool:
        row = await self.ctx.pool.fetchrow(
            """UPDATE flow_leases SET owner = $2, lease_until = now() + make_interval(secs => $3)
               WHERE flow = $1 AND next_poll_at <= now() AND (lease_until < now() OR owner = $2)
               RETURNING flow""",
            flow,
            self.ctx.actor,
            float(LEASE_S),
        )
        return row is not None

    async def renew_lease(self, flow: str) -> None:
        await self.ctx.pool.execute(
            """UPDATE flow_leases SET lease_until = now() + make_interval(secs => $3)
               WHERE flow = $1 AND owner = $2""",
            flow,
            self.ctx.actor,
            float(LEASE_S),
        )

    async def _heartbeat(self, flow: str) -> None:
        while True:
            await asyncio.sleep(LEASE_S / 3)
            with contextlib.suppress(Exception):
                await self.renew_lease(flow)

    async def _poll_and_release(self, name: str) -> None:
        interval = 60.0
        heartbeat = asyncio.create_task(self._heartbeat(name))
        try:
            stored = await self.ctx.flows.get(name)
            interval = stored.flow.poll_interval
            if stored.enabled:
                await self.poll_flow(stored.flow, stored.version)
        except Exception as exc:
            log.error(
                "poll of flow %s failed (%s): %s",
                name,
                classify(exc),
                _line(exc),
                extra={"flow": name},
            )
            log.debug("poll of flow %s failed", name, exc_info=True)
        finally:
            heartbeat.cancel()
            self._running.pop(name, None)
            with contextlib.suppress(Exception):
                await self.ctx.pool.execute(
                    """UPDATE flow_leases SET lease_until = now(),
                           next_poll_at = now() + make_interval(secs => $3)
                       WHERE flow = $1 AND owner = $2""",
                    name,
                    self.ctx.actor,
                    float(interval),
                )

    # -- one poll -----------------------------------------------------------------------------

    async def poll_flow(self, flow: Flow, version: int) -> int:
        """Poll every entity of a flow once; returns the number of events published. An
        entity that fails is recorded and logged, and the next entity is polled all the same."""
        source: Source = require_source(await self.ctx.connector(flow.source))
        case_sensitive = await load_case_sensitive_keys(self.ctx.pool, flow.source)
        total = 0
        for entity in flow.entities:
            try:
                total += await self.poll_entity(flow, version, entity, source, case_sensitive)
            except Exception as exc:
                log.error(
                    "poll of flow %s, entity %s failed (%s): %s; its other entities are polled",
                    flow.name,
                    entity.source.entity,
                    classify(exc),
                    _line(exc),
                    extra={"flow": flow.name, "entity": entity.source.entity},
                )
                log.debug("poll of %s %s failed", flow.name, entity.name, exc_info=True)
                with contextlib.suppress(Exception):
                    await self._record_poll(flow.name, entity.source.entity, "error", 0, exc)
        return total

    def _stream(
        self, entity: EntityMapping, case_sensitive: bool, page_size: int | None = None
    ) -> StreamSpec:
        return dataclasses.replace(entity.stream(page_size), case_sensitive_keys=case_sensitive)

    async def poll_entity(
        self,
        flow: Flow,
        version: int,
        entity: EntityMapping,
        source: Source,
        case_sensitive_keys: bool = True,
    ) -> int:
        stream = self._stream(entity, case_sensitive_keys, self.page_size)
        detection = entity.source.change_detection
        row = await self.ctx.pool.fetchrow(
            "SELECT value, last_full_at FROM cursors WHERE flow = $1 AND entity = $2",
            flow.name,
            stream.entity,
        )
        cursor = row["value"] if row else None
        last_full = row["last_full_at"] if row else None
        full = stream.change_field is None or cursor is None
        if detection.full_every and not full:
            age = (utcnow() - last_full).total_seconds() if last_full else None
            full = age is None or age >= detection.full_every
        since = None
        if not full:
            try:
                since = widen(cursor, detection.overlap, detection.field_type)
            except ValueError:
                log.warning(
                    "flow %s, %s: the cursor %r is no %s; reading everything",
                    flow.name,
                    stream.entity,
                    cursor,
                    detection.field_type,
                    extra={"flow": flow.name, "entity": stream.entity},
                )
                full = True
        day = date.today() if is_time_dependent(entity) else None
        high_water = cursor
        published = 0
        started = utcnow()
        until = (
            started + FUTURE_TOLERANCE
            if stream.change_field and detection.field_type in TIME_TYPES
            else None
        )
        async for page in source.changed_since(stream, since):
            events, known, rejected = await self._changed_events(
                flow, version, entity, stream, page, day
            )
            if events:
                await self._publish(flow, stream, events, known)
                published += len(events)
            if rejected:
                await self._dead_letter(flow, version, stream, rejected)
            if stream.change_field:
                high_water = max_value(high_water, page, stream.change_field, until=until)
                if until is not None and events:
                    self._report_future(flow, stream, events, until)
            await self.renew_lease(flow.name)
        value = high_water if stream.change_field else started.isoformat()
        await self._record_poll(flow.name, stream.entity, "ok", published, None, value)
        if full:
            await self.ctx.pool.execute(
                "UPDATE cursors SET last_full_at = $3 WHERE flow = $1 AND entity = $2",
                flow.name,
                stream.entity,
                started,
            )
        log.info(
            "polled %s %s: %d changed",
            flow.name,
            stream.entity,
            published,
            extra={"flow": flow.name, "entity": stream.entity, "count": published},
        )
        return published

    async def _changed_events(
        self,
        flow: Flow,
        version: int,
        entity: EntityMapping,
        stream: StreamSpec,
        page: list[dict[str, Any]],
        day: date | None,
    ) -> tuple[list[ChangeEvent], Collection[str], list[Rejected]]:
        """The page's records whose content changed since they were last published, reduced
        to the columns the mapping reads (a change to any other column is no change), the keys
        that have a snapshot already, and the records that cannot be published (their key
        cannot name them). Text no database or JSON can carry is cleaned out of the others."""
        latest: dict[str, tuple[str, dict[str, Any]]] = {}
        rejected: list[Rejected] = []
        arity = len(stream.key_fields)
        for row in page:
            record = entity.project(row)
            key = stream.key_of(record)
            problem = key_problem(key, arity)
            if problem is not None:
                reason = (
                    f"flow {flow.name!r}: {stream.entity} record with key {key!r}: the key"
                    f" {problem}; fix the record in the source, then discard this letter"
                )
                rejected.append(Rejected(key, record, reason))
                continue
            digest = _digest(record if day is None else [record, day.isoformat()])
            if digest is None:  # a NUL or a lone surrogate: cleaned, then hashed
                record = self._cleaned(flow, stream, key, record)
                digest = content_hash(record if day is None else [record, day.isoformat()])
            latest[key] = (digest, record)
        previous: dict[str, str] = {}
        if latest:
            rows = await self.ctx.pool.fetch(
                SNAPSHOTS_BY_KEY_SQL, flow.name, stream.entity, list(latest)
            )
            previous = {row["key"]: row["hash"] for row in rows}
        source_system = await self.ctx.system_of(flow.source)
        now = utcnow()
        events = [
            ChangeEvent.build(
                flow=flow.name,
                flow_version=version,
                source_connection=flow.source,
                source_system=source_system,
                entity=stream.entity,
                key=key,
                version=digest,
                observed_at=now,
                record=record,
            )
            for key, (digest, record) in latest.items()
            if previous.get(key) != digest
        ]
        return events, previous.keys(), rejected

    def _cleaned(
        self, flow: Flow, stream: StreamSpec, key: str, record: dict[str, Any]
    ) -> dict[str, Any]:
        """``record`` without NUL characters, and with U+FFFD for lone surrogates."""
        cleaned: dict[str, Any] = clean_value(record, nul="")
        columns = [name for name in record if cleaned.get(name) != record[name]]
        if columns:
            metrics.SOURCE_VALUES_CLEANED.labels(flow.name, stream.entity).inc()
            log.warning(
                "flow %s, %s %s: NUL characters removed and invalid Unicode replaced in %s"
                " (no database or JSON carries them)",
                flow.name,
                stream.entity,
                key,
                ", ".join(columns),
                extra={"flow": flow.name, "entity": stream.entity, "record": key},
            )
        return cleaned

    async def _dead_letter(
        self, flow: Flow, version: int, stream: StreamSpec, rejected: list[Rejected]
    ) -> None:
        """Dead-letter the records that cannot be published (one letter for them all, into
        the dead-letter queue of the changes' consumers, each with its reason in the audit
        trail); a record this process dead-lettered at the same version is left alone."""
        source_system = await self.ctx.system_of(flow.source)
        now = utcnow()
        events: list[ChangeEvent] = []
        reasons: list[str] = []
        versions: dict[tuple[str, str, str], str] = {}
        for item in rejected:
            # JSON carries a NUL (escaped), never a lone surrogate
            record = clean_value(item.record, nul=None)
            digest = content_hash(record)
            seen = (flow.name, stream.entity, item.key)
            if self._dead_lettered.get(seen) == digest or versions.get(seen) == digest:
                continue
            versions[seen] = digest
            events.append(
                ChangeEvent.build(
                    flow=flow.name,
                    flow_version=version,
                    source_connection=flow.source,
                    source_system=source_system,
                    entity=stream.entity,
                    key=clean_text(item.key, nul=None),
                    version=digest,
                    observed_at=now,
                    record=record,
                )
            )
            reasons.append(item.reason)
        if not events:
            return
        batch = ChangeBatch(flow=flow.name, entity=stream.entity, events=events)
        reason = reasons[0]
        if len(events) > 1:
            reason = f"{len(events)} records cannot be published; {'; '.join(reasons[:3])}"
        await self.ctx.bus.dead_letter(
            MAPPER_QUEUE,
            f"{source_system}.{stream.entity}",
            batch,
            FailureClass.PERMANENT,
            reason,
            service=self.ctx.actor,
        )
        direction = f"{source_system}->{await self.ctx.system_of(flow.target)}"
        await self.ctx.audit.write(
            AuditEvent(
                stage="polled",
                status="dead_lettered",
                actor=self.ctx.actor,
                flow=flow.name,
                direction=direction,
                source_ref=f"{source_system}:{stream.entity}:{event.key}",
                event_id=event.event_id,
                message_id=batch.batch_id,
                error_class=str(FailureClass.PERMANENT),
                error=why,
                source_version=event.version,
                flow_version=version,
                at=now,
            )
            for event, why in zip(events, reasons, strict=True)
        )
        self._dead_lettered.update(versions)
        metrics.RECORDS.labels(flow.name, "failed").inc(len(events))

    def _report_future(
        self, flow: Flow, stream: StreamSpec, events: list[ChangeEvent], until: datetime
    ) -> None:
        """Warn of each published record whose change field lies past ``until``: it is
        synced, and the cursor does not follow it."""
        field = stream.change_field
        assert field is not None
        future: set[str] = set()
        for value in {
            str(e.record[field]) for e in events if e.record.get(field) not in ("", None)
        }:
            with contextlib.suppress(ValueError):
                if to_datetime(value) > until:
                    future.add(value)
        if not future:
            return
        for event in events:
            value = event.record.get(field)
            if value in ("", None) or str(value) not in future:
                continue
            metrics.FUTURE_CHANGES.labels(flow.name, stream.entity).inc()
            log.warning(
                "flow %s, %s %s: %s is %s, later than the time of the read; the record is"
                " published, the cursor stops at %s",
                flow.name,
                stream.entity,
                event.key,
                field,
                value,
                _format(until),
                extra={"flow": flow.name, "entity": stream.entity, "record": event.key},
            )

    async def _publish(
        self, flow: Flow, stream: StreamSpec, events: list[ChangeEvent], known: Collection[str]
    ) -> None:
        source_system = events[0].source_system
        routing_key = f"{source_system}.{stream.entity}"
        batches = [
            ChangeBatch(
                flow=flow.name, entity=stream.entity, events=events[i : i + self.publish_batch]
            )
            for i in range(0, len(events), self.publish_batch)
        ]
        await self.ctx.bus.publish_many(("changes", routing_key, batch) for batch in batches)
        # Every event is confirmed by the broker. Its audit row is committed before the snapshot
        # says it was published: a poller killed in between publishes the record again on its
        # next poll (the copy is dropped downstream), and never leaves a record in the target
        # whose reading is missing from the audit trail.
        now, actor = utcnow(), self.ctx.actor
        # systems, as the writer's rows say it (the target connection's name is no system)
        direction = f"{source_system}->{await self.ctx.system_of(flow.target)}"
        ref_prefix = f"{source_system}:{stream.entity}:"
        await self.ctx.audit.write_rows(
            published_row(
                at=now,
                actor=actor,
                flow=flow.name,
                direction=direction,
                source_ref=ref_prefix + e.key,
                event_id=e.event_id,
                message_id=batch.batch_id,
                source_version=e.version,
                flow_version=e.flow_version,
            )
            for batch in batches
            for e in batch.events
        )
        # Snapshots of records seen for the first time are copied in, the others upserted (a
        # webhook's fetch may have saved one in between: then the upsert writes them all).
        first = [e for e in events if e.key not in known]
        again = [e for e in events if e.key in known]
        async with self.ctx.pool.acquire() as conn:
            if first:
                await db.copy_else(
                    conn,
                    "source_snapshots",
                    ("flow", "entity", "key", "hash"),
                    [(flow.name, stream.entity, e.key, e.version) for e in first],
                    lambda: conn.execute(
                        UPSERT_SNAPSHOTS_SQL,
                        flow.name,
                        stream.entity,
                        [e.key for e in first],
                        [e.version for e in first],
                    ),
                )
            if again:
                await conn.execute(
                    UPSERT_SNAPSHOTS_SQL,
                    flow.name,
                    stream.entity,
                    [e.key for e in again],
                    [e.version for e in again],
                )
        metrics.RECORDS.labels(flow.name, "polled").inc(len(events))

    async def _record_poll(
        self,
        flow: str,
        entity: str,
        status: str,
        count: int,
        error: BaseException | None,
        value: str | None = None,
    ) -> None:
        if error is None:
            await self.ctx.pool.execute(
                """INSERT INTO cursors (flow, entity, value, updated_at, last_poll_at,
                       last_status, last_error, last_count)
                   VALUES ($1, $2, $3, now(), now(), $4, NULL, $5)
                   ON CONFLICT (flow, entity) DO UPDATE SET value = $3, updated_at = now(),
                       last_poll_at = now(), last_status = $4, last_error = NULL,
                       last_count = $5""",
                flow,
                entity,
                value,
                status,
                count,
            )
        else:
            await self.ctx.pool.execute(
                """INSERT INTO cursors (flow, entity, last_poll_at, last_status, last_error)
                   VALUES ($1, $2, now(), $3, $4)
                   ON CONFLICT (flow, entity) DO UPDATE SET last_poll_at = now(),
                       last_status = $3, last_error = $4""",
                flow,
                entity,
                f"error:{classify(error)}",
                clean_text(redact(describe(error))),
            )

    # -- webhook notices ----------------------------------------------------------------------

    async def on_notice(self, message: AbstractIncomingMessage) -> None:
        """Fetch the records a webhook named and publish them like polled changes."""
        try:
            batch = decode(message.type, message.body)
            assert isinstance(batch, NoticeBatch)
            for notice in batch.notices:
                await self._fetch_noticed(notice.connection, notice.entity, notice.ids)
        except Exception as exc:
            await self.ctx.bus.route_failure(
                message, NOTICES_QUEUE, classify(exc), describe(exc), service=self.ctx.actor
            )
        await message.ack()

    async def _fetch_noticed(self, connection: str, entity: str, ids: list[str]) -> None:
        for name in await self.ctx.flows.enabled_names():
            stored = await self.ctx.flows.get(name)
            flow = stored.flow
            if flow.source != connection:
                continue
            for mapping in flow.entities:
                if mapping.source.entity != entity:
                    continue
                source: Source = require_source(await self.ctx.connector(connection))
                case_sensitive = await load_case_sensitive_keys(self.ctx.pool, connection)
                stream = self._stream(mapping, case_sensitive)
                records = await source.fetch(stream, ids)
                day = date.today() if is_time_dependent(mapping) else None
                events, known, rejected = await self._changed_events(
                    flow, stored.version, mapping, stream, records, day
                )
                if events:
                    await self._publish(flow, stream, events, known)
                if rejected:
                    await self._dead_letter(flow, stored.version, stream, rejected)


def widen(cursor: str | None, overlap_s: float, field_type: str) -> str | None:
    """The cursor minus the overlap window, so late commits and equal timestamps are re-read.
    ValueError: a time-typed cursor that is no time."""
    if cursor is None:
        return None
    if field_type in TIME_TYPES:
        moment = to_datetime(cursor)
        try:
            moment = moment.astimezone(UTC) - timedelta(seconds=overlap_s)
        except OverflowError:  # widened past year 1
            moment = datetime.min.replace(tzinfo=UTC)
        return _format(moment)
    return cursor


def max_value(
    current: str | None,
    page: list[dict[str, Any]],
    field: str,
    *,
    until: datetime | None = None,
) -> str | None:
    """The high-water mark of ``page`` and the ``current`` cursor. ``until`` (a time-typed
    field): the mark is a time no later than ``until``; a later value gives ``until`` itself,
    and a value that is no time is not taken."""
    # each distinct value parsed once: a page of invoices shares a few hundred dates
    values = {str(r[field]) for r in page if r.get(field) not in (None, "")}
    if current is not None:
        values.add(current)
    if until is None:
        return max(values, default=None, key=_sortable)
    best: tuple[datetime, str] | None = None
    for value in values:
        try:
            moment = to_datetime(value)
        except ValueError:
            continue
        if moment > until:
            moment, value = until, _format(until)
        if best is None or moment > best[0]:
            best = (moment, value)
    return None if best is None else best[1]


def _format(moment: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` in UTC, the year in four digits (strftime drops the zeros)."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def _digest(value: Any) -> str | None:
    """``content_hash(value)``, or None when ``value`` holds text that PostgreSQL (a NUL
    character) or JSON (a lone surrogate) cannot carry. The one serialization both checks and
    hashes (a NUL is the six characters of its JSON escape; a value that merely spells them
    costs a needless clean, no more)."""
    try:
        data = to_json(value, fallback=str)
    except PydanticSerializationError:
        return None
    if b"\\u0000" in data:
        return None
    return hashlib.sha256(data).hexdigest()[:32]


def _line(exc: BaseException) -> str:
    return clean_text(redact(describe(exc)))[:500]


def _sortable(value: str) -> Any:
    try:
        return (0, to_datetime(value).timestamp(), value)
    except ValueError:
        return (1, 0.0, value)


async def run(ctx: ServiceContext, stop: asyncio.Event) -> None:
    await Poller(ctx).run(stop)


__all__ = ["FUTURE_TOLERANCE", "Poller", "max_value", "run", "widen"]
