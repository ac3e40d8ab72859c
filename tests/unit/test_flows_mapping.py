"""Flow files and the mapping engine."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from shared.failures import MappingError
from shared.flows import FlowFileError, load_flow_file, parse_duration, parse_flow
from shared.mapping import map_event, map_record, to_decimal
from shared.messages import (
    ChangeEvent,
    CommandBatch,
    MessageFormatError,
    ParentRef,
    UpsertCommand,
    construct,
    content_hash,
    decode,
    encode,
)

ROOT = Path(__file__).resolve().parents[2]
FLOW = load_flow_file(ROOT / "flows/syspro-zoho.yaml")

CUSTOMER = {
    "Customer": "C000123",
    "Name": "  Acme Industrial (Pty) Ltd ",
    "Telephone": "011 555 0100",
    "SoldToAddr1": "12 Main Road",
    "SoldToAddr2": "",
    "SoldToAddr3": "Johannesburg",
    "SoldToAddr4": "Gauteng",
    "SoldToAddr5": "South Africa",
    "SoldPostalCode": "2001",
    "CreditLimit": 250000,
    "Currency": "zar",
    "TermsCode": "30",
    "Contact": "Jane Doe",
    "Email": "jane@acme.example",
    "CustomerOnHold": "N",
}
INVOICE = {
    "Customer": "C000123",
    "Invoice": "100045",
    "DocumentType": "I",
    "InvoiceDate": "2026-10-01T00:00:00Z",
    "TermsCode": "30",
    "CurrencyValue": 1234.5,
    "InvoiceBal1": 1234.5,
    "SalesOrder": "SO1",
    "CustomerPoNumber": "PO-9",
}


def test_shipped_flow_maps_a_customer() -> None:
    payload, parents = map_record(FLOW, FLOW.entity("customers"), CUSTOMER, today=date(2026, 11, 1))
    assert parents == []
    assert payload["Account_Name"] == "Acme Industrial (Pty) Ltd"
    assert payload["ERP_Customer_No"] == "C000123"
    assert payload["Billing_Street"] == "12 Main Road"
    assert payload["Credit_Limit"] == 250000.0
    assert payload["Currency_Code"] == "ZAR"
    assert payload["Payment_Terms"] == "Net 30"
    assert payload["On_Hold"] is False


@pytest.mark.parametrize(
    ("balance", "today", "status", "stage", "overdue_days"),
    [
        (0, date(2026, 11, 20), "paid", "Closed Won", 0),
        (100, date(2026, 10, 20), "open", "Proposal/Price Quote", 0),
        (100, date(2026, 11, 20), "overdue", "Negotiation/Review", 20),
    ],
)
def test_invoice_stage_from_payment_status(
    balance: float, today: date, status: str, stage: str, overdue_days: int
) -> None:
    record = {**INVOICE, "InvoiceBal1": balance}
    payload, parents = map_record(FLOW, FLOW.entity("invoices"), record, today=today)
    assert payload["Closing_Date"] == "2026-10-31"  # due date from the terms table
    assert payload["Payment_Status"] == status
    assert payload["Stage"] == stage
    assert payload["Days_Overdue"] == overdue_days
    assert payload["ERP_Invoice_Key"] == "C000123|100045|I"
    assert [(p.field, p.source_entity, p.source_key) for p in parents] == [
        ("Account_Name", "ArCustomer", "C000123")
    ]


@pytest.mark.parametrize(
    ("balance", "status", "overdue_days"),
    [
        (0.0, "paid", 0),
        (-0.0, "paid", 0),
        (-12.5, "paid", 0),
        (1e-9, "overdue", 20),
        ("0.00", "paid", 0),
        (" 1,250.00 ", "overdue", 20),
        ("-3", "paid", 0),
        (None, "paid", 0),
        ("", "paid", 0),
        (7, "overdue", 20),
    ],
)
def test_balances_of_every_json_shape_give_the_same_status(
    balance: object, status: str, overdue_days: int
) -> None:
    payload, _ = map_record(
        FLOW, FLOW.entity("invoices"), {**INVOICE, "InvoiceBal1": balance}, today=date(2026, 11, 20)
    )
    assert (payload["Payment_Status"], payload["Days_Overdue"]) == (status, overdue_days)


def _one_entity(fields: dict[str, object], match_on: str) -> dict[str, object]:
    """A flow definition of one entity T (key K) into A, with these fields."""
    return {
        "name": "demo",
        "source": "a",
        "target": "b",
        "entities": [
            {
                "name": "t",
                "source": {"entity": "T", "key": ["K"]},
                "target": {"entity": "A", "match_on": [match_on]},
                "fields": fields,
            }
        ],
    }


@pytest.mark.parametrize("balance", [float("nan"), "abc", True])
def test_a_balance_that_is_no_number_fails_the_status_not_the_flow(balance: object) -> None:
    status = {"compute": "payment_status", "args": {"balance": "Bal", "due_date": "Due"}}
    flow = parse_flow(_one_entity({"K": {"from": "K"}, "Status": status}, "K"), origin="x.yaml")
    record = {"K": "1", "Bal": balance, "Due": "2026-01-01"}
    with pytest.raises(MappingError, match=r"field 'Status': payment_status: "):
        map_record(flow, flow.entity("t"), record, today=date(2026, 11, 20))
    ok, _ = map_record(flow, flow.entity("t"), {**record, "Bal": 5}, today=date(2026, 11, 20))
    assert ok["Status"] == "overdue"


@pytest.mark.parametrize(
    ("value", "places", "expected"),
    [
        (2.675, 2, 2.68),  # rounded from its decimal text, half to even, as a person reads it
        (0.125, 2, 0.12),
        (1234.5, 2, 1234.5),
        ("1,234.565", 2, 1234.56),
        (" 10 ", 0, 10.0),
        (3, 2, 3.0),
        (1.23456789, 15, 1.23456789),
    ],
)
def test_decimals_round_from_their_text(value: object, places: int, expected: float) -> None:
    assert to_decimal(value, places) == expected


@pytest.mark.parametrize("days", [30, 30.0, "30", " 30 ", Decimal("30")])
def test_terms_days_of_any_shape_add_the_same_days(days: object) -> None:
    flow = FLOW.model_copy(deep=True)
    flow.lookups["terms_days"]["30"] = days
    payload, _ = map_record(flow, flow.entity("invoices"), INVOICE, today=date(2026, 10, 2))
    assert payload["Closing_Date"] == "2026-10-31"


def test_unknown_terms_code_falls_back_to_default() -> None:
    record = {**INVOICE, "TermsCode": "ZZ"}
    payload, _ = map_record(FLOW, FLOW.entity("invoices"), record, today=date(2026, 10, 2))
    assert payload["Closing_Date"] == "2026-10-31"


def test_mapping_errors_name_flow_entity_and_field() -> None:
    record = {**CUSTOMER, "Currency": "rand"}
    with pytest.raises(
        MappingError, match="flow 'syspro-zoho', entity 'customers', field 'Currency_Code'"
    ):
        map_record(FLOW, FLOW.entity("customers"), record, today=date(2026, 1, 1))
    with pytest.raises(MappingError, match="'Account_Name': required value is empty"):
        map_record(
            FLOW, FLOW.entity("customers"), {**CUSTOMER, "Name": " "}, today=date(2026, 1, 1)
        )
    missing = dict(CUSTOMER)
    del missing["Telephone"]
    with pytest.raises(MappingError, match="source column 'Telephone' is missing"):
        map_record(FLOW, FLOW.entity("customers"), missing, today=date(2026, 1, 1))
    with pytest.raises(MappingError, match="not a number"):
        map_record(
            FLOW,
            FLOW.entity("invoices"),
            {**INVOICE, "CurrencyValue": "abc"},
            today=date(2026, 1, 1),
        )


def _event(
    flow_version: int, entity: str, key: str, version: str, record: dict[str, object]
) -> ChangeEvent:
    return ChangeEvent(
        flow="syspro-zoho",
        flow_version=flow_version,
        source_connection="syspro",
        source_system="syspro",
        entity=entity,
        key=key,
        version=version,
        observed_at=datetime(2026, 11, 1, tzinfo=UTC),
        record=record,
    )


def test_map_event_carries_lineage_and_stable_hash() -> None:
    event = _event(3, "ArCustomer", "C000123", "h1", CUSTOMER)
    one = map_event(FLOW, 3, event, target_connection="zoho", target_system="zoho_crm")
    two = map_event(FLOW, 3, event, target_connection="zoho", target_system="zoho_crm")
    assert one.transformation == "syspro-zoho/customers@v3"
    assert one.event_id == event.event_id and one.source_ref == "syspro:ArCustomer:C000123"
    assert one.payload_hash == two.payload_hash and one.command_id != two.command_id
    changed = event.model_copy(update={"record": {**CUSTOMER, "Telephone": "011 000"}})
    three = map_event(FLOW, 3, changed, target_connection="zoho", target_system="zoho_crm")
    assert three.payload_hash != one.payload_hash


def test_flow_file_errors_name_file_flow_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: demo\nsource: a\ntarget: b\nentities:\n"
        "  - name: things\n    source: {entity: T, key: [K]}\n"
        "    target: {entity: Accounts, match_on: [X]}\n"
        "    fields:\n      X: {from: K, lookup: nope}\n"
    )
    with pytest.raises(FlowFileError) as info:
        load_flow_file(bad)
    text = str(info.value)
    assert str(bad) in text and "flow 'demo'" in text
    assert "entities[0] (things).fields.X: unknown lookup table 'nope'" in text

    with pytest.raises(
        FlowFileError, match=r"entities\[0\]\.fields\.X: Value error, give exactly one"
    ):
        parse_flow(
            _one_entity({"X": {"from": "K", "template": "{K}"}}, "X"),
            origin="inline.yaml",
        )
    (tmp_path / "y.yaml").write_text("name: [unclosed\n")
    with pytest.raises(FlowFileError, match="not valid YAML"):
        load_flow_file(tmp_path / "y.yaml")


def test_durations() -> None:
    assert parse_duration("10m") == 600
    assert parse_duration("45d") == 45 * 86400
    assert parse_duration(30) == 30
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("ten minutes")


def test_records_are_projected_to_the_columns_the_flow_reads() -> None:
    customers, invoices = FLOW.entity("customers"), FLOW.entity("invoices")
    assert set(customers.source_columns) == set(CUSTOMER)
    # key, change field, columns, template placeholders, computed arguments, parent key
    assert set(invoices.source_columns) == set(INVOICE)
    wide = {"Salesperson": "S1", "TimeStamp": "AAAAAAAAB9E=", **dict(reversed(CUSTOMER.items()))}
    projected = customers.project(wide)
    assert list(projected) == sorted(CUSTOMER)  # sorted, whatever order the source sent
    assert "Salesperson" not in projected and "TimeStamp" not in projected
    # an edit nobody maps is no change: same projection, same content hash
    assert content_hash(customers.project({**wide, "Salesperson": "S2"})) == content_hash(projected)
    # a column the source did not send stays absent, and mapping it fails with its name
    partial = customers.project({k: v for k, v in wide.items() if k != "Telephone"})
    with pytest.raises(MappingError, match="source column 'Telephone' is missing"):
        map_record(FLOW, customers, partial, today=date(2026, 1, 1))


def test_a_flow_copy_with_other_lookup_tables_maps_with_its_own() -> None:
    flow = load_flow_file(ROOT / "flows/syspro-zoho.yaml")
    customers = flow.entity("customers")
    assert map_record(flow, customers, CUSTOMER, today=date(2026, 1, 1))[0]["Payment_Terms"] == (
        "Net 30"
    )
    copy = flow.model_copy(update={"lookups": {**flow.lookups, "terms_names": {"30": "30 days"}}})
    assert copy.entity("customers") is customers  # the entity mapping is shared
    payload, _ = map_record(copy, customers, CUSTOMER, today=date(2026, 1, 1))
    assert payload["Payment_Terms"] == "30 days"
    assert map_record(flow, customers, CUSTOMER, today=date(2026, 1, 1))[0]["Payment_Terms"] == (
        "Net 30"
    )


def test_the_flow_version_does_not_depend_on_the_order_of_keys() -> None:
    data = yaml.safe_load((ROOT / "flows/syspro-zoho.yaml").read_text())
    reordered = {**data, "lookups": dict(reversed(list(data["lookups"].items())))}
    assert parse_flow(reordered).definition_hash() == parse_flow(data).definition_hash()
    # nor does the projection of a record (a flow read back from jsonb has its fields sorted)
    fields = data["entities"][0]["fields"]
    flipped = {
        **data,
        "entities": [{**data["entities"][0], "fields": dict(reversed(fields.items()))}],
    }
    one, two = parse_flow(data).entity("customers"), parse_flow(flipped).entity("customers")
    assert content_hash(one.project(CUSTOMER)) == content_hash(two.project(CUSTOMER))
    changed = {**data, "poll_interval": "5m"}
    assert parse_flow(changed).definition_hash() != parse_flow(data).definition_hash()


def test_a_mapped_command_is_the_model_the_writer_decodes() -> None:
    """The mapper builds commands without validation; what it sends must decode to the same
    command, every field set (parents included), and a partial set of values is completed."""
    event = _event(2, "ArInvoice", "C000123|100001|I", "v1", INVOICE)
    command = map_event(FLOW, 2, event, target_connection="zoho", target_system="zoho_crm")
    decoded = UpsertCommand.model_validate_json(command.model_dump_json())
    assert decoded == command
    assert decoded.model_fields_set == command.model_fields_set == set(UpsertCommand.model_fields)
    assert decoded.parents[0] == ParentRef(
        field="Account_Name",
        flow="syspro-zoho",
        source_entity="ArCustomer",
        source_key=INVOICE["Customer"],
        target_entity="Accounts",
        match_field="ERP_Customer_No",
        match_value=INVOICE["Customer"],
    )
    partial = construct(
        ParentRef,
        {"field": "F", "flow": "f", "source_entity": "E", "source_key": "1", "target_entity": "T"},
    )
    assert partial.target_id is None and partial.match_field is None
    # built models share their set of fields: changing or copying one leaves the others alone
    other = map_event(FLOW, 2, event, target_connection="zoho", target_system="zoho_crm")
    copy = other.model_copy(update={"source_version": "v2"})
    other.source_version = "v3"
    assert (command.source_version, other.source_version, copy.source_version) == ("v1", "v3", "v2")
    assert command.model_fields_set == copy.model_fields_set == set(UpsertCommand.model_fields)


def test_a_command_without_a_time_zone_is_refused_at_the_boundary() -> None:
    event = _event(1, "ArCustomer", "C000123", "h1", CUSTOMER)
    command = map_event(FLOW, 1, event, target_connection="zoho", target_system="zoho_crm")
    body = encode(
        CommandBatch(target_connection="zoho", target_entity="Accounts", commands=[command])
    )
    assert decode("command_batch", body) == CommandBatch.model_validate_json(body)
    naive = body.replace(b'"2026-11-01T00:00:00Z"', b'"2026-11-01T00:00:00"')
    assert naive != body
    with pytest.raises(MessageFormatError, match="observed_at"):
        decode("command_batch", naive)
