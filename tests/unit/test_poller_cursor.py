"""The poller's cursor: the high-water mark of a page and the overlap window."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.poller.service import _digest, max_value, widen
from shared.messages import content_hash


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


UNTIL = datetime(2026, 6, 11, 12, 0, tzinfo=UTC)  # the time of the read plus the tolerance


def test_a_record_dated_9999_does_not_move_the_cursor_past_the_read() -> None:
    page = [
        {"InvoiceDate": "2026-06-11T07:00:00Z"},
        {"InvoiceDate": "9999-12-31T23:59:59Z"},
        {"InvoiceDate": "9999-12-20"},
    ]
    mark = max_value("2026-06-01T00:00:00Z", page, "InvoiceDate", until=UNTIL)
    assert mark == "2026-06-11T12:00:00Z"
    # the next poll reads from there, widened: records changed after this read are seen
    assert widen(mark, 600, "datetime") == "2026-06-11T11:50:00Z"
    # without an outlier, the latest value as it was spelled
    assert max_value(None, page[:1], "InvoiceDate", until=UNTIL) == "2026-06-11T07:00:00Z"


def test_a_cursor_left_in_the_future_is_brought_back() -> None:
    assert max_value("9999-12-31T23:59:59Z", [], "InvoiceDate", until=UNTIL) == (
        "2026-06-11T12:00:00Z"
    )


def test_a_value_that_is_no_time_never_becomes_the_cursor() -> None:
    page = [{"InvoiceDate": "N/A"}, {"InvoiceDate": "2026-06-10"}]
    assert max_value("garbage", page, "InvoiceDate", until=UNTIL) == "2026-06-10"
    assert max_value(None, [{"InvoiceDate": "N/A"}], "InvoiceDate", until=UNTIL) is None


def test_widening_the_first_day_of_year_1_does_not_overflow() -> None:
    assert widen("0001-01-01T00:00:00Z", 7 * 86400, "datetime") == "0001-01-01T00:00:00Z"
    with pytest.raises(ValueError):
        widen("N/A", 60, "datetime")


def test_the_page_digest_is_the_content_hash_or_none_for_text_no_database_takes() -> None:
    record = {"Customer": "C1", "Name": "Ünïcødé", "Limit": 12.5, "Lines": [{"a": None}]}
    assert _digest(record) == content_hash(record)
    assert _digest([record, "2026-06-11"]) == content_hash([record, "2026-06-11"])
    assert _digest({**record, "Name": "A\x00"}) is None
    assert _digest({**record, "Lines": [{"a": "\udcff"}]}) is None
    # text that merely spells the escape costs a clean, no more
    assert _digest({"Name": "\\u0000"}) is None
