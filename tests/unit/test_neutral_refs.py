"""Neutral parent references and line items (issue 18, point 3): the mapper builds them
target-neutral, the writer fills the parents' target ids with ONE batched lookup per flush and
hands the sink neutral records."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.writer.service import Batcher, Pending, _zoho_shaped
from shared.connectors.base import SinkRecord, WriteOutcome
from shared.flows import load_flow_file
from shared.mapping import map_event
from shared.messages import ChangeEvent, LineItem, ParentRef, UpsertCommand

ROOT = Path(__file__).resolve().parents[2]


class CountingSink:
    """A sink of the new protocol that counts its lookup calls."""

    refs_need_ids = True
    max_batch = 100

    def __init__(self, ids: dict[str, str]) -> None:
        self.ids = ids
        self.calls: list[tuple[str, str, list[str]]] = []

    async def find_ids(self, entity: str, field: str, values: Sequence[str]) -> dict[str, str]:
        self.calls.append((entity, field, list(values)))
        return {v: self.ids[v] for v in values if v in self.ids}

    async def upsert(
        self, entity: str, records: list[SinkRecord], match_on: list[str]
    ) -> list[WriteOutcome]:
        return [WriteOutcome(True, target_id="1", action="insert") for _ in records]


def _child(key: str, parent: str) -> UpsertCommand:
    return UpsertCommand.build(
        event_id=f"e-{key}",
        flow="f",
        flow_version=1,
        transformation="f/invoices@v1",
        source_system="syspro",
        source_entity="ArInvoice",
        source_key=key,
        source_version="v1",
        observed_at=datetime(2026, 1, 1, tzinfo=UTC),
        target_connection="crm",
        target_system="zoho_crm",
        target_entity="Deals",
        match_on=["ERP_Invoice_Key"],
        payload={"ERP_Invoice_Key": key},
        parents=[
            ParentRef(
                field="Account_Name",
                flow="f",
                source_entity="ArCustomer",
                source_key=parent,
                target_entity="Accounts",
                match_field="ERP_Customer_No",
            )
        ],
    )


def _batcher() -> Batcher:
    batcher = Batcher.__new__(Batcher)
    batcher._known = {}
    return batcher


async def test_the_parents_of_a_100_record_batch_cost_one_lookup_call() -> None:
    commands = [_child(f"I{i}", f"C{i}") for i in range(100)]
    pending = [
        Pending(c, None, i, (c.flow, c.source_entity, c.source_key)) for i, c in enumerate(commands)
    ]  # type: ignore[arg-type]
    refs = {(r.flow, r.source_entity, r.source_key): r for c in commands for r in c.parents}
    sink = CountingSink({f"C{i}": f"9{i}" for i in range(100)})
    results: list[Any] = []
    records, ready = await _batcher()._with_parents(sink, pending, refs, {}, results, [])  # type: ignore[arg-type]
    assert len(sink.calls) == 1
    entity, field, values = sink.calls[0]
    assert (entity, field, sorted(values)) == (
        "Accounts",
        "ERP_Customer_No",
        sorted(f"C{i}" for i in range(100)),
    )
    assert results == [] and len(ready) == 100
    # the references stay neutral, with the target id filled: the sink renders them
    assert records[7].refs[0].target_id == "97" and records[7].payload == {"ERP_Invoice_Key": "I7"}


async def test_a_parent_in_the_links_is_not_looked_up_and_a_missing_one_fails_the_child() -> None:
    commands = [_child("I1", "C1"), _child("I2", "C2")]
    pending = [
        Pending(c, None, i, (c.flow, c.source_entity, c.source_key)) for i, c in enumerate(commands)
    ]  # type: ignore[arg-type]
    refs = {(r.flow, r.source_entity, r.source_key): r for c in commands for r in c.parents}
    sink = CountingSink({})
    links = {("f", "ArCustomer", "C1"): {"target_id": "500"}}
    results: list[Any] = []
    records, _ = await _batcher()._with_parents(sink, pending, refs, links, results, [])  # type: ignore[arg-type]
    assert sink.calls == [("Accounts", "ERP_Customer_No", ["C2"])]
    assert [r.refs[0].target_id for r in records] == ["500"]
    assert len(results) == 1 and "C2" in results[0][1].error


def test_line_items_are_neutral_and_the_old_zoho_sink_gets_them_rendered() -> None:
    flow = load_flow_file(ROOT / "flows/syspro-zoho-invoices.yaml")
    entity = next(e for e in flow.entities if "Invoiced_Items" in e.fields)
    record = {
        "Customer": "C1",
        "Invoice": "100045",
        "DocumentType": "I",
        "SalesOrder": "S1",
        "CustomerPoNumber": "PO",
        "InvoiceDate": "2026-10-01T00:00:00Z",
        "TermsCode": "30",
        "CurrencyValue": 125.5,
        "InvoiceBal1": 125.5,
    }
    event = ChangeEvent.build(
        flow=flow.name,
        flow_version=1,
        source_connection="erp",
        source_system="syspro",
        entity=entity.source.entity,
        key="C1|100045|I",
        version="v1",
        observed_at=datetime(2026, 10, 2, tzinfo=UTC),
        record=record,
    )
    command = map_event(flow, 1, event, target_connection="crm", target_system="zoho_crm")
    assert command.source_connection == "erp"
    assert command.lines_field == "Invoiced_Items" and "Invoiced_Items" not in command.payload
    (line,) = command.lines
    assert isinstance(line, LineItem) and line.unit_price == 125.5 and line.quantity == 1
    assert line.product is not None and line.product.target_id  # a ready target id
    assert UpsertCommand.model_validate_json(command.model_dump_json()) == command
    rendered = _zoho_shaped(SinkRecord(command.payload, [], command.lines), "Invoiced_Items")
    assert rendered["Invoiced_Items"] == [
        {
            "Quantity": 1.0,
            "List_Price": 125.5,
            "Product_Name": {"id": line.product.target_id},
            "Description": "SYSPRO invoice 100045",
        }
    ]


def test_a_command_from_before_neutral_references_still_decodes() -> None:
    old = _child("I1", "C1").model_dump(
        mode="json", exclude={"lines", "lines_field", "source_connection"}
    )
    old["parents"][0]["shape"] = "id_object"
    decoded = UpsertCommand.model_validate(old)
    assert decoded.source_connection == "" and decoded.lines == []
    assert decoded.parents[0].target_id is None
