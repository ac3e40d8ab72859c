"""One audit row PostgreSQL refuses never wedges the audit writer (real PostgreSQL)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from shared import db
from shared.audit import COLUMNS, AuditEvent, AuditWriter, Row
from shared.logs import register_secret

SECRET = "zoho-client-secret-0123456789"
AT = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)


def _row(ref: str, **values: Any) -> Row:
    event = AuditEvent(
        stage="written",
        status="failed",
        actor="writer@test",
        flow="syspro-zoho",
        source_ref=ref,
        error="ok",
        at=AT,
    )
    named = dict(zip(COLUMNS, event.row(), strict=True))
    named.update(values)
    return tuple(named[c] for c in COLUMNS)


def _dropped() -> float:
    return REGISTRY.get_sample_value("mlc_audit_rows_dropped_total") or 0.0


async def _stored(pool: asyncpg.Pool) -> dict[str, dict[str, Any]]:
    rows = await pool.fetch("SELECT source_ref, error, details FROM audit_events")
    return {r["source_ref"]: dict(r) for r in rows}


async def test_bad_rows_are_sanitised_or_dropped_alone_and_the_others_written(
    clean_db: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    register_secret(SECRET)
    writer = await AuditWriter(clean_db, interval_s=0.05).start()
    before = _dropped()
    batch = [_row(f"syspro:ArCustomer:C{i}") for i in range(50)]
    batch[3] = _row("syspro:ArCustomer:NUL", error="vendor said \x00 here")
    batch[7] = _row("syspro:ArCustomer:C\x000007")  # the key itself holds a NUL
    batch[11] = _row("syspro:ArCustomer:SUR", error="bad \udcff text")
    batch[13] = _row("syspro:ArCustomer:SECRET", error=f"echoed client_secret={SECRET}")
    batch[17] = _row("syspro:ArCustomer:DETAILS", details={"note\x00": ["a\x00", SECRET]})
    batch[19] = _row("syspro:ArCustomer:WRONG", flow_version="not a number")  # wrong type
    batch[23] = _row("syspro:ArCustomer:NOSTAGE", stage=None)  # NOT NULL violated
    try:
        await asyncio.wait_for(writer.write_rows(batch), 10)
        stored = await _stored(clean_db)
        assert len(stored) == 48
        assert "syspro:ArCustomer:WRONG" not in stored
        assert "syspro:ArCustomer:NOSTAGE" not in stored
        assert stored["syspro:ArCustomer:NUL"]["error"] == "vendor said \ufffd here"
        assert "syspro:ArCustomer:C\ufffd0007" in stored
        assert stored["syspro:ArCustomer:SUR"]["error"] == "bad \ufffd text"
        assert SECRET not in stored["syspro:ArCustomer:SECRET"]["error"]
        assert stored["syspro:ArCustomer:SECRET"]["error"] == "echoed client_secret=********"
        assert stored["syspro:ArCustomer:DETAILS"]["details"] == {
            "note\ufffd": ["a\ufffd", "********"]
        }
        assert writer.rows_dropped == 2 and _dropped() == before + 2
        assert "audit row dropped" in caplog.text and "syspro:ArCustomer:WRONG" in caplog.text
        # the writer is not wedged: the next rows are written at once
        await asyncio.wait_for(writer.write_rows([_row("syspro:ArCustomer:NEXT")]), 5)
        assert "syspro:ArCustomer:NEXT" in await _stored(clean_db)
        assert not writer._buffer
    finally:
        await writer.close()


def test_a_clean_batch_is_returned_as_it_is() -> None:
    from shared.audit import sanitised

    rows = [_row(f"syspro:ArCustomer:C{i}", error="Ünïcødé is fine") for i in range(3)]
    assert sanitised(rows) is rows


async def test_rows_are_kept_while_the_database_is_unreachable(
    database_url: str, clean_db: asyncpg.Pool
) -> None:
    """An outage is no fault of the rows: none is dropped, all are written once it is over."""
    gone = await db.create_pool(database_url, max_size=1)
    await gone.close()
    writer = AuditWriter(gone, interval_s=60)  # no background task: flushed by hand
    writer.add_rows([_row(f"syspro:ArCustomer:C{i}") for i in range(5)])
    with pytest.raises(asyncpg.InterfaceError):
        await writer.flush()
    assert len(writer._buffer) == 5 and writer.rows_dropped == 0
    writer._pool = clean_db
    await writer.flush()
    assert len(await _stored(clean_db)) == 5 and writer.rows_written == 5
