"""The audit trail: append-only rows, written in batches with COPY, never one round trip a row.

``add`` buffers without waiting (lineage of polled records, failures); ``write`` buffers and
waits until the rows are committed (the writer acks a message only after that). A background
task flushes every ``interval_s`` or at ``max_batch`` rows; ``close`` flushes what is left.

What comes from outside (record keys, vendors' error texts) is made storable before it reaches
the database, and no secret is stored in clear: every text value of a row (and every string in
``details``) has NUL characters and lone surrogates replaced by U+FFFD and the registered
secrets masked (``shared.logs.redact``). Should PostgreSQL still refuse a batch for what a row
holds (a data or constraint error, a value of the wrong type), the batch is written again in
halves down to single rows, so that every other row is written and the row at fault, alone,
is logged and dropped (``mlc_audit_rows_dropped_total``): one bad row never holds back the
others. When the database is unreachable, nothing is dropped: the rows stay buffered for the
next flush, and whoever waits on them learns of the failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from shared import metrics
from shared.logs import redact
from shared.messages import utcnow
from shared.text import clean_text, clean_value, is_storable

log = logging.getLogger(__name__)

COLUMNS = (
    "at",
    "flow",
    "direction",
    "stage",
    "status",
    "source_ref",
    "target_ref",
    "event_id",
    "command_id",
    "message_id",
    "error_class",
    "error",
    "transformation",
    "actor",
    "details",
    "source_version",
    "flow_version",
    "mapped_at",
    "mapped_by",
)


Row = tuple[Any, ...]  # the values of COLUMNS, in order
_DETAILS = COLUMNS.index("details")
_TEXTS = [
    operator.itemgetter(i)
    for i, name in enumerate(COLUMNS)
    if name not in ("at", "details", "flow_version", "mapped_at")
]
_SEPARATOR = "\x1f"  # between the texts of a batch, checked joined (a secret never holds it)


def sanitised(rows: list[Row]) -> list[Row]:
    """``rows`` as PostgreSQL can store them, with no registered secret in clear: every text
    value cleaned (NUL and lone surrogates become U+FFFD) and redacted, and every string in
    ``details``. The texts of the whole batch are checked joined, once: a clean batch (the
    usual case) is returned as it is (1.5 us a row with five secrets registered)."""
    try:
        joined = _SEPARATOR.join(
            filter(None, itertools.chain.from_iterable(map(text, rows) for text in _TEXTS))
        )
    except TypeError:  # not text where text belongs: PostgreSQL refuses that row, alone
        pass
    else:
        if (
            is_storable(joined)
            and redact(joined) == joined
            and all(row[_DETAILS] is None for row in rows)
        ):
            return rows
    return [_sanitised_row(row) for row in rows]


def _sanitised_row(row: Row) -> Row:
    return tuple(
        redact(clean_text(value))
        if type(value) is str
        else _sanitised_json(clean_value(value))
        if isinstance(value, dict | list)
        else value
        for value in row
    )


def _sanitised_json(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {_sanitised_json(k): _sanitised_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_sanitised_json(v) for v in value]
    return value


# What PostgreSQL (or asyncpg, encoding the rows) says of a row's content: the row is at
# fault, not the database. Anything else (a lost connection, a shutdown, a missing table) keeps
# the rows for the next flush.
_ROW_REFUSED: tuple[type[BaseException], ...] = (
    asyncpg.DataError,  # class 22: bad text encoding, out of range, invalid representation
    asyncpg.IntegrityConstraintViolationError,  # class 23: a NOT NULL column without value
    asyncpg.ProgramLimitExceededError,  # class 54: a row too large
    TypeError,  # asyncpg: a value of the wrong type for its column
    ValueError,  # asyncpg: a value it cannot encode (UnicodeEncodeError, ...)
    OverflowError,  # asyncpg: a number beyond its column
)


class _Unwritten(Exception):
    """The database did not take ``rows`` for a reason that is not theirs."""

    def __init__(self, rows: list[Row], error: BaseException) -> None:
        super().__init__(str(error))
        self.rows = rows
        self.error = error


@dataclass(slots=True)
class AuditEvent:
    """One row of the trail. A writer's row also says when and by whom its command was mapped
    (``mapped_at``, ``mapped_by``): the mapper appends rows only for records it cannot map."""

    stage: str
    status: str
    actor: str
    flow: str | None = None
    direction: str | None = None
    source_ref: str | None = None
    target_ref: str | None = None
    event_id: str | None = None
    command_id: str | None = None
    message_id: str | None = None
    error_class: str | None = None
    error: str | None = None
    transformation: str | None = None
    details: dict[str, Any] | None = None
    source_version: str | None = None
    flow_version: int | None = None
    mapped_at: datetime | None = None
    mapped_by: str | None = None
    at: datetime = field(default_factory=utcnow)

    def row(self) -> Row:
        return (
            self.at,
            self.flow,
            self.direction,
            self.stage,
            self.status,
            self.source_ref,
            self.target_ref,
            self.event_id,
            self.command_id,
            self.message_id,
            self.error_class,
            (self.error or None) and self.error[:4000],
            self.transformation,
            self.actor,
            self.details,
            self.source_version,
            self.flow_version,
            self.mapped_at,
            self.mapped_by,
        )


# The two rows every record gets, built straight as tuples: an AuditEvent costs ten times as
# much to build (2.1 against 0.2-0.4 us, measured), and these run once a record.


def published_row(
    *,
    at: datetime,
    actor: str,
    flow: str,
    direction: str,
    source_ref: str,
    event_id: str,
    message_id: str,
    source_version: str,
    flow_version: int,
) -> Row:
    """The poller's row for a record it published."""
    # fmt: off
    return (at, flow, direction, "polled", "published", source_ref, None, event_id, None,
            message_id, None, None, None, actor, None, source_version, flow_version, None, None)
    # fmt: on


