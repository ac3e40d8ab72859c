"""The connector registry: types from entry points, capabilities, flow checks (issue 18.1)."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import metadata
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import BaseModel

from shared.connections import connector_type
from shared.connectors import registry
from shared.connectors.base import Capabilities, MatchStrategy, SinkDecl, StreamDecl
from shared.connectors.registry import ConnectionConfigError, ConnectorType


class FakeSettings(BaseModel):
    url: str = "http://127.0.0.1:1"


class FakeConnector:
    system = "fake_erp"

    def __init__(self, name: str, settings: Any, secrets: Any, **_: Any) -> None:
        self.name = name


FAKE = ConnectorType(
    system="fake_erp",
    title="A fake ERP",
    settings_model=FakeSettings,
    secrets_model=FakeSettings,
    factory=FakeConnector,
    capabilities=lambda _settings: Capabilities(
        streams=(StreamDecl("Customer", key=("Id",)),),
        sinks=(SinkDecl("Customer", match=frozenset({MatchStrategy.EXTERNAL_ID})),),
    ),
)


@pytest.fixture
def fake_entry_point(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    real = metadata.entry_points

    def entry_points(**kwargs: Any) -> Any:
        found = list(real(**kwargs))
        if kwargs.get("group") == registry.ENTRY_POINT_GROUP:
            found.append(
                metadata.EntryPoint("fake_erp", f"{__name__}:FAKE", registry.ENTRY_POINT_GROUP)
            )
        return found

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    registry.reset()
    yield
    registry.reset()


def test_the_shipped_connectors_come_from_entry_points() -> None:
    registry.reset()
    types = registry.connector_types()
    assert {"syspro", "zoho_crm"} <= set(types)
    assert connector_type("zoho_crm") is types["zoho_crm"]
    assert registry.writer_targets() == ("zoho_crm",)  # SYSPRO is read-only


def test_a_connector_registered_by_another_package_is_found(fake_entry_point: None) -> None:
    assert registry.get("fake_erp") is FAKE
    assert registry.writer_targets() == ("fake_erp", "zoho_crm")
    with pytest.raises(ConnectionConfigError, match=r"unknown system 'nope' \(known: fake_erp,"):
        registry.get("nope")


def test_require_source_and_sink_name_the_connection() -> None:
    connector = SimpleNamespace(name="erp", system="fake_erp")
    with pytest.raises(ConnectionConfigError, match="connection 'erp' \\(fake_erp\\)"):
        registry.require_sink(connector)
    with pytest.raises(ConnectionConfigError, match="not a source"):
        registry.require_source(connector)


def flow(source_entity: str, target_entity: str, match_on: list[str], mode: str) -> Any:
    mapping = SimpleNamespace(
        source=SimpleNamespace(entity=source_entity, change_detection=SimpleNamespace(mode=mode)),
        target=SimpleNamespace(entity=target_entity, match_on=match_on),
    )
    return SimpleNamespace(name="f", entities=[mapping])


def test_flow_problems_name_file_flow_and_field() -> None:
    syspro = ("syspro", registry.capabilities_of("syspro", None))
    zoho = ("zoho_crm", registry.capabilities_of("zoho_crm", {"client_id": "x"}))
    assert (
        registry.flow_problems(
            flow("ArCustomer", "Accounts", ["K"], "snapshot"), "a.yaml", syspro, zoho
        )
        == []
    )
    (problem,) = registry.flow_problems(
        flow("ArCustomer", "Dealz", ["K"], "column"), "a.yaml", syspro, zoho
    )
    assert problem.startswith(
        "a.yaml: flow 'f': entities[0].target.entity: zoho_crm cannot write 'Dealz'"
        " (writable: Accounts, Contacts, Deals,"
    )
    (problem,) = registry.flow_problems(
        flow("Accounts", "ArCustomer", ["K"], "snapshot"), "b.yaml", zoho, syspro
    )
    assert (
        "entities[0].target.entity: syspro cannot write 'ArCustomer' (writable: nothing)" in problem
    )
    fake = ("fake_erp", FAKE.capabilities(None))
    problems = registry.flow_problems(
        flow("Customer", "Customer", ["A", "B"], "column"), "c.yaml", fake, fake
    )
    assert [p.split(": ", 3)[2] for p in problems] == [
        "entities[0].source.change_detection",
        "entities[0].target.match_on",
    ]


def test_zoho_custom_modules_are_declared_in_the_connection() -> None:
    caps = registry.capabilities_of(
        "zoho_crm", {"client_id": "x", "custom_modules": ["ERP_Orders"]}
    )
    assert caps.sink("ERP_Orders") is not None and caps.stream("ERP_Orders") is not None
    assert registry.capabilities_of("zoho_crm", {"client_id": "x"}).sink("ERP_Orders") is None
    assert caps.sink("Invoices").line_items == "Invoiced_Items"  # type: ignore[union-attr]
