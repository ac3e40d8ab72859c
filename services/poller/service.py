"""The poller: reads what changed in each enabled flow's source and publishes ChangeEvents.

For every flow, on its own interval and under a lease (one replica polls a flow at a time):
for each entity mapping in file order, read every page changed since the cursor (widened by the
overlap window), drop records whose content hash equals the last published one, publish a page
of events per message with publisher confirms, then record the hashes and, once every page is
confirmed, advance the cursor. It also consumes ``notices`` (ids named by webhooks) and fetches
those records in full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection
from datetime import UTC, date, timedelta
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from services.runtime import ServiceContext, sleep_or_stop
from shared import db, metrics
from shared.audit import published_row
from shared.bus import NOTICES_QUEUE
from shared.connectors.base import Source, StreamSpec
from shared.failures import classify, describe
from shared.flows import EntityMapping, Flow
from shared.mapping import is_time_dependent, to_datetime
from shared.messages import ChangeBatch, ChangeEvent, NoticeBatch, content_hash, decode, utcnow

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
        except Exception:
            log.exception("poll of flow %s failed", name, extra={"flow": name})
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
        """Poll every entity of a flow once; returns the number of events published."""
        source = await self.ctx.connector(flow.source)
        assert isinstance(source, Source), f"connection {flow.source} cannot be a source"
        total = 0
        for entity in flow.entities:
            try:
                total += await self.poll_entity(flow, version, entity, source)
            except Exception as exc:
                await self._record_poll(flow.name, entity.source.entity, "error", 0, exc)
                raise
        return total

    async def poll_entity(
        self, flow: Flow, version: int, entity: EntityMapping, source: Source
    ) -> int:
        stream = entity.stream(self.page_size)
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
        since = None if full else widen(cursor, detection.overlap, detection.field_type)
        day = date.today() if is_time_dependent(entity) else None
        high_water = cursor
        published = 0
        started = utcnow()
        async for page in source.changed_since(stream, since):
            events, known = await self._changed_events(flow, version, entity, stream, page, day)
            if events:
                await self._publish(flow, stream, events, known)
                published += len(events)
            if stream.change_field:
                high_water = max_value(high_water, page, stream.change_field)
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
    ) -> tuple[list[ChangeEvent], Collection[str]]:
        """The page's records whose content changed since they were last published, reduced
        to the columns the mapping reads (a change to any other column is no change), and the
        keys that have a snapshot already."""
        latest: dict[str, tuple[str, dict[str, Any]]] = {}
        for row in page:
            record = entity.project(row)
            digest = content_hash(record if day is None else [record, day.isoformat()])
            latest[stream.key_of(record)] = (digest, record)
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
        return events, previous.keys()

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
                describe(error),
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
                source = await self.ctx.connector(connection)
                assert isinstance(source, Source)
                stream = mapping.stream()
                records = await source.fetch(stream, ids)
                day = date.today() if is_time_dependent(mapping) else None
                events, known = await self._changed_events(
                    flow, stored.version, mapping, stream, records, day
                )
                if events:
                    await self._publish(flow, stream, events, known)


def widen(cursor: str | None, overlap_s: float, field_type: str) -> str | None:
    """The cursor minus the overlap window, so late commits and equal timestamps are re-read."""
    if cursor is None:
        return None
    if field_type in ("datetime", "date"):
        moment = to_datetime(cursor) - timedelta(seconds=overlap_s)
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return cursor


def max_value(current: str | None, page: list[dict[str, Any]], field: str) -> str | None:
    # each distinct value parsed once: a page of invoices shares a few hundred dates
    values = {str(r[field]) for r in page if r.get(field) not in (None, "")}
    if current is not None:
        values.add(current)
    return max(values, default=None, key=_sortable)


def _sortable(value: str) -> Any:
    try:
        return (0, to_datetime(value).timestamp(), value)
    except ValueError:
        return (1, 0.0, value)


async def run(ctx: ServiceContext, stop: asyncio.Event) -> None:
    await Poller(ctx).run(stop)


__all__ = ["Poller", "max_value", "run", "widen"]
