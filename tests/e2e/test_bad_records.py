"""Bad records fail alone, end to end (SYSPRO emulator, every service, real broker and database):
a key the database cannot hold, a value with a NUL, composite keys that joining made one, a
record dated in the far future, and an entity whose read fails."""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY

from services.poller.service import FUTURE_TOLERANCE
from services.runtime import topology_from
from shared.bus import (
    H_ERROR,
    H_ERROR_CLASS,
    H_ORIG_EXCHANGE,
    H_ORIG_ROUTING_KEY,
    MAPPER_QUEUE,
    Bus,
)
from shared.mapping import to_datetime
from shared.messages import ChangeBatch, decode
from tests.e2e.conftest import Pipeline, dump_audit, wait_until

TODAY = datetime.now(UTC).strftime("%Y-%m-%dT00:00:00Z")
BAD_KEY = "C\x00BAD"


def _customer(code: str, name: str) -> dict[str, Any]:
    return {"Customer": code, "Name": name, "Currency": "ZAR", "TermsCode": "30"}


def _invoice(customer: str, invoice: str, date: str = TODAY) -> dict[str, Any]:
    return {
        "Customer": customer,
        "Invoice": invoice,
        "DocumentType": "I",
        "InvoiceDate": date,
        "TermsCode": "30",
        "CurrencyValue": 10,
        "InvoiceBal1": 10,
    }


async def _dead_letters(p: Pipeline) -> list[Any]:
    """The letters in the mapper's dead-letter queue, returned to it after reading."""
    bus = await Bus(p.settings.amqp_url.get_secret_value(), topology_from(p.settings)).connect()
    try:
        channel = await bus.connection.channel()  # type: ignore[union-attr]
        queue = await channel.get_queue(bus.topology.dlq(MAPPER_QUEUE))
        letters = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            letters.append(message)
        for message in letters:
            await message.nack(requeue=True)
        await channel.close()
        return letters
    finally:
        await bus.close()


async def _polls(p: Pipeline, entity: str) -> int:
    return await p.pool.fetchval(
        "SELECT count(*) FROM audit_events WHERE stage = 'polled' AND source_ref LIKE $1",
        f"syspro:{entity}:%",
    )


