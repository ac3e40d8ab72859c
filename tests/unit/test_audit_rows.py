"""The rows every record gets are built as tuples: they must be what an AuditEvent makes."""

from __future__ import annotations

from datetime import UTC, datetime

from shared.audit import COLUMNS, AuditEvent, outcome_row, published_row

AT = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)


def test_the_published_row_is_the_polled_audit_event() -> None:
    values = {
        "at": AT,
        "actor": "poller@h:1",
        "flow": "syspro-zoho",
        "direction": "syspro->zoho_crm",
        "source_ref": "syspro:ArCustomer:C1",
        "event_id": "e1",
        "message_id": "m1",
        "source_version": "v1",
        "flow_version": 3,
    }
    row = published_row(**values)
    assert len(row) == len(COLUMNS)
    assert row == AuditEvent(stage="polled", status="published", **values).row()


def test_the_outcome_row_is_the_writers_audit_event() -> None:
    values = {
        "at": AT,
        "actor": "writer@h:2",
        "stage": "failed",
        "status": "failed",
        "flow": "syspro-zoho",
        "direction": "syspro->zoho_crm",
        "source_ref": "syspro:ArInvoice:C1|1|I",
        "target_ref": "zoho_crm:Deals:900",
        "event_id": "e1",
        "command_id": "c1",
        "message_id": "m1",
        "error_class": "transient",
        "error": "x" * 5000,
        "transformation": "syspro-zoho/invoices@v2",
        "source_version": "v1",
        "flow_version": 2,
        "mapped_at": AT,
        "mapped_by": "mapper@h:3",
    }
    row = outcome_row(**values)
    assert row == AuditEvent(**values).row()
    named = dict(zip(COLUMNS, row, strict=True))
    assert named["error"] == "x" * 4000 and named["mapped_by"] == "mapper@h:3"
    assert outcome_row(**{**values, "error": ""})[COLUMNS.index("error")] is None
