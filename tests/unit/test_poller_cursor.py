"""The poller's cursor: the high-water mark of a page and the overlap window."""

from __future__ import annotations

from services.poller.service import max_value, widen


def test_the_high_water_mark_is_the_latest_time_whatever_its_spelling() -> None:
    page = [
        {"InvoiceDate": "2026-06-10T00:00:00Z"},
        {"InvoiceDate": "2026-06-11T09:30:00+02:00"},  # 07:30 UTC: the latest
        {"InvoiceDate": "2026-06-11T07:00:00Z"},
        {"InvoiceDate": "2026-06-10T00:00:00Z"},
        {"InvoiceDate": ""},
        {"InvoiceDate": None},
        {},
    ]
    assert max_value(None, page, "InvoiceDate") == "2026-06-11T09:30:00+02:00"
    assert max_value("2026-07-01T00:00:00Z", page, "InvoiceDate") == "2026-07-01T00:00:00Z"
    assert max_value("2026-01-01T00:00:00Z", [], "InvoiceDate") == "2026-01-01T00:00:00Z"
    assert max_value(None, [{"InvoiceDate": ""}], "InvoiceDate") is None


def test_the_cursor_is_widened_by_the_overlap() -> None:
    assert widen("2026-06-11T07:30:00Z", 7 * 86400, "datetime") == "2026-06-04T07:30:00Z"
    assert widen("2026-06-11T09:30:00+02:00", 60, "datetime") == "2026-06-11T07:29:00Z"
    assert widen("000123", 60, "rowversion") == "000123"
    assert widen(None, 60, "datetime") is None
