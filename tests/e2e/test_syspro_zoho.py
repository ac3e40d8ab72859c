"""SYSPRO -> Zoho CRM end to end: emulators over HTTP, poller, mapper and writer, the real
RabbitMQ and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from emulators.sandbox import duplicate_creates
from services.ops import audit_query
from shared.flow_store import FlowStore
from tests.e2e.conftest import Pipeline, dump_audit, wait_until


async def _landed(p: Pipeline, accounts: int, deals: int) -> bool:
    return await p.zoho_count("Accounts") >= accounts and await p.zoho_count("Deals") >= deals


async def _idle(p: Pipeline) -> bool:
    """Every published record has an outcome (written, skipped or failed) in the audit."""
    polled = await p.audit_count("polled")
    done = await p.pool.fetchval(
        "SELECT count(DISTINCT event_id) FROM audit_events"
        " WHERE stage IN ('written', 'skipped') OR (stage = 'failed' AND error_class = 'permanent')"
    )
    return polled > 0 and done >= polled


def _by(records: list[dict[str, Any]], field: str) -> dict[str, dict[str, Any]]:
    return {r[field]: r for r in records}


async def _check_links(p: Pipeline) -> None:
    accounts = _by(await p.sandbox.zoho_records("Accounts"), "ERP_Customer_No")
    deals = await p.sandbox.zoho_records("Deals")
    for deal in deals:
        customer = deal["ERP_Invoice_Key"].split("|")[0]
        assert deal["Account_Name"]["id"] == accounts[customer]["id"], deal["ERP_Invoice_Key"]


async def test_backfill_lands_once_linked_then_no_writes_then_update(pipeline_factory) -> None:
    p: Pipeline = await pipeline_factory(customers=1000, invoices=3000)
    started = time.monotonic()
    p.start()
    await wait_until(lambda: _landed(p, 1000, 3000), 180, "1,000 accounts and 3,000 deals")
    elapsed = time.monotonic() - started
    await wait_until(lambda: _idle(p), 60, "every record audited")
    stats = await p.sandbox.zoho_stats()
    print(
        f"\n4,000 records in {elapsed:.1f} s = {4000 / elapsed:.0f} records/s end to end;"
        f" Zoho write calls {stats['write_calls']} ({stats['write_calls'] / 4:.1f} per 1,000),"
        f" credits {stats['credits_used']}, token grants {stats['tokens_issued']}"
    )
    assert await p.zoho_count("Accounts") == 1000
    assert await p.zoho_count("Deals") == 3000
    assert duplicate_creates(stats) == 0, stats["duplicates_by_field"]
    assert stats["records_inserted"] == 4000
    assert stats["write_calls"] <= 42  # 10 + 30 full batches of 100, small slack for timing
    await _check_links(p)

    # Two more polls with nothing changed: zero write calls.
    await _two_more_polls(p, await p.pool.fetchval("SELECT max(last_poll_at) FROM cursors"))
    assert (await p.sandbox.zoho_stats())["write_calls"] == stats["write_calls"]

    # A changed customer is updated, not duplicated.
    rows = await p.sandbox.syspro_rows("ArCustomer")
    key = rows[17]["Customer"]
    await p.sandbox.control(
        "syspro", "PATCH", f"/_control/tables/ArCustomer/{key}", {"Telephone": "011 999 1234"}
    )

    async def updated() -> bool:
        accounts = _by(await p.sandbox.zoho_records("Accounts"), "ERP_Customer_No")
        return accounts[key.strip()]["Phone"] == "011 999 1234"

    await wait_until(updated, 30, "the changed customer in Zoho")
    after = await p.sandbox.zoho_stats()
    assert after["records"]["Accounts"] == 1000
    assert after["records_updated"] == 1
    assert duplicate_creates(after) == 0
    # the record's whole lineage is in the audit trail: the mapping step is told by the
    # writer's row, which says when and by which mapper replica its command was mapped
    ref = f"syspro:ArCustomer:{key.strip()}"
    steps = (await audit_query.lineage(p.pool, ref))[-3:]
    assert [(r["stage"], r["source_ref"]) for r in steps] == [
        ("polled", ref),
        ("mapped", ref),
        ("written", ref),
    ]
    polled, mapped, written = steps
    assert polled["at"] <= mapped["at"] <= written["at"]
    # the replica that mapped (here one process runs every service: ``all@host:pid``)
    assert mapped["actor"].startswith("all@") and mapped["actor"] == written["actor"]
    assert mapped["event_id"] == polled["event_id"] == written["event_id"]
    assert mapped["command_id"] == written["command_id"]
    assert mapped["transformation"] == "syspro-zoho/customers@v1"
    assert written["source_version"] == polled["source_version"]
    assert written["flow_version"] == polled["flow_version"] == 1

    # An edit of a column the flow does not read (the salesperson) is no change: nothing is
    # published for it, nothing written.
    other = rows[18]["Customer"]
    polled = await p.audit_count("polled")
    await p.sandbox.control(
        "syspro", "PATCH", f"/_control/tables/ArCustomer/{other}", {"Salesperson": "ZZZ"}
    )
    await _two_more_polls(p, await p.pool.fetchval("SELECT now()"))
    assert await p.audit_count("polled") == polled
    assert (await p.sandbox.zoho_stats())["write_calls"] == after["write_calls"]

    # A resync reads, maps and decides every record again: all unchanged, no call to Zoho.
    mark = await p.pool.fetchval("SELECT max(id) FROM audit_events")
    await FlowStore(p.pool).resync("syspro-zoho")

    async def decided_again() -> int:
        return await p.pool.fetchval(
            "SELECT count(*) FROM audit_events WHERE id > $1 AND stage IN ('written', 'skipped')",
            mark,
        )

    await wait_until(lambda: _at_least(decided_again, 4000), 60, "4,000 records decided again")
    outcomes = await p.pool.fetch(
        "SELECT stage, status, count(*) AS n FROM audit_events WHERE id > $1"
        " AND stage IN ('written', 'skipped') GROUP BY 1, 2",
        mark,
    )
    assert {(r["stage"], r["status"]): r["n"] for r in outcomes} == {("skipped", "unchanged"): 4000}
    assert (await p.sandbox.zoho_stats())["write_calls"] == after["write_calls"]
    await p.stop()


async def _two_more_polls(p: Pipeline, since: Any) -> None:
    """Every entity of the flow (polled every 2 s) polled at least 2 s after ``since``."""
    await wait_until(
        lambda: p.pool.fetchval(
            "SELECT min(last_poll_at) > $1::timestamptz + interval '2 seconds' FROM cursors",
            since,
        ),
        30,
        "two more polls",
    )


async def _at_least(count: Callable[[], Awaitable[int]], n: int) -> bool:
    return await count() >= n


async def test_invoice_before_its_customer_lands_linked(pipeline_factory) -> None:
    p: Pipeline = await pipeline_factory(customers=5, invoices=0)
    await p.sandbox.control(
        "syspro",
        "PUT",
        "/_control/tables/ArInvoice",
        {
            "rows": [
                {
                    "Customer": "0999999",
                    "Invoice": "700001",
                    "DocumentType": "I",
                    "InvoiceDate": "2026-11-01T00:00:00Z",
                    "TermsCode": "30",
                    "CurrencyValue": 500.0,
                    "InvoiceBal1": 500.0,
                }
            ]
        },
    )
    p.start()
    await wait_until(
        lambda: p.audit_count("failed", "failed"), 30, "the orphan invoice to wait for its parent"
    )
    assert await p.zoho_count("Deals") == 0
    await p.sandbox.control(
        "syspro",
        "PUT",
        "/_control/tables/ArCustomer",
        {"rows": [{"Customer": "0999999", "Name": "Late Arrival Ltd", "Currency": "USD"}]},
    )
    try:
        await wait_until(lambda: _landed(p, 6, 1), 60, "the customer and then its invoice")
    except AssertionError:
        print(await dump_audit(p.pool))
        raise
    await _check_links(p)
    await p.stop()


async def test_expired_token_and_session_mid_run_lose_nothing(pipeline_factory) -> None:
    # The pipeline reads SYSPRO over OData (Basic, stateless): expiring every e.net session
    # must not disturb it. The connector's own re-logon on an expired session, mid-read and
    # between pages, is proven in tests/integration/test_connector_syspro_emulator.py.
    p: Pipeline = await pipeline_factory(
        customers=600, invoices=1200, zoho_options={"max_concurrency": 20}
    )
    await p.sandbox.control("zoho", "POST", "/_control/faults", {"latency_ms": 40})
    p.start()
    await wait_until(lambda: p.zoho_count("Accounts"), 60, "the first accounts")
    await p.sandbox.control("zoho", "POST", "/_control/expire_tokens", {})
    await p.sandbox.control("syspro", "POST", "/_control/expire_sessions", {})
    await wait_until(lambda: _landed(p, 600, 1200), 120, "every record after the expiries")
    stats = await p.sandbox.zoho_stats()
    assert stats["tokens_issued"] >= 2
    assert stats["records"] == {**stats["records"], "Accounts": 600, "Deals": 1200}
    assert duplicate_creates(stats) == 0
    assert stats["statuses"].get("401", 0) >= 1  # the expired token was refused once, then renewed
    await p.stop()


async def test_throttling_5xx_and_an_invalid_record(pipeline_factory) -> None:
    p: Pipeline = await pipeline_factory(customers=400, invoices=0)
    rows = await p.sandbox.syspro_rows("ArCustomer")
    bad = rows[123]["Customer"]
    await p.sandbox.control(
        "syspro", "PATCH", f"/_control/tables/ArCustomer/{bad}", {"Email": "not-an-e-mail"}
    )
    await p.sandbox.control(
        "zoho",
        "POST",
        "/_control/faults",
        {
            "throttle_next": 2,
            "fail_next": 2,
            "error_rate": 0.1,
            "throttle_rate": 0.1,
            "path_prefix": "/crm/",  # the API host; the accounts server is another host
        },
    )
    p.start()
    try:
        await wait_until(lambda: _landed(p, 399, 0), 120, "399 valid accounts despite faults")
    except AssertionError:
        print(await dump_audit(p.pool, 30))
        print(await p.sandbox.zoho_stats())
        raise
    await p.sandbox.control(
        "zoho", "POST", "/_control/faults", {"error_rate": 0, "throttle_rate": 0}
    )
    await wait_until(
        lambda: p.pool.fetchval(
            "SELECT count(*) FROM audit_events WHERE stage = 'failed' AND error_class = 'permanent'"
            " AND source_ref = $1",
            f"syspro:ArCustomer:{bad.strip()}",
        ),
        30,
        "the invalid record dead-lettered",
    )
    from services.ops.dlq import DeadLetterBrowser, Filters
    from services.runtime import topology_from
    from shared.bus import Bus

    bus = await Bus(p.settings.amqp_url.get_secret_value(), topology_from(p.settings)).connect()
    try:
        async with DeadLetterBrowser(bus) as browser:
            letters = await browser.read(Filters())
            assert len(letters) == 1
            assert letters[0].records == [f"syspro:ArCustomer:{bad.strip()}"]
            assert "INVALID_DATA" in letters[0].headers["x-mlc-error"]
            assert letters[0].headers["x-mlc-error-class"] == "permanent"
    finally:
        await bus.close()
    stats = await p.sandbox.zoho_stats()
    assert stats["records"]["Accounts"] == 399
    assert duplicate_creates(stats) == 0
    assert stats["statuses"].get("429", 0) >= 2 and stats["statuses"].get("500", 0) >= 2
    await p.stop()


async def test_killing_the_writer_mid_batch_loses_and_duplicates_nothing(
    pipeline_factory,
) -> None:
    p: Pipeline = await pipeline_factory(customers=800, invoices=800)
    await p.sandbox.control("zoho", "POST", "/_control/faults", {"latency_ms": 300})
    p.start("poller")
    p.start("mapper")
    writer = p.spawn("writer")
    await wait_until(lambda: p.zoho_count("Accounts"), 60, "the writer to start writing")
    await asyncio.sleep(0.5)  # mid-batch: calls take 300 ms
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    landed_at_kill = await p.zoho_count("Accounts") + await p.zoho_count("Deals")
    assert landed_at_kill < 1600
    await p.sandbox.control("zoho", "POST", "/_control/faults", {"latency_ms": 0})
    p.spawn("writer")
    await wait_until(lambda: _landed(p, 800, 800), 120, "every record after the restart")
    stats = await p.sandbox.zoho_stats()
    assert stats["records"]["Accounts"] == 800 and stats["records"]["Deals"] == 800
    assert duplicate_creates(stats) == 0
    await _check_links(p)


async def test_a_mapping_dead_letter_replayed_after_the_flow_is_fixed_lands(
    pipeline_factory,
) -> None:
    """A customer without a name fails the mapping (Account_Name is required) and is
    dead-lettered. The operator fixes the flow (a default name, a new version) and replays the
    letter: it is mapped with the flow as it is now, not the version it was polled under."""
    from emulators.sandbox import FLOWS_DIR
    from services.ops.dlq import DeadLetterBrowser, Filters
    from services.runtime import topology_from
    from shared.audit import AuditWriter
    from shared.bus import Bus
    from shared.flows import load_flow_file

    p: Pipeline = await pipeline_factory(customers=30, invoices=0)
    rows = await p.sandbox.syspro_rows("ArCustomer")
    bad = rows[7]["Customer"].strip()
    await p.sandbox.control("syspro", "PATCH", f"/_control/tables/ArCustomer/{bad}", {"Name": " "})
    for service in ("poller", "mapper", "writer"):
        p.start(service)
    await wait_until(lambda: _landed(p, 29, 0), 60, "the 29 customers that have a name")
    await p.stop("poller")  # from now on only the replay can bring the record

    flow = load_flow_file(FLOWS_DIR / "syspro-zoho.yaml")
    fields = flow.entity("customers").fields
    fields["Account_Name"] = fields["Account_Name"].model_copy(update={"default": "(no name)"})
    version, _ = await FlowStore(p.pool).apply(flow, file="fixed.yaml")
    assert version == 2

    bus = await Bus(p.settings.amqp_url.get_secret_value(), topology_from(p.settings)).connect()
    audit = await AuditWriter(p.pool).start()
    try:
        async with DeadLetterBrowser(bus) as browser:
            (letter,) = await browser.read(Filters())
            assert letter.records == [f"syspro:ArCustomer:{bad}"]
            assert "required value is empty" in letter.headers["x-mlc-error"]
            await browser.replay(letter, audit=audit, actor="operator:test")
    finally:
        await audit.close()
        await bus.close()

    async def landed() -> bool:
        accounts = _by(await p.sandbox.zoho_records("Accounts"), "ERP_Customer_No")
        return accounts.get(bad, {}).get("Account_Name") == "(no name)"

    await wait_until(landed, 30, "the replayed customer in Zoho")
    mapped = [
        r
        for r in await audit_query.lineage(p.pool, f"syspro:ArCustomer:{bad}")
        if r["stage"] == "mapped"
    ]
    assert [(r["status"], r["transformation"]) for r in mapped] == [
        ("dead_lettered", None),
        ("ok", "syspro-zoho/customers@v2"),
    ]
    assert duplicate_creates(await p.sandbox.zoho_stats()) == 0
