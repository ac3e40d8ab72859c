"""Flows in PostgreSQL: applied from files, versioned, enabled or disabled; cursors and leases."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from shared.flows import Flow, parse_flow


@dataclass
class StoredFlow:
    flow: Flow
    version: int
    enabled: bool
    file: str | None
    applied_at: datetime


class FlowNotFoundError(LookupError):
    pass


class FlowStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._cache: dict[tuple[str, int], Flow] = {}

    async def apply(self, flow: Flow, *, file: str | None = None) -> tuple[int, str]:
        """Store a flow; a changed definition gets the next version. Returns (version, what)."""
        return (await self.apply_all([(flow, file)]))[0]

    async def apply_all(self, flows: list[tuple[Flow, str | None]]) -> list[tuple[int, str]]:
        """Store several flows in one transaction: all of them or, on any error, none. Each
        changed definition gets the next version. Returns (version, what) per flow."""
        names = [flow.name for flow, _ in flows]
        if len(set(names)) != len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"flow(s) {', '.join(twice)} given more than once")
        async with self.pool.acquire() as conn, conn.transaction():
            return [await self._apply(conn, flow, file) for flow, file in flows]

    async def _apply(
        self, conn: asyncpg.Connection, flow: Flow, file: str | None
    ) -> tuple[int, str]:
        definition, digest = flow.definition(), flow.definition_hash()
        row = await conn.fetchrow(
            "SELECT version, definition_hash FROM flows WHERE name = $1 FOR UPDATE", flow.name
        )
        if row is not None and row["definition_hash"] == digest:
            return row["version"], "unchanged"
        version = 1 if row is None else row["version"] + 1
        await conn.execute(
            """INSERT INTO flows (name, version, definition, definition_hash,
                   source_connection, target_connection, poll_interval_s, enabled, file)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
               ON CONFLICT (name) DO UPDATE SET version = $2, definition = $3,
                   definition_hash = $4, source_connection = $5, target_connection = $6,
                   poll_interval_s = $7, file = $9, applied_at = now()""",
            flow.name,
            version,
            definition,
            digest,
            flow.source,
            flow.target,
            int(flow.poll_interval),
            flow.enabled,
            file,
        )
        await conn.execute(
            "INSERT INTO flow_versions (name, version, definition) VALUES ($1, $2, $3)",
            flow.name,
            version,
            definition,
        )
        await conn.execute(
            """INSERT INTO flow_leases (flow, owner, lease_until, next_poll_at)
               VALUES ($1, '', now(), now())
               ON CONFLICT (flow) DO UPDATE SET next_poll_at = now()""",
            flow.name,
        )
        return version, "created" if row is None else "updated"

    async def get(self, name: str) -> StoredFlow:
        """The flow's current version and state. The definition is read and parsed once per
        version: the mapper asks for every batch, and decoding the jsonb each time cost it 3%."""
        row = await self.pool.fetchrow(
            "SELECT version, enabled, file, applied_at FROM flows WHERE name = $1", name
        )
        if row is None:
            raise FlowNotFoundError(f"no flow named {name!r}")
        flow = self._cache.get((name, row["version"]))
        if flow is None:
            row = await self.pool.fetchrow("SELECT * FROM flows WHERE name = $1", name)
            if row is None:
                raise FlowNotFoundError(f"no flow named {name!r}")
            flow = self._parse(name, row["version"], row["definition"])
        return StoredFlow(
            flow,
            row["version"],
            row["enabled"],
            row["file"],
            row["applied_at"],
        )

    async def get_version(self, name: str, version: int) -> Flow:
        cached = self._cache.get((name, version))
        if cached is not None:
            return cached
        definition = await self.pool.fetchval(
            "SELECT definition FROM flow_versions WHERE name = $1 AND version = $2", name, version
        )
        if definition is None:
            raise FlowNotFoundError(f"no flow {name!r} version {version}")
        return self._parse(name, version, definition)

    def _parse(self, name: str, version: int, definition: dict[str, Any]) -> Flow:
        flow = self._cache.get((name, version))
        if flow is None:
            flow = parse_flow(definition, origin=f"flow {name} v{version} (stored)")
            self._cache[(name, version)] = flow
        return flow

    async def list(self) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            """SELECT f.name, f.version, f.enabled, f.source_connection, f.target_connection,
                      f.poll_interval_s, f.file, f.applied_at, l.owner, l.lease_until,
                      l.next_poll_at
               FROM flows f LEFT JOIN flow_leases l ON l.flow = f.name ORDER BY f.name"""
        )
        return [dict(row) for row in rows]

    async def set_enabled(self, name: str, enabled: bool) -> None:
        result = await self.pool.execute(
            "UPDATE flows SET enabled = $2 WHERE name = $1", name, enabled
        )
        if result.endswith(" 0"):
            raise FlowNotFoundError(f"no flow named {name!r}")
        if enabled:
            await self.pool.execute(
                "UPDATE flow_leases SET next_poll_at = now() WHERE flow = $1", name
            )

    async def resync(self, name: str, entity: str | None = None) -> int:
        """Forget the cursor and snapshot of a flow (or one entity): the next poll is a backfill.
        Unchanged records are still skipped by the writer's payload-hash check."""
        await self.get(name)
        args: list[Any] = [name]
        where = "flow = $1"
        if entity:
            where += " AND entity = $2"
            args.append(entity)
        async with self.pool.acquire() as conn, conn.transaction():
            cleared = await conn.execute(f"DELETE FROM cursors WHERE {where}", *args)
            await conn.execute(f"DELETE FROM source_snapshots WHERE {where}", *args)
            await conn.execute("UPDATE flow_leases SET next_poll_at = now() WHERE flow = $1", name)
        return int(cleared.split()[-1])

    async def enabled_names(self) -> list[str]:
        rows = await self.pool.fetch("SELECT name FROM flows WHERE enabled ORDER BY name")
        return [row["name"] for row in rows]
