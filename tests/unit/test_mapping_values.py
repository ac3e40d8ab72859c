"""A value the mapper cannot represent fails its record with a MappingError naming the field,
never an exception that takes the batch with it."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import pytest

from shared.failures import MappingError
from shared.flows import load_flow_file, parse_flow
from shared.mapping import map_record

ROOT = Path(__file__).resolve().parents[2]
FLOW = load_flow_file(ROOT / "flows/syspro-zoho.yaml")
TODAY = date(2026, 11, 1)


def _invoice(**values: Any) -> dict[str, Any]:
    return {
        "Customer": "C000123",
        "Invoice": "100045",
        "DocumentType": "I",
        "InvoiceDate": "2026-10-01T00:00:00Z",
        "TermsCode": "30",
        "CurrencyValue": 10,
        "InvoiceBal1": 10,
        "SalesOrder": "",
        "CustomerPoNumber": "",
        **values,
    }


def test_only_the_invoice_dated_9999_12_20_fails_and_names_its_field() -> None:
    entity = FLOW.entity("invoices")
    ok, _ = map_record(FLOW, entity, _invoice(), today=TODAY)
    assert ok["Closing_Date"] == "2026-10-31"
    with pytest.raises(MappingError) as caught:
        map_record(FLOW, entity, _invoice(InvoiceDate="9999-12-20T00:00:00Z"), today=TODAY)
    text = str(caught.value)
    assert "'syspro-zoho'" in text and "'invoices'" in text
    assert "field 'Closing_Date'" in text and "add_days" in text and "out of range" in text
    assert "9999-12-20" in text
    # and the next record maps as before
    again, _ = map_record(FLOW, entity, _invoice(Invoice="100046"), today=TODAY)
    assert again["Closing_Date"] == "2026-10-31"


def _flow(fields: dict[str, Any]) -> Any:
    return parse_flow(
        {
            "name": "f",
            "source": "s",
            "target": "t",
            "entities": [
                {
                    "name": "things",
                    "source": {"entity": "Thing", "key": ["Code"]},
                    "target": {"entity": "Things", "match_on": ["Code"]},
                    "fields": {"Code": {"from": "Code"}, **fields},
                }
            ],
        }
    )


@pytest.mark.parametrize(
    ("fields", "record", "field", "words"),
    [
        # a number too large for a whole number
        ({"N": {"from": "N", "type": "integer"}}, {"N": 1e308}, "N", ""),
        # a number of days no date can be moved by
        (
            {"D": {"compute": "add_days", "args": {"date": "When", "days": "Days"}}},
            {"When": "2026-01-01", "Days": 10**12},
            "D",
            "add_days",
        ),
        # days that are no number
        (
            {"D": {"compute": "add_days", "args": {"date": "When", "days": "Days"}}},
            {"When": "2026-01-01", "Days": "soon"},
            "D",
            "add_days",
        ),
    ],
)
def test_any_error_on_a_value_is_a_mapping_error_naming_the_field(
    fields: dict[str, Any], record: dict[str, Any], field: str, words: str
) -> None:
    flow = _flow(fields)
    with pytest.raises(MappingError, match=f"field '{field}'") as caught:
        map_record(flow, flow.entities[0], {"Code": "A", **record}, today=TODAY)
    assert words in str(caught.value)