async def test_bad_records_fail_alone_and_every_other_record_lands(
    pipeline_factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    p: Pipeline = await pipeline_factory(customers=20, invoices=40)
    box = p.sandbox
    await box.control(
        "syspro",
        "PUT",
        "/_control/tables/ArCustomer",
        {
            "rows": [
                _customer(BAD_KEY, "Bad key"),
                _customer("NULNAME", "Acme\x00 Ltd"),
                _customer("X|Y", "Customer X|Y"),
                _customer("X", "Customer X"),
                _customer("c0001", "Lower-case code"),  # SYSPRO: one customer with C0001
            ]
        },
    )
    await box.control(
        "syspro",
        "PUT",
        "/_control/tables/ArInvoice",
        {
            "rows": [
                _invoice("X|Y", "1"),  # joined with |, these two were one key
                _invoice("X", "Y|1"),
                _invoice("X", "FUT1", "9999-12-01T00:00:00Z"),  # synced and reported
                _invoice("X", "FUT2", "9999-12-20T00:00:00Z"),  # + 30 days: not a date
                _invoice("C0001", "77"),  # names the customer c0001 in the other case
            ]
        },
    )
    future_before = REGISTRY.get_sample_value(
        "mlc_future_change_values_total", {"flow": "syspro-zoho", "entity": "ArInvoice"}
    )
    p.start()

    async def landed() -> bool:
        return await p.zoho_count("Accounts") >= 24 and await p.zoho_count("Deals") >= 44

    try:
        await wait_until(landed, 90, "24 accounts and 44 deals")
    except AssertionError:
        print(await dump_audit(p.pool))
        raise

    # the customer whose key holds a NUL: dead-lettered with the reason, and audited
    letters = await wait_until(lambda: _dead_letters(p), 20, "the poller's dead letter")
    by_entity: dict[str, list[Any]] = {}
    for letter in letters:
        batch = decode(letter.type, letter.body)
        assert isinstance(batch, ChangeBatch)
        by_entity.setdefault(batch.entity, []).append((letter, batch))
    ((letter, batch),) = by_entity["ArCustomer"]
    assert [e.key for e in batch.events] == [BAD_KEY]
    headers = letter.headers
    assert headers[H_ERROR_CLASS] == "permanent"
    assert "NUL" in headers[H_ERROR] and "'C\\x00BAD'" in headers[H_ERROR]
    assert headers[H_ORIG_EXCHANGE] == f"{p.settings.bus_prefix}.changes"
    assert headers[H_ORIG_ROUTING_KEY] == "syspro.ArCustomer"
    row = await p.pool.fetchrow(
        "SELECT source_ref, error_class, error FROM audit_events"
        " WHERE stage = 'polled' AND status = 'dead_lettered'"
    )
    assert row["source_ref"] == "syspro:ArCustomer:C\ufffdBAD"
    assert row["error_class"] == "permanent" and "NUL" in row["error"]

    accounts = {a["ERP_Customer_No"]: a for a in await box.zoho_records("Accounts")}
    assert len(accounts) == 24 and not any("BAD" in code for code in accounts)
    # a NUL in a value is cleaned, not failed
    assert accounts["NULNAME"]["Account_Name"] == "Acme Ltd"
    # two invoices, two deals, each under its own customer
    deals = {d["ERP_Invoice_Key"]: d for d in await box.zoho_records("Deals")}
    assert deals["X\\|Y|1|I"]["Account_Name"]["id"] == accounts["X|Y"]["id"]
    assert deals["X|Y\\|1|I"]["Account_Name"]["id"] == accounts["X"]["id"]
    # SYSPRO's keys are case-insensitive: one identity C0001, which the invoice's parent
    # reference and match value use too
    links = await p.pool.fetch(
        "SELECT source_key FROM record_links WHERE source_entity = 'ArCustomer'"
        " AND upper(source_key) = 'C0001'"
    )
    assert [r["source_key"] for r in links] == ["C0001"]
    assert deals["C0001|77|I"]["Account_Name"]["id"] == accounts["c0001"]["id"]
    # the far-future invoice is synced and reported; the cursor stays near the time of the read
    assert "X|FUT1|I" in deals
    assert "InvoiceDate is 9999-12-01T00:00:00Z" in caplog.text
    future_after = REGISTRY.get_sample_value(
        "mlc_future_change_values_total", {"flow": "syspro-zoho", "entity": "ArInvoice"}
    )
    assert (future_after or 0) > (future_before or 0)
    cursor = await p.pool.fetchval(
        "SELECT value FROM cursors WHERE flow = 'syspro-zoho' AND entity = 'ArInvoice'"
    )
    assert to_datetime(cursor) <= datetime.now(UTC) + FUTURE_TOLERANCE + timedelta(seconds=5)
    # the one the mapper cannot represent fails alone, naming its field
    failed = await wait_until(
        lambda: p.pool.fetchval(
            "SELECT error FROM audit_events WHERE stage = 'mapped' AND source_ref = $1",
            "syspro:ArInvoice:X|FUT2|I",
        ),
        20,
        "the mapper's failure of X|FUT2|I",
    )
    assert "add_days: date value out of range" in failed and "9999-12-20" in failed

    # later polls read the bad customer again, and do not dead-letter it again
    polled = await p.pool.fetchval("SELECT last_poll_at FROM cursors WHERE entity = 'ArCustomer'")

    async def polled_again() -> bool:
        return await p.pool.fetchval(
            "SELECT last_poll_at > $1 FROM cursors WHERE entity = 'ArCustomer'", polled
        )

    await wait_until(polled_again, 20, "another poll of ArCustomer")
    assert (
        await p.pool.fetchval(
            "SELECT count(*) FROM audit_events WHERE stage = 'polled' AND status = 'dead_lettered'"
        )
        == 1
    )
    letters = await _dead_letters(p)
    customers = [m for m in letters if decode(m.type, m.body).entity == "ArCustomer"]
    assert len(customers) == 1
    await p.stop()


async def test_an_entity_whose_read_fails_does_not_stop_the_next(pipeline_factory) -> None:
    # customers are read from an entity set SYSPRO does not have: every read fails
    p: Pipeline = await pipeline_factory(
        customers=10,
        invoices=30,
        syspro_settings={"entity_sets": {"ArCustomer": "NoSuchSet", "ArInvoice": "ArInvoice"}},
    )
    p.start("poller")
    await wait_until(lambda: _polls(p, "ArInvoice"), 30, "the invoices polled and published")
    assert await _polls(p, "ArInvoice") == 30
    status = await p.pool.fetchrow(
        "SELECT last_status, last_error FROM cursors WHERE entity = 'ArCustomer'"
    )
    assert status["last_status"].startswith("error:"), dict(status)
    assert await _polls(p, "ArCustomer") == 0
    with contextlib.suppress(Exception):
        await p.stop("poller")
