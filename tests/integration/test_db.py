"""Migrations and the audit writer against the real PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from shared import db
from shared.audit import AuditEvent, AuditWriter


async def _schema(dsn: str) -> list[tuple[str, str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'public' ORDER BY 1, 2"
        )
        return [tuple(r) for r in rows]
    finally:
        await conn.close()


async def test_migrations_twice_change_nothing(database_url: str) -> None:
    before = await _schema(database_url)
    assert await db.migrate(database_url) == []
    assert await _schema(database_url) == before
    tables = {t for t, _, _ in before}
    assert {"connections", "flows", "cursors", "record_links", "audit_events"} <= tables
    assert {"webhook_channels", "token_cache", "schema_migrations"} <= tables


async def test_concurrent_migrate_runs_do_not_collide(services: dict[str, str]) -> None:
    base = services["pg_base"]
    name = "mlc_test_concurrent_migrate"
    admin = await asyncpg.connect(f"{base}/postgres")
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        results = await asyncio.gather(*(db.migrate(f"{base}/{name}") for _ in range(4)))
        applied = [r for r in results if r]
        assert len(applied) == 1, results  # exactly one run applied the migrations
        assert applied[0] == [f"{n:03d}_{nm}" for n, nm, _ in db.migrations()]
        conn = await asyncpg.connect(f"{base}/{name}")
        count = await conn.fetchval("SELECT count(*) FROM schema_migrations")
        await conn.close()
        assert count == len(db.migrations())
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_audit_writer_persists_10000_events_and_loses_none_on_close(
    clean_db: asyncpg.Pool,
) -> None:
    writer = await AuditWriter(clean_db, max_batch=1000, interval_s=0.05).start()
    for i in range(10):
        writer.add(
            AuditEvent(
                stage="polled",
                status="ok",
                actor="test",
                flow="f",
                source_ref=f"syspro:ArCustomer:C{i * 1000 + j}",
            )
            for j in range(1000)
        )
    await writer.close()
    assert writer.rows_written == 10_000
    count = await clean_db.fetchval("SELECT count(*) FROM audit_events")
    distinct = await clean_db.fetchval("SELECT count(DISTINCT source_ref) FROM audit_events")
    assert (count, distinct) == (10_000, 10_000)


async def test_audit_write_returns_after_commit(clean_db: asyncpg.Pool) -> None:
    writer = await AuditWriter(clean_db, interval_s=5).start()
    await writer.write([AuditEvent(stage="written", status="insert", actor="t", flow="f")])
    assert await clean_db.fetchval("SELECT count(*) FROM audit_events") == 1
    await writer.close()


async def test_key_lookups_stay_index_probes_on_stale_statistics(clean_db: asyncpg.Pool) -> None:
    """A first backfill outgrows the statistics: analyzed while the tables held only customers,
    the link and snapshot lookups of invoices must still be one index probe per key."""
    from services.poller.service import SNAPSHOTS_BY_KEY_SQL
    from services.writer.service import LINKS_BY_KEY_SQL

    async with clean_db.acquire() as conn:
        await conn.execute(
            """INSERT INTO record_links (flow, source_entity, source_key, target_connection,
                   target_entity, target_id)
               SELECT 'f', 'ArCustomer', lpad(i::text, 7, '0'), 'zoho', 'Accounts', i::text
               FROM generate_series(1, 200) i"""
        )
        await conn.execute(
            """INSERT INTO source_snapshots (flow, entity, key, hash)
               SELECT 'f', 'ArCustomer', lpad(i::text, 7, '0'), 'h'
               FROM generate_series(1, 200) i"""
        )
        await conn.execute("ANALYZE record_links")
        await conn.execute("ANALYZE source_snapshots")
        await conn.execute(
            """INSERT INTO record_links (flow, source_entity, source_key, target_connection,
                   target_entity, target_id)
               SELECT 'f', 'ArInvoice', i::text, 'zoho', 'Deals', i::text
               FROM generate_series(1, 60000) i"""
        )
        await conn.execute(
            """INSERT INTO source_snapshots (flow, entity, key, hash)
               SELECT 'f', 'ArInvoice', i::text, 'h' FROM generate_series(1, 60000) i"""
        )
        keys = [str(i) for i in range(1, 5001)]
        # Prepared statements switch to a generic plan after five runs: look past that.
        for _ in range(7):
            links = await conn.fetch(LINKS_BY_KEY_SQL, ["f"] * 5000, ["ArInvoice"] * 5000, keys)
            snaps = await conn.fetch(SNAPSHOTS_BY_KEY_SQL, "f", "ArInvoice", keys)
        assert len(links) == len(snaps) == 5000
        for sql, args in (
            (LINKS_BY_KEY_SQL, (["f"] * 5000, ["ArInvoice"] * 5000, keys)),
            (SNAPSHOTS_BY_KEY_SQL, ("f", "ArInvoice", keys)),
        ):
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *args))
            assert "Index Scan" in plan, plan
            assert "Seq Scan" not in plan, plan


async def test_writer_record_locks_go_with_the_connection_back_to_the_pool(
    clean_db: asyncpg.Pool, database_url: str
) -> None:
    """The writer takes session advisory locks and never unlocks them itself: the pool's reset
    on release must free them, or the record would stay locked for every other replica."""
    from services.writer.service import Batcher

    record = ("syspro-zoho", "ArCustomer", "C000001")
    batcher = Batcher.__new__(Batcher)  # _lock_records uses nothing of the instance
    other = await asyncpg.connect(database_url)  # another replica's connection
    try:
        name = "\x1f".join(record)
        probe = "SELECT pg_try_advisory_lock(hashtextextended($1, 7))"
        unlock = "SELECT pg_advisory_unlock(hashtextextended($1, 7))"
        async with clean_db.acquire() as conn:
            assert await batcher._lock_records(conn, [record]) == {record}
            assert await other.fetchval(probe, name) is False  # held while the flush runs
        assert await other.fetchval(probe, name) is True  # released with the connection
        # now the other replica holds it: this writer gets only the records nobody holds
        free = ("syspro-zoho", "ArCustomer", "C000002")
        async with clean_db.acquire() as conn:
            assert await batcher._lock_records(conn, [record, free]) == {free}
        await other.fetchval(unlock, name)
    finally:
        await other.close()


async def test_a_connection_without_session_state_returns_to_the_pool_without_a_query(
    database_url: str,
) -> None:
    """The pool's reset costs a round trip only where there is something to shed: a
    connection that took session locks releases them, any other goes back as it is, and one
    left inside a transaction is rolled back all the same."""
    queries: list[str] = []
    pool = await db.create_pool(database_url, min_size=1, max_size=1)
    try:
        await _reuse_one_connection(pool, queries)
    finally:
        await pool.close()


async def _reuse_one_connection(pool: asyncpg.Pool, queries: list[str]) -> None:
    async with pool.acquire() as conn:
        pid = conn.get_server_pid()
        conn.add_query_logger(lambda record: queries.append(record.query))
        await conn.fetchval("SELECT 1")
    assert queries == ["SELECT 1"]
    async with pool.acquire() as conn:
        assert conn.get_server_pid() == pid  # the same connection, reused
        tx = conn.transaction()
        await tx.start()
        await conn.execute("CREATE TEMP TABLE left_open (x int)")
    async with pool.acquire() as conn:
        assert conn.get_server_pid() == pid
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT to_regclass('pg_temp.left_open')") is None
        db.release_session_locks_on_return(conn)
        assert await conn.fetchval("SELECT pg_try_advisory_lock(42)") is True
    assert "SELECT pg_advisory_unlock_all()" in queries
    async with pool.acquire() as conn:
        held = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1", pid
        )
        assert held == 0


async def test_lineage_by_either_ref_finds_the_record_by_index(clean_db: asyncpg.Pool) -> None:
    """``ml-connector audit`` given the Zoho id of a record shows the rows of its source ref
    (polled) with those of the target (written, saying when and by whom its command was
    mapped), and no query scans a table."""
    from services.ops import audit_query

    async with clean_db.acquire() as conn:
        await conn.execute(
            "INSERT INTO connections (name, system) VALUES ('erp', 'syspro'), ('crm', 'zoho_crm')"
        )
        await conn.execute(
            """INSERT INTO flows (name, version, definition, definition_hash, source_connection,
                   target_connection, poll_interval_s)
               VALUES ('f', 1, '{}', 'x', 'erp', 'crm', 60)"""
        )
        await conn.execute(
            """INSERT INTO record_links (flow, source_entity, source_key, target_connection,
                   target_entity, target_id)
               VALUES ('f', 'ArCustomer', 'C1', 'crm', 'Accounts', '900'),
                      ('f', 'ArCustomer', 'C2', 'crm', 'Accounts', '901')"""
        )
    writer = await AuditWriter(clean_db).start()
    start = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    mapped = {"mapped_at": start + timedelta(seconds=1), "mapped_by": "mapper@a"}
    rows = [
        # C1: polled, its command failed once (a transient error), then written
        ("polled", "ok", "syspro:ArCustomer:C1", None, 0, {}),
        ("polled", "ok", "syspro:ArCustomer:C2", None, 0, {}),
        ("failed", "failed", "syspro:ArCustomer:C1", None, 2, mapped),
        ("written", "update", "syspro:ArCustomer:C1", "zoho_crm:Accounts:900", 9, mapped),
        ("written", "insert", "syspro:ArCustomer:C2", "zoho_crm:Accounts:901", 3, mapped),
    ]
    await writer.write(
        AuditEvent(
            stage=stage,
            status=status,
            actor="writer@w" if mapped_ else "poller@p",
            flow="f",
            source_ref=s,
            target_ref=t,
            event_id=f"e-{s[-2:]}",
            command_id=f"c-{s[-2:]}" if mapped_ else None,
            at=start + timedelta(seconds=second),
            **mapped_,
        )
        for stage, status, s, t, second, mapped_ in rows
    )
    await writer.close()

    for ref in ("zoho_crm:Accounts:900", "syspro:ArCustomer:C1"):
        found = await audit_query.lineage(clean_db, ref)
        # one mapping step per command, told by its writer rows, in time order
        assert [(r["stage"], r["status"], r["actor"], r["source_ref"]) for r in found] == [
            ("polled", "ok", "poller@p", "syspro:ArCustomer:C1"),
            ("mapped", "ok", "mapper@a", "syspro:ArCustomer:C1"),
            ("failed", "failed", "writer@w", "syspro:ArCustomer:C1"),
            ("written", "update", "writer@w", "syspro:ArCustomer:C1"),
        ], ref
        step = found[1]
        assert (step["at"], step["command_id"], step["event_id"], step["target_ref"]) == (
            start + timedelta(seconds=1),
            "c-C1",
            "e-C1",
            None,
        )
    assert "mapper@a" in audit_query.render(found)
    assert await audit_query.lineage(clean_db, "zoho_crm:Accounts:999") == []

    async with clean_db.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")  # a scan shows only if unavoidable
        for sql, args in (
            (audit_query.LINKS_OF_REF_SQL, ("Accounts", "900", ["f"], ["crm"])),
            (audit_query.AUDIT_OF_REFS_SQL, (["syspro:ArCustomer:C1"], ["zoho_crm:Accounts:900"])),
        ):
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *args))
            assert "Seq Scan on record_links" not in plan, plan
            assert "Seq Scan on audit_events" not in plan, plan


async def test_links_of_first_writes_are_copied_in_and_an_unexpected_one_is_upserted(
    clean_db: asyncpg.Pool,
) -> None:
    """The writer copies in the links of records it found unlinked (cheaper than an upsert).
    A link that exists after all (another replica linked it in between) is updated, not an
    error, and an older command never overwrites a newer link."""
    from services.writer.service import Pending, _save_links
    from shared.connectors.base import WriteOutcome
    from shared.messages import UpsertCommand, utcnow

    def written(key: str, target_id: str, *, linked: bool, age_s: float = 0) -> tuple:
        command = UpsertCommand.build(
            event_id=f"e-{key}",
            flow="f",
            flow_version=1,
            transformation="f/customers@v1",
            source_system="syspro",
            source_entity="ArCustomer",
            source_key=key,
            source_version=f"v-{target_id}",
            observed_at=utcnow() - timedelta(seconds=age_s),
            target_connection="crm",
            target_system="zoho_crm",
            target_entity="Accounts",
            match_on=["ERP_Customer_No"],
            payload={"ERP_Customer_No": key},
        )
        pending = Pending(command, None, 0, ("f", "ArCustomer", key), linked=linked)  # type: ignore[arg-type]
        return pending, WriteOutcome(True, target_id=target_id, action="insert")

    links = "SELECT source_key, target_id, source_version FROM record_links ORDER BY 1"
    async with clean_db.acquire() as conn:
        await _save_links(conn, "crm", "Accounts", [written("C1", "900", linked=False)])
        assert [tuple(r) for r in await conn.fetch(links)] == [("C1", "900", "v-900")]
        # believed unlinked, linked meanwhile: the whole COPY falls back to the upsert
        await _save_links(
            conn,
            "crm",
            "Accounts",
            [written("C1", "901", linked=False), written("C2", "902", linked=False)],
        )
        assert [tuple(r) for r in await conn.fetch(links)] == [
            ("C1", "901", "v-901"),
            ("C2", "902", "v-902"),
        ]
        # a link known to exist is upserted; an older command leaves a newer link alone
        await _save_links(conn, "crm", "Accounts", [written("C2", "903", linked=True, age_s=60)])
        assert [tuple(r) for r in await conn.fetch(links)][1] == ("C2", "902", "v-902")
        async with conn.transaction():
            with pytest.raises(RuntimeError, match="outside a transaction"):
                await _save_links(conn, "crm", "Accounts", [written("C3", "904", linked=False)])