def outcome_row(
    *,
    at: datetime,
    actor: str,
    stage: str,
    status: str,
    flow: str,
    direction: str,
    source_ref: str,
    target_ref: str | None,
    event_id: str,
    command_id: str,
    message_id: str | None,
    error_class: str | None,
    error: str | None,
    transformation: str,
    source_version: str,
    flow_version: int,
    mapped_at: datetime | None,
    mapped_by: str | None,
) -> Row:
    """The writer's row for a command's outcome (written, skipped, failed)."""
    # fmt: off
    return (at, flow, direction, stage, status, source_ref, target_ref, event_id, command_id,
            message_id, error_class, (error or None) and error[:4000], transformation, actor,
            None, source_version, flow_version, mapped_at, mapped_by)
    # fmt: on


class AuditWriter:
    def __init__(
        self, pool: asyncpg.Pool, *, max_batch: int = 5000, interval_s: float = 0.2
    ) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._interval_s = interval_s
        self._buffer: list[Row] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._flush_lock = asyncio.Lock()
        self.rows_written = 0
        self.rows_dropped = 0

    async def start(self) -> AuditWriter:
        self._task = asyncio.create_task(self._run(), name="audit-writer")
        return self

    def add(self, events: Iterable[AuditEvent]) -> None:
        self.add_rows(event.row() for event in events)

    def add_rows(self, rows: Iterable[Row]) -> None:
        if self._closed:
            raise RuntimeError("audit writer is closed")
        self._buffer.extend(rows)
        if len(self._buffer) >= self._max_batch:
            self._wakeup.set()

    async def write(self, events: Iterable[AuditEvent]) -> None:
        """Buffer ``events`` and return once they (and everything before them) are committed."""
        await self.write_rows(event.row() for event in events)

    async def write_rows(self, rows: Iterable[Row]) -> None:
        """``write`` for rows built already (``published_row``, ``outcome_row``)."""
        self.add_rows(rows)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wakeup.set()
        await waiter

    async def flush(self) -> None:
        async with self._flush_lock:
            while self._buffer:
                rows = self._buffer[: self._max_batch]
                self._buffer = self._buffer[self._max_batch :]
                waiters = self._waiters if not self._buffer else []
                if not self._buffer:
                    self._waiters = []
                try:
                    await self._write(rows)
                except _Unwritten as unwritten:
                    # Keep the rows for the next try; whoever waits learns of the failure.
                    self._buffer[:0] = unwritten.rows
                    self._waiters[:0] = waiters
                    for waiter in self._waiters:
                        if not waiter.done():
                            waiter.set_exception(unwritten.error)
                    self._waiters = []
                    raise unwritten.error from None
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters = []

    async def _write(self, rows: list[Row]) -> None:
        """COPY ``rows`` (sanitised); should PostgreSQL refuse what a row holds, write the
        batch in halves until the rows at fault are alone, and drop those. Raises
        ``_Unwritten`` with the rows not written when the database fails otherwise."""
        rows = sanitised(rows)
        try:
            await self._copy(rows)
            return
        except _ROW_REFUSED as exc:
            log.warning(
                "audit: PostgreSQL refused a batch of %d rows (%s); writing it in parts",
                len(rows),
                _one_line(exc),
            )
        except Exception as exc:
            raise _Unwritten(rows, exc) from exc
        parts = [rows]  # a stack: the last part is written next
        while parts:
            part = parts.pop()
            try:
                await self._copy(part)
            except _ROW_REFUSED as exc:
                if len(part) == 1:
                    self._drop(part[0], exc)
                else:
                    middle = len(part) // 2
                    parts += [part[middle:], part[:middle]]
            except Exception as exc:
                unwritten = [row for rest in (part, *reversed(parts)) for row in rest]
                raise _Unwritten(unwritten, exc) from exc

    async def _copy(self, rows: list[Row]) -> None:
        async with self._pool.acquire() as conn:
            await conn.copy_records_to_table("audit_events", records=rows, columns=COLUMNS)
        self.rows_written += len(rows)

    def _drop(self, row: Row, error: BaseException) -> None:
        self.rows_dropped += 1
        metrics.AUDIT_ROWS_DROPPED.inc()
        named = dict(zip(COLUMNS, row, strict=False))
        log.error(
            "audit row dropped: PostgreSQL refused it (%s); it was %s/%s of %s in flow %s",
            _one_line(error),
            named.get("stage"),
            named.get("status"),
            named.get("source_ref"),
            named.get("flow"),
            extra={"flow": named.get("flow"), "stage": named.get("stage")},
        )

    async def _run(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self._interval_s)
            self._wakeup.clear()
            try:
                await self.flush()
            except Exception as exc:
                log.error("audit flush failed, rows kept for the next try: %s", _one_line(exc))
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        """Stop the background task and flush everything buffered."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task  # it leaves its loop after the current flush
        await self.flush()


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return redact(clean_text(" ".join(text.split())))[:300]
