"""``ml-connector audit``: a record's whole lineage, or the failures of a time window."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg

from shared.flows import parse_duration


async def lineage(pool: asyncpg.Pool, ref: str) -> list[dict[str, Any]]:
    """Rows for a source ref (``syspro:ArCustomer:C0001``) or a target ref
    (``zoho_crm:Accounts:<id>``), with the other side of the link included, in time order."""
    parts = ref.split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{ref!r} is not SYSTEM:ENTITY:KEY (e.g. syspro:ArCustomer:C0001)")
    system, entity, key = parts
    source_refs = {ref}
    links = await pool.fetch(
        """SELECT l.flow, l.source_entity, l.source_key, l.target_entity, l.target_id,
                  c.system AS target_system
           FROM record_links l LEFT JOIN connections c ON c.name = l.target_connection
           WHERE (l.target_entity = $1 AND l.target_id = $2)
              OR (l.source_entity = $1 AND l.source_key = $2)""",
        entity,
        key,
    )
    target_refs = {ref}
    for link in links:
        source_refs.add(f"{system}:{link['source_entity']}:{link['source_key']}")
        if link["target_id"]:
            target_refs.add(f"{link['target_system']}:{link['target_entity']}:{link['target_id']}")
    rows = await pool.fetch(
        """SELECT * FROM audit_events
           WHERE source_ref = ANY($1::text[]) OR target_ref = ANY($2::text[])
           ORDER BY at, id""",
        list(source_refs),
        list(target_refs),
    )
    if not rows and links:
        # A target ref: audit rows are keyed by the source ref of the other system.
        rows = await pool.fetch(
            """SELECT * FROM audit_events
               WHERE split_part(source_ref, ':', 2) = ANY($1::text[])
                 AND split_part(source_ref, ':', 3) = ANY($2::text[])
               ORDER BY at, id""",
            [link["source_entity"] for link in links],
            [link["source_key"] for link in links],
        )
    return [dict(row) for row in rows]


async def failures(pool: asyncpg.Pool, since: str, limit: int = 200) -> list[dict[str, Any]]:
    window = timedelta(seconds=parse_duration(since))
    rows = await pool.fetch(
        """SELECT * FROM audit_events
           WHERE error_class IS NOT NULL AND at > now() - $1::interval
           ORDER BY at DESC, id DESC LIMIT $2""",
        window,
        limit,
    )
    return [dict(row) for row in rows]


def render(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no audit rows)"
    lines = []
    for r in rows:
        where = r["target_ref"] or ""
        error = f"  [{r['error_class']}] {r['error']}" if r["error_class"] else ""
        lines.append(
            f"{r['at'].isoformat(timespec='milliseconds')}  {r['stage']:<12} {r['status']:<13}"
            f" {r['source_ref'] or '':<36} {where:<40} {r['actor']}"
            f"{'  ' + r['transformation'] if r['transformation'] else ''}{error}"
        )
    return "\n".join(lines)
