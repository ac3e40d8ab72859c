"""``ml-connector audit``: a record's whole lineage, or the failures of a time window."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

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
    return with_mapping_steps([dict(row) for row in rows])


def with_mapping_steps(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with the mapping step of each command shown as a row of its own: the mapper
    appends no row for a record it mapped, the writer's rows (written, skipped, failed) say
    when and by whom their command was mapped. A command retried has several writer rows and
    one mapping step."""
    steps: dict[str, dict[str, Any]] = {}
    for row in rows:
        command = row.get("command_id")
        if row.get("mapped_at") is None or row["stage"] == "mapped" or command in steps:
            continue
        steps[command] = {
            **dict.fromkeys(row),
            **{k: row[k] for k in _MAPPING_STEP_COLUMNS},
            "at": row["mapped_at"],
            "stage": "mapped",
            "status": "ok",
            "actor": row["mapped_by"],
        }
    # in time order; a step before the writer's row of the same moment
    ordered = [(r["at"], r["id"], 0, r) for r in steps.values()]
    ordered += [(r["at"], r["id"], 1, r) for r in rows]
    return [r for *_, r in sorted(ordered, key=lambda t: t[:3])]


_MAPPING_STEP_COLUMNS = (
    "id",
    "flow",
    "direction",
    "source_ref",
    "event_id",
    "command_id",
    "message_id",
    "transformation",
    "source_version",
    "flow_version",
)


async def failures(pool: asyncpg.Pool, since: datetime, limit: int = 200) -> list[dict[str, Any]]:
    """Failures after ``since`` (the CLI's ``--since``, parsed and bounded there), newest
    first."""
    rows = await pool.fetch(
        """SELECT * FROM audit_events
           WHERE error_class IS NOT NULL AND at > $1
           ORDER BY at DESC, id DESC LIMIT $2""",
        since,
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
