"""Identity keys: one encoding, unambiguous for composite keys, the same wherever it is built."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from shared.connectors.base import StreamSpec
from shared.connectors.syspro import SysproConnector
from shared.failures import PermanentError
from shared.flows import load_flow_file
from shared.keys import case_sensitive_keys, decode_key, encode_key, key_problem
from shared.mapping import map_event, map_record
from shared.messages import ChangeEvent

ROOT = Path(__file__).resolve().parents[2]
FLOW = load_flow_file(ROOT / "flows/syspro-zoho.yaml")
INVOICES = StreamSpec("ArInvoice", ("Customer", "Invoice", "DocumentType"), "InvoiceDate")
CUSTOMERS = StreamSpec("ArCustomer", ("Customer",))


def _invoice(customer: str, invoice: str, doc: str = "I") -> dict[str, Any]:
    return {
        "Customer": customer,
        "Invoice": invoice,
        "DocumentType": doc,
        "InvoiceDate": "2026-10-01T00:00:00Z",
        "TermsCode": "30",
        "CurrencyValue": 10,
        "InvoiceBal1": 10,
        "SalesOrder": "",
        "CustomerPoNumber": "",
    }


def _event(entity: str, key: str, record: dict[str, Any]) -> ChangeEvent:
    return ChangeEvent(
        flow=FLOW.name,
        flow_version=1,
        source_connection="syspro",
        source_system="syspro",
        entity=entity,
        key=key,
        version="v1",
        observed_at=datetime(2026, 11, 1, tzinfo=UTC),
        record=record,
    )


def test_the_collision_pair_gets_two_keys() -> None:
    one, two = _invoice("X|Y", "1"), _invoice("X", "Y|1")
    assert INVOICES.key_of(one) == "X\\|Y|1|I"
    assert INVOICES.key_of(two) == "X|Y\\|1|I"
    assert INVOICES.key_of(one) != INVOICES.key_of(two)


@pytest.mark.parametrize(
    "values",
    [
        ("X|Y", "1", "I"),
        ("X", "Y|1", "I"),
        ("a\\", "|b", ""),
        ("\\|", "\\\\", "|"),
        ("", "", "I"),
        ("C 1", "2", "I"),
    ],
)
def test_composite_keys_round_trip(values: tuple[str, ...]) -> None:
    key = encode_key(values)
    assert decode_key(key, len(values)) == list(values)


def test_plain_keys_are_what_they_always_were() -> None:
    assert INVOICES.key_of(_invoice(" C000123 ", "100045")) == "C000123|100045|I"
    assert CUSTOMERS.key_of({"Customer": "C000123 "}) == "C000123"
    # one field: the value itself, a | in it is no separator
    assert CUSTOMERS.key_of({"Customer": "A|B\\C"}) == "A|B\\C"
    assert decode_key("A|B\\C", 1) == ["A|B\\C"]


def test_a_key_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="2 components, not 3"):
        decode_key("A|B", 3)
    with pytest.raises(ValueError, match="unfinished escape"):
        decode_key("A|B\\", 2)


def test_keys_the_database_cannot_hold_are_named() -> None:
    assert "NUL" in (key_problem("C\x000001") or "")
    assert "surrogate" in (key_problem("C\udcff") or "")
    assert key_problem("") == "is empty"
    assert key_problem("||", 3) == "is empty"
    assert key_problem("|", 1) is None
    assert key_problem("Ünïcødé") is None


def test_the_syspro_connector_decodes_the_ids_it_fetches() -> None:
    clause = SysproConnector._key_clause(INVOICES, encode_key(("X|Y", "1", "I")))
    assert clause == "(Customer eq 'X|Y' and Invoice eq '1' and DocumentType eq 'I')"
    with pytest.raises(PermanentError, match="does not have the key"):
        SysproConnector._key_clause(INVOICES, "X|Y")


def test_the_invoice_match_value_is_the_identity_key() -> None:
    """Zoho matches deals on ERP_Invoice_Key: the collision pair must not share it either."""
    one, two = _invoice("X|Y", "1"), _invoice("X", "Y|1")
    entity = FLOW.entity("invoices")
    keys = []
    for record in (one, two):
        key = INVOICES.key_of(record)
        command = map_event(
            FLOW,
            1,
            _event("ArInvoice", key, record),
            target_connection="zoho",
            target_system="zoho_crm",
        )
        assert command.payload["ERP_Invoice_Key"] == key == command.source_key
        keys.append(key)
        payload, _ = map_record(FLOW, entity, record, today=date(2026, 11, 1))
        assert payload["ERP_Invoice_Key"] == key
    assert keys[0] != keys[1]
    plain = map_record(FLOW, entity, _invoice("C000123", "100045"), today=date(2026, 11, 1))
    assert plain[0]["ERP_Invoice_Key"] == "C000123|100045|I"  # as the template made it


def test_a_parent_key_is_built_as_the_parents_own_key() -> None:
    """The invoice names its customer by the key the customer's link has."""
    record = _invoice("  AB  C|D ", "1")
    command = map_event(
        FLOW,
        1,
        _event("ArInvoice", INVOICES.key_of(record), record),
        target_connection="zoho",
        target_system="zoho_crm",
    )
    (parent,) = command.parents
    assert parent.source_key == CUSTOMERS.key_of({"Customer": "  AB  C|D "}) == "AB  C|D"


def test_a_composite_parent_key_template_gives_each_key_value() -> None:
    from shared.mapping import compile_key_template

    render = compile_key_template("{A}|{B}", 2)
    assert render({"A": "X|Y", "B": "1"}) == encode_key(("X|Y", "1"))
    assert render({"A": "X", "B": "Y|1"}) == encode_key(("X", "Y|1"))
    with pytest.raises(ValueError, match="gives 1 value"):
        compile_key_template("{A}", 2)


# -- case ------------------------------------------------------------------------------------


def test_syspro_keys_are_case_insensitive_unless_the_connection_says_otherwise() -> None:
    assert case_sensitive_keys("syspro", {}) is False
    assert case_sensitive_keys("syspro", {"case_sensitive_keys": True}) is True
    assert case_sensitive_keys("zoho_crm", {}) is True
    assert case_sensitive_keys("no_such_system", None) is True


def test_a_case_insensitive_source_has_one_key_for_both_spellings() -> None:
    folded = StreamSpec("ArCustomer", ("Customer",), case_sensitive_keys=False)
    assert folded.key_of({"Customer": "c0001"}) == folded.key_of({"Customer": "C0001"}) == "C0001"
    assert CUSTOMERS.key_of({"Customer": "c0001"}) == "c0001"  # case-sensitive: as it is
    # the invoice's parent reference and its match value agree with the customer's key
    record = _invoice("c0001", "7")
    key = encode_key(("c0001", "7", "I"), case_sensitive=False)
    command = map_event(
        FLOW,
        1,
        _event("ArInvoice", key, record),
        target_connection="zoho",
        target_system="zoho_crm",
        case_sensitive_keys=False,
    )
    assert command.parents[0].source_key == "C0001"
    assert command.payload["ERP_Invoice_Key"] == "C0001|7|I"
    payload, parents = map_record(
        FLOW, FLOW.entity("invoices"), record, today=date(2026, 11, 1), case_sensitive_keys=False
    )
    assert parents[0].source_key == "C0001" and payload["ERP_Invoice_Key"] == "C0001|7|I"
