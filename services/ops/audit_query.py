"""``ml-connector audit``: a record's whole lineage, or the failures of a time window."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg

from shared.flows import parse_duration

# The flows that read from a system and the connections of a system: the ref names a system,
# the links name flows and connections.
NAMES_OF_SYSTEM_SQL = """
    SELECT array(SELECT f.name FROM flows f JOIN connections c ON c.name = f.source_connection
                 WHERE c.system = $1) AS flows,
           array(SELECT name FROM connections WHERE system = $1) AS connections"""

# The links of a record seen from either side, each half an index probe (the primary key, or
# record_links_target), with the systems that make its audit refs.
_LINK_COLUMNS = """l.flow, l.source_entity, l.source_key, l.target_entity, l.target_id,
           sc.system AS source_system, tc.system AS target_system
    FROM record_links l
    LEFT JOIN flows f ON f.name = l.flow
    LEFT JOIN connections sc ON sc.name = f.source_connection
    LEFT JOIN connections tc ON tc.name = l.target_connection"""
LINKS_OF_REF_SQL = f"""
    SELECT {_LINK_COLUMNS}
    WHERE l.flow = ANY($3::text[]) AND l.source_entity = $1 AND l.source_key = $2
    UNION
    SELECT {_LINK_COLUMNS}
    WHERE l.target_connection = ANY($4::text[]) AND l.target_entity = $1 AND l.target_id = $2"""

AUDIT_OF_REFS_SQL = """
    SELECT * FROM audit_events
    WHERE source_ref = ANY($1::text[]) OR target_ref = ANY($2::text[])
    ORDER BY at, id"""


async def lineage(pool: asyncpg.Pool, ref: str) -> list[dict[str, Any]]:
    """Rows for a source ref (``syspro:ArCustomer:C0001``) or a target ref
    (``zoho_crm:Accounts:<id>``), with the other side of the link included, in time order.
    Every query is an index lookup, however long the trail."""
    parts = ref.split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{ref!r} is not SYSTEM:ENTITY:KEY (e.g. syspro:ArCustomer:C0001)")
    system, entity, key = parts
    names = await pool.fetchrow(NAMES_OF_SYSTEM_SQL, system)
    links = await pool.fetch(LINKS_OF_REF_SQL, entity, key, names["flows"], names["connections"])
    source_refs, target_refs = {ref}, {ref}
    for link in links:
        if link["source_system"]:  # unknown once its flow is deleted: the target side remains
            source_refs.add(f"{link['source_system']}:{link['source_entity']}:{link['source_key']}")
        if link["target_id"] and link["target_system"]:
            target_refs.add(f"{link['target_system']}:{link['target_entity']}:{link['target_id']}")
    rows = await pool.fetch(AUDIT_OF_REFS_SQL, sorted(source_refs), sorted(target_refs))
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
