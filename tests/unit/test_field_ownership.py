"""Field ownership in a pair of flows (issue 18, point 5): a field of the target that the other
side owns is sent when the record is created, never to an existing record, and the audit row
of the write lists the fields held back."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from services.writer.service import Batcher, Outcome, Pending, Ticket
from shared.audit import COLUMNS
from shared.flows import parse_flow
from shared.mapping import map_event
from shared.messages import ChangeEvent, UpsertCommand
from tests.unit.test_flows_mapping import CUSTOMER
from tests.unit.test_neutral_refs import CountingSink

ROOT = Path(__file__).resolve().parents[2]


def _command(owned: list[str] | None) -> UpsertCommand:
    data = yaml.safe_load((ROOT / "flows/syspro-zoho.yaml").read_text())
    if owned is not None:
        data["ownership"] = {"target_owns": owned}
    flow = parse_flow(data)
    event = ChangeEvent.build(
        flow=flow.name,
        flow_version=1,
        source_connection="erp",
        source_system="syspro",
        entity="ArCustomer",
        key="C000123",
        version="v1",
        observed_at=datetime(2026, 11, 1, tzinfo=UTC),
        record=CUSTOMER,
    )
    return map_event(flow, 1, event, target_connection="crm", target_system="zoho_crm")


class _Audit:
    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []

    async def write_rows(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows += rows


def _batcher() -> Batcher:
    batcher = Batcher.__new__(Batcher)
    batcher._known = {}
    batcher.ctx = SimpleNamespace(actor="writer-test", audit=_Audit())  # type: ignore[assignment]
    return batcher


async def _sent(command: UpsertCommand, *, exists: bool) -> tuple[dict[str, Any], Any]:
    ticket = Ticket([None], 1, None, None, None)  # type: ignore[arg-type]
    pending = Pending(command, ticket, 0, ("f", "ArCustomer", "C000123"), exists=exists)
    batcher = _batcher()
    records, ready = await batcher._with_parents(CountingSink({}), [pending], {}, {}, [], [])  # type: ignore[arg-type]
    assert ready == [pending]
    await batcher._audit_outcomes([(pending, Outcome("update", target_id="42"))])
    (row,) = batcher.ctx.audit.rows  # type: ignore[attr-defined]
    return records[0].payload, row[COLUMNS.index("details")]


async def test_a_field_the_other_side_owns_is_not_written_to_an_existing_record() -> None:
    command = _command(["Account_Name", "Phone"])
    assert command.owned_elsewhere == ["Account_Name", "Phone"]
    payload, details = await _sent(command, exists=True)
    assert "Account_Name" not in payload and "Phone" not in payload
    assert payload["ERP_Customer_No"] == "C000123"
    assert details == {"held_back": ["Account_Name", "Phone"]}


async def test_an_owned_field_is_sent_when_the_record_is_created() -> None:
    payload, details = await _sent(_command(["Account_Name"]), exists=False)
    assert payload["Account_Name"] == "Acme Industrial (Pty) Ltd" and details is None


async def test_without_ownership_every_field_is_written_and_the_flow_hash_is_unchanged() -> None:
    command = _command(None)
    assert command.owned_elsewhere == []
    payload, details = await _sent(command, exists=True)
    assert payload["Account_Name"] == "Acme Industrial (Pty) Ltd" and details is None
    data = yaml.safe_load((ROOT / "flows/syspro-zoho.yaml").read_text())
    assert "ownership" not in parse_flow(data).definition()
