"""``flows preview``: map the first N source records and say what the writer would do."""

from __future__ import annotations

import dataclasses
from typing import Any

from services.runtime import ServiceContext
from shared.connectors.base import Source
from shared.connectors.registry import require_source
from shared.failures import MappingError
from shared.keys import load_case_sensitive_keys
from shared.mapping import map_event
from shared.messages import ChangeEvent, content_hash


async def preview(
    ctx: ServiceContext, name: str, limit: int, only: str | None = None
) -> list[dict[str, Any]]:
    stored = await ctx.flows.get(name)
    flow = stored.flow
    source: Source = require_source(await ctx.connector(flow.source))
    source_system = await ctx.system_of(flow.source)
    target_system = await ctx.system_of(flow.target)
    case_sensitive = await load_case_sensitive_keys(ctx.pool, flow.source)
    rows: list[dict[str, Any]] = []
    for mapping in flow.entities:
        if only and only not in (mapping.name, mapping.source.entity):
            continue
        stream = dataclasses.replace(
            mapping.stream(page_size=max(limit, 1)), case_sensitive_keys=case_sensitive
        )
        records: list[dict[str, Any]] = []
        async for page in source.changed_since(stream, None):
            records.extend(page)
            if len(records) >= limit:
                break
        for row in records[:limit]:
            record = mapping.project(row)
            key = stream.key_of(record)
            event = ChangeEvent(
                flow=flow.name,
                flow_version=stored.version,
                source_connection=flow.source,
                source_system=source_system,
                entity=stream.entity,
                key=key,
                version=content_hash(record),
                record=record,
            )
            row: dict[str, Any] = {"entity": mapping.name, "source_key": key}
            try:
                command = map_event(
                    flow,
                    stored.version,
                    event,
                    target_connection=flow.target,
                    target_system=target_system,
                    case_sensitive_keys=case_sensitive,
                )
            except MappingError as exc:
                rows.append({**row, "action": "fail", "error": str(exc)})
                continue
            link = await ctx.pool.fetchrow(
                "SELECT target_id, payload_hash FROM record_links"
                " WHERE flow = $1 AND source_entity = $2 AND source_key = $3",
                flow.name,
                stream.entity,
                key,
            )
            if link is None or not link["target_id"]:
                action = "insert"
            elif link["payload_hash"] == command.payload_hash:
                action = "skip (unchanged)"
            else:
                action = f"update {link['target_id']}"
            rows.append(
                {
                    **row,
                    "action": action,
                    "target_entity": command.target_entity,
                    "payload": command.payload,
                    "parents": [p.model_dump(exclude_none=True) for p in command.parents],
                }
            )
    return rows
