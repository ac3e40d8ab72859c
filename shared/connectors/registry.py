"""The connector registry: every system we talk to, declared once, found through entry points.

A connector module declares one ``ConnectorType`` (its system name, its settings and secrets
models, its factory and its capabilities) and registers it in its package's metadata, group
``ml_connector.connectors``::

    [project.entry-points."ml_connector.connectors"]
    zoho_crm = "shared.connectors.zoho_crm:CONNECTOR"

so a connector can live in a package of its own. Nothing else lists systems: the writer targets
(``writer_targets``), the CLI's ``--credentials-file`` kinds and the flow checks all come from
here. ``require_source`` / ``require_sink`` replace ``assert isinstance`` in the services.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from pydantic import BaseModel

from shared.connectors.base import (
    Capabilities,
    Connector,
    CursorKind,
    MatchStrategy,
    SinkDecl,
    StreamDecl,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Capabilities",
    "ConnectionConfigError",
    "ConnectorType",
    "CursorKind",
    "MatchStrategy",
    "SinkDecl",
    "StreamDecl",
    "connector_types",
    "get",
    "require_sink",
    "require_source",
    "reset",
    "writer_targets",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ml_connector.connectors"


class ConnectionConfigError(Exception):
    """A connection that does not exist or whose stored definition is invalid."""


@dataclass(frozen=True)
class ConnectorType:
    system: str  # "zoho_crm"
    title: str  # "Zoho CRM (REST API v8)"
    settings_model: type[BaseModel]
    secrets_model: type[BaseModel]
    factory: Callable[..., Connector]
    # what a connection reads and writes, from its settings (None: the system's general case)
    capabilities: Callable[[BaseModel | None], Capabilities]
    # credential files the CLI reads into secrets and settings: {"ionapi": parse_ionapi}
    credential_files: Mapping[str, Callable[[bytes], dict[str, Any]]] = field(default_factory=dict)

    @property
    def description(self) -> str:
        return self.title


_types: dict[str, ConnectorType] | None = None


def _entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def connector_types() -> dict[str, ConnectorType]:
    """Every registered connector type by system, loaded once from the entry points."""
    global _types
    if _types is not None:
        return _types
    found: dict[str, ConnectorType] = {}
    for point in _entry_points():
        try:
            kind = point.load()
        except Exception as exc:  # a broken plug-in names itself, the others still load
            log.error(
                "connector %r (%s) cannot be loaded: %s: %s; fix or uninstall its package",
                point.name,
                point.value,
                type(exc).__name__,
                exc,
            )
            continue
        if not isinstance(kind, ConnectorType):
            log.error(
                "connector %r (%s) is not a ConnectorType; its entry point must name one",
                point.name,
                point.value,
            )
            continue
        if kind.system != point.name:
            log.error(
                "connector entry point %r declares system %r; the names must agree",
                point.name,
                kind.system,
            )
            continue
        if kind.system in found:
            log.error("connector %r is registered twice; the first one is kept", kind.system)
            continue
        found[kind.system] = kind
    if not found:
        raise ConnectionConfigError(
            f"no connector types registered (entry points {ENTRY_POINT_GROUP!r}); reinstall the"
            " package (pip install -e . or make venv)"
        )
    _types = found
    return found


def reset() -> None:
    """Forget the loaded types (tests that register a connector type of their own)."""
    global _types
    _types = None


def get(system: str) -> ConnectorType:
    """The connector type of ``system``; a ``ConnectionConfigError`` names the known ones."""
    types = connector_types()
    kind = types.get(system)
    if kind is None:
        known = ", ".join(sorted(types))
        raise ConnectionConfigError(f"unknown system {system!r} (known: {known})")
    return kind


def writer_targets() -> tuple[str, ...]:
    """The systems that can be written to: the writer's queues by default."""
    return tuple(
        system
        for system, kind in sorted(connector_types().items())
        if kind.capabilities(None).writable
    )


def capabilities_of(system: str, settings: Mapping[str, Any] | None) -> Capabilities:
    """A connection's capabilities from its stored settings (the system's general ones where
    the settings do not validate: that error is reported where the connection is opened)."""
    kind = get(system)
    model: BaseModel | None = None
    if settings is not None:
        try:
            model = kind.settings_model.model_validate(settings)
        except ValueError:
            model = None
    return kind.capabilities(model)


def _cursor_kind(source: Any) -> CursorKind:
    cursor = getattr(source, "cursor", None)
    kind = getattr(cursor, "type", None)
    if kind is not None:
        return CursorKind(str(kind))
    detection = getattr(source, "change_detection", None)
    if detection is None or getattr(detection, "mode", "snapshot") == "snapshot":
        return CursorKind.NONE
    return CursorKind.TIMESTAMP


def _names(items: Any) -> str:
    names = [item.entity for item in items]
    return ", ".join(names) if names else "nothing"


def flow_problems(
    flow: Any,
    where: str,
    source: tuple[str, Capabilities],
    target: tuple[str, Capabilities],
) -> list[str]:
    """What ``flow`` (a ``shared.flows.Flow``, from the file ``where``) asks that its source
    cannot read or its target cannot write: one line each, naming the file, the flow and the
    field; empty when the flow fits both connections."""
    problems: list[str] = []
    head = f"{where}: flow {flow.name!r}"
    (source_system, reads), (target_system, writes) = source, target
    for index, mapping in enumerate(flow.entities):
        at = f"{head}: entities[{index}]"
        entity = mapping.source.entity
        stream = reads.stream(entity)
        if stream is None:
            problems.append(
                f"{at}.source.entity: {source_system} cannot read {entity!r}"
                f" (readable: {_names(reads.streams)})"
            )
        else:
            cursor = _cursor_kind(mapping.source)
            if cursor not in stream.cursors:
                kinds = ", ".join(sorted(str(c) for c in stream.cursors))
                problems.append(
                    f"{at}.source.change_detection: {source_system} cannot follow {entity!r}"
                    f" by a {cursor} cursor (it can: {kinds})"
                )
        name = mapping.target.entity
        sink = writes.sink(name)
        if sink is None:
            problems.append(
                f"{at}.target.entity: {target_system} cannot write {name!r}"
                f" (writable: {_names(writes.sinks)})"
            )
            continue
        match_on = list(mapping.target.match_on)
        if not match_on:
            problems.append(f"{at}.target.match_on: {target_system} needs a field to match on")
        elif sink.match == {MatchStrategy.EXTERNAL_ID} and len(match_on) != 1:
            problems.append(
                f"{at}.target.match_on: {target_system} matches {name!r} on one external id"
                f" field, not {len(match_on)}"
            )
    return problems


def require_source(connector: Any) -> Any:
    """``connector`` as a source, or a ``ConnectionConfigError`` saying it cannot read."""
    from shared.connectors.base import Source

    if not isinstance(connector, Source):
        raise ConnectionConfigError(_cannot(connector, "read from (it is not a source)"))
    return connector


def require_sink(connector: Any) -> Any:
    """``connector`` as a sink, or a ``ConnectionConfigError`` saying it cannot write."""
    from shared.connectors.base import Sink

    if not isinstance(connector, Sink):
        raise ConnectionConfigError(_cannot(connector, "write to (it is not a target)"))
    return connector


def _cannot(connector: Any, what: str) -> str:
    name = getattr(connector, "name", "?")
    system = getattr(connector, "system", "?")
    return f"connection {name!r} ({system}) cannot be {what}; change the flow's connection"
