"""The one normalisation and the fingerprint that echo suppression compares (issue 18, 5)."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

from shared.identity import fingerprint, is_echo, normalised


def test_normalisation_equates_what_a_target_gives_back_for_what_we_wrote() -> None:
    assert normalised("  Acme ") == normalised("Acme")
    assert normalised(1) == normalised(1.0) == normalised(Decimal("1.00")) == "1"
    assert normalised(12.50) == normalised(Decimal("12.5"))
    assert normalised(None) == normalised("") == normalised("   ")
    assert normalised({"id": "42", "name": "Acme"}) == normalised("42")
    assert normalised(date(2026, 1, 2)) == normalised("2026-01-02")
    assert normalised(True) is True and normalised(True) != normalised(1)


def test_a_read_back_equal_to_the_write_is_an_echo_and_a_changed_one_is_not() -> None:
    written = fingerprint({"Account_Name": "Acme", "Credit_Limit": 2500, "Parent": {"id": "7"}})
    back = {"Account_Name": "Acme ", "Credit_Limit": 2500.0, "Parent": {"id": "7", "name": "P"}}
    assert is_echo(written, {**back, "Modified_Time": "2026-12-04T18:00:00Z"})
    assert not is_echo(written, {**back, "Credit_Limit": 3000})
    assert not is_echo(written, {"Other": 1})  # carries none of what we wrote
    assert not is_echo(None, back) and not is_echo({}, back)
