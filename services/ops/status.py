"""``ml-connector status``: flows, cursors and lag; queues with ready, unacked and dead letters;
writer rates; and whether anything needs attention."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import asyncpg

from shared.bus import Bus


async def collect(pool: asyncpg.Pool, bus: Bus | None) -> dict[str, Any]:
    now = datetime.now(UTC)
    attention: list[str] = []
    flows = []
    rows = await pool.fetch(
        """SELECT f.name, f.version, f.enabled, f.poll_interval_s, f.source_connection,
                  f.target_connection, l.next_poll_at, l.owner, l.lease_until
           FROM flows f LEFT JOIN flow_leases l ON l.flow = f.name ORDER BY f.name"""
    )
    cursors = await pool.fetch("SELECT * FROM cursors ORDER BY flow, entity")
    for row in rows:
        entities = []
        for c in (c for c in cursors if c["flow"] == row["name"]):
            last = c["last_poll_at"]
            lag_s = (now - last).total_seconds() if last else None
            entities.append(
                {
                    "entity": c["entity"],
                    "cursor": c["value"],
                    "last_poll_at": last.isoformat() if last else None,
                    "lag_s": round(lag_s, 1) if lag_s is not None else None,
                    "last_status": c["last_status"],
                    "last_error": c["last_error"],
                    "last_count": c["last_count"],
                }
            )
            if row["enabled"] and (c["last_status"] or "").startswith("error"):
                attention.append(f"flow {row['name']} {c['entity']}: {c['last_error']}")
            if row["enabled"] and lag_s is not None and lag_s > 3 * row["poll_interval_s"] + 60:
                attention.append(
                    f"flow {row['name']} {c['entity']}: last poll {int(lag_s)} s ago"
                    f" (interval {row['poll_interval_s']} s)"
                )
        flows.append(
            {
                "name": row["name"],
                "version": row["version"],
                "enabled": row["enabled"],
                "source": row["source_connection"],
                "target": row["target_connection"],
                "poll_interval_s": row["poll_interval_s"],
                "next_poll_at": row["next_poll_at"].isoformat() if row["next_poll_at"] else None,
                "entities": entities,
            }
        )
    queues: list[dict[str, Any]] = []
    if bus is not None:
        try:
            depths = await bus.queue_depths()
        except Exception as exc:
            attention.append(f"broker: cannot read queue depths ({exc.__class__.__name__})")
            depths = []
        for depth in depths:
            queues.append(asdict(depth))
            if depth.name.endswith(".dlq") and depth.ready:
                attention.append(f"dead letters: {depth.ready} in {depth.name}")
    rates = await pool.fetch(
        """SELECT flow, stage, count(*) AS n FROM audit_events
           WHERE at > now() - interval '5 minutes' AND stage IN ('written', 'skipped', 'failed')
           GROUP BY flow, stage ORDER BY flow, stage"""
    )
    writer_rates = [
        {"flow": r["flow"], "stage": r["stage"], "per_s_5m": round(r["n"] / 300, 2)} for r in rates
    ]
    return {
        "time": now.isoformat(),
        "flows": flows,
        "queues": queues,
        "writer_rates": writer_rates,
        "attention": attention,
        "ok": not attention,
    }


def render(status: dict[str, Any]) -> str:
    lines = ["FLOWS"]
    if not status["flows"]:
        lines.append("  (no flows applied: ml-connector flows apply flows/*.yaml)")
    for f in status["flows"]:
        state = "enabled" if f["enabled"] else "disabled"
        lines.append(
            f"  {f['name']} v{f['version']} {state}  {f['source']} -> {f['target']}"
            f"  every {f['poll_interval_s']} s"
        )
        for e in f["entities"]:
            lag = f"{e['lag_s']:.0f} s ago" if e["lag_s"] is not None else "never"
            lines.append(
                f"    {e['entity']:<14} last poll {lag:<12} {e['last_status'] or '-':<18}"
                f" {e['last_count']:>7} changed  cursor {e['cursor'] or '-'}"
            )
    lines.append("QUEUES                                         ready  unacked  consumers")
    for q in status["queues"]:
        if ".retry." in q["name"] and not q["ready"]:
            continue
        unacked = "-" if q["unacked"] is None else str(q["unacked"])
        consumers = "-" if q["consumers"] is None else str(q["consumers"])
        lines.append(f"  {q['name']:<44} {q['ready']:>6} {unacked:>8} {consumers:>10}")
    if status["writer_rates"]:
        lines.append("RECORDS PER SECOND (last 5 minutes)")
        for r in status["writer_rates"]:
            lines.append(f"  {r['flow']:<24} {r['stage']:<10} {r['per_s_5m']:>8}")
    lines.append("ATTENTION" if status["attention"] else "ALL GOOD")
    lines.extend(f"  ! {item}" for item in status["attention"])
    return "\n".join(lines)
