"""PostgreSQL: the pool and the numbered migrations (``ml-connector db migrate``)."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any

import asyncpg
from pydantic_core import to_json

MIGRATION_LOCK_ID = 0x6D6C635F6D6967  # "mlc_mig": one migrator at a time, across replicas
_MIGRATION_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Binary jsonb (a version byte, then the text) so that COPY can carry jsonb columns too.
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda value: b"\x01" + to_json(value, fallback=str),
        decoder=lambda data: _json_loads(data[1:].decode()),
        schema="pg_catalog",
        format="binary",
    )
    await conn.set_type_codec("json", encoder=_json_dumps, decoder=_json_loads, schema="pg_catalog")


def _json_dumps(value: Any) -> str:
    return to_json(value, fallback=str).decode()


def _json_loads(value: str) -> Any:
    return json.loads(value)


# Lookups of a batch of keys (record links, snapshots) must stay one index probe per key as a
# table grows from nothing to millions of rows during a first backfill, when the statistics
# always lag. Two things went wrong, both measured in bench/pipeline.py:
# - asyncpg prepares every statement, and after five runs PostgreSQL may switch it to a generic
#   plan costed with the statistics of that moment. Frozen while the table was nearly empty,
#   the lookup became a hash join scanning the whole table on every batch (4.8 ms instead of
#   0.3 ms per 100 keys). Custom plans are costed with the table's current size;
# - statistics taken before the first invoice arrived say no row has entity 'ArInvoice', so a
#   join against the keys was planned as a scan of every snapshot (140 ms per 5,000 keys). The
#   lookups are written as a LATERAL subquery with LIMIT 1 on the primary key, which PostgreSQL
#   can only run as one probe per key (10 ms per 5,000 keys), whatever the statistics say.
SERVER_SETTINGS = {"plan_cache_mode": "force_custom_plan"}


async def copy_else(
    conn: asyncpg.Connection,
    table: str,
    columns: Sequence[str],
    records: list[tuple[Any, ...]],
    otherwise: Callable[[], Awaitable[object]],
) -> None:
    """Write rows believed new by COPY, PostgreSQL's cheapest way in, and by ``otherwise`` (an
    upsert of the same rows) should one exist after all. An upsert pays for speculative
    insertion on every row: a new record link costs the server 14 us by COPY, 21 by INSERT and
    28 by upsert (measured on a 2-core machine). COPY is all or nothing: when it meets an
    existing row it wrote none. Outside a transaction only: the failure would abort it."""
    if conn.is_in_transaction():
        raise RuntimeError("copy_else runs outside a transaction")
    try:
        await conn.copy_records_to_table(table, records=records, columns=columns)
    except asyncpg.UniqueViolationError:
        await otherwise()


# Backends (by server pid) whose connection took session advisory locks while out of the pool.
_HOLDING_SESSION_LOCKS: set[int] = set()


def release_session_locks_on_return(conn: asyncpg.Connection) -> None:
    """Have the pool release every session advisory lock ``conn`` takes (call it before taking
    them): they are then held exactly while the connection is out of the pool, whatever
    happens meanwhile. Should the release fail, the pool closes the connection, and the server
    releases them with it."""
    _HOLDING_SESSION_LOCKS.add(conn.get_server_pid())


async def _reset_on_return(conn: asyncpg.Connection) -> None:
    """What a connection must shed before another task gets it. asyncpg's default reset is one
    more round trip and four statements in PostgreSQL on every release (5% of a writer's CPU in
    the pipeline benchmark) to undo session state this code never leaves behind: no LISTEN, no
    SET beyond the connection's own server settings, no cursor outside a transaction. The one
    state it does leave, session advisory locks, is released where it was taken (above); the
    pool has rolled back any transaction left open before it calls this."""
    pid = conn.get_server_pid()
    if pid in _HOLDING_SESSION_LOCKS:
        await conn.execute("SELECT pg_advisory_unlock_all()")
        _HOLDING_SESSION_LOCKS.discard(pid)


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 5) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=_reset_on_return,
        command_timeout=60,
        server_settings=SERVER_SETTINGS,
    )
    assert pool is not None
    return pool


def migrations() -> list[tuple[int, str, str]]:
    """(number, name, sql) of every migration shipped with the package, in order."""
    found = []
    for entry in resources.files("shared.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found)


async def migrate(dsn: str) -> list[str]:
    """Apply the migrations not applied yet, under an advisory lock. Returns what it applied."""
    conn = await asyncpg.connect(dsn)
    applied_now: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for number, name, sql in migrations():
                if number in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        number,
                        name,
                    )
                applied_now.append(f"{number:03d}_{name}")
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    finally:
        await conn.close()
    return applied_now


async def ensure_database(dsn: str) -> bool:
    """Create the database named in ``dsn`` if it does not exist (development convenience)."""
    try:
        conn = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False
    base, _, name = dsn.rpartition("/")
    name = name.split("?")[0]
    admin = await asyncpg.connect(f"{base}/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    except asyncpg.DuplicateDatabaseError:
        return False
    finally:
        await admin.close()
    return True
