"""A failure stays with what failed, end to end through the mapper and writer services, the
real broker and database and the Zoho emulator: one record whose mapping raises, invalid records
in a batch, a flow whose target connection does not exist, a writer with the wrong master key,
a flush that loses the database. The others land; nothing spins on a nack."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest_asyncio
from pydantic import SecretStr

from emulators.sandbox import FLOWS_DIR
from services.cli import run_services
from services.mapper import service as mapper_service
from services.ops.dlq import DeadLetter, DeadLetterBrowser, Filters
from services.runtime import topology_from
from services.writer import service as writer_service
from shared.audit import AuditWriter
from shared.bus import MAPPER_QUEUE, Bus, writer_queue
from shared.flow_store import FlowStore
from shared.flows import load_flow_file
from shared.messages import ChangeBatch, ChangeEvent
from shared.vault import new_master_key
from tests.e2e.conftest import Pipeline, wait_until

FLOW = "syspro-zoho"


@pytest_asyncio.fixture
async def pipeline(pipeline_factory) -> AsyncIterator[Pipeline]:  # type: ignore[no-untyped-def]
    """Three SYSPRO customers (never polled: the tests publish their own batches), retry
    delays of 1 s and 1 s."""
    yield await pipeline_factory(customers=3, retry_delays_s=(1, 1))


async def _bus(p: Pipeline) -> Bus:
    bus = await Bus(p.settings.amqp_url.get_secret_value(), topology_from(p.settings)).connect()
    await bus.declare()
    return bus


async def _events(p: Pipeline, flow: str = FLOW) -> list[dict[str, Any]]:
    """The emulator's customers as the poller would publish them, as JSON."""
    mapping = load_flow_file(FLOWS_DIR / "syspro-zoho.yaml").entity("customers")
    stream = mapping.stream()
    out = []
    for row in await p.sandbox.syspro_rows("ArCustomer"):
        record = mapping.project(row)
        event = ChangeEvent(
            flow=flow,
            flow_version=1,
            source_connection="syspro",
            source_system="syspro",
            entity="ArCustomer",
            key=stream.key_of(record),
            version="v1",
            record=record,
        )
        out.append(event.model_dump(mode="json"))
    return out


async def _publish(bus: Bus, events: list[dict[str, Any]], flow: str = FLOW) -> str:
    batch = ChangeBatch(flow=flow, entity="ArCustomer", events=[])
    body = batch.model_dump(mode="json")
    body["events"] = events
    message = Bus.build_message(
        json.dumps(body).encode(), kind="change_batch", message_id=batch.batch_id
    )
    await bus.publish_raw(bus.topology.exchange("changes"), "syspro.ArCustomer", message)
    return batch.batch_id


async def _letters(bus: Bus, queue: str) -> list[DeadLetter]:
    async with DeadLetterBrowser(bus) as browser:
        return await browser.read(Filters(queue=queue))


async def _accounts(p: Pipeline) -> set[str]:
    return {a["ERP_Customer_No"] for a in await p.sandbox.zoho_records("Accounts")}


async def _one_letter(bus: Bus, queue: str) -> DeadLetter:
    async def found() -> list[DeadLetter]:
        return await _letters(bus, queue)

    letters = await wait_until(found, 30, f"a dead letter in {queue}")
    assert len(letters) == 1, [letter.summary() for letter in letters]
    return letters[0]


async def test_a_record_whose_mapping_raises_unexpectedly_fails_alone(
    pipeline: Pipeline, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    p = pipeline
    events = await _events(p)
    bad = events[1]["key"]
    real = mapper_service.map_event

    def flaky(flow: Any, version: int, event: ChangeEvent, **kwargs: Any) -> Any:
        if event.key == bad:
            raise ZeroDivisionError("division by zero")
        return real(flow, version, event, **kwargs)

    monkeypatch.setattr(mapper_service, "map_event", flaky)
    p.start("mapper")
    p.start("writer")
    bus = await _bus(p)
    try:
        await _publish(bus, events)
        good = {e["key"] for e in events} - {bad}
        await wait_until(lambda: _has(p, good), 30, "the two other customers in Zoho")
        letter = await _one_letter(bus, "mapper")
        summary = letter.summary()
        # transient (an unknown exception): it went through both retry steps first
        assert summary["error_class"] == "transient" and summary["attempts"] == 3
        assert summary["error"] == "ZeroDivisionError: division by zero"
        assert summary["exception"] == "ZeroDivisionError"
        assert summary["records"] == [f"syspro:ArCustomer:{bad}"]
        assert summary["original_routing_key"] == "syspro.ArCustomer"
        assert await _accounts(p) == good
        rows = await p.pool.fetch(
            "SELECT error_class, error FROM audit_events WHERE source_ref = $1",
            f"syspro:ArCustomer:{bad}",
        )
        assert len(rows) == 3 and {r["error_class"] for r in rows} == {"transient"}
    finally:
        await bus.close()


async def _has(p: Pipeline, keys: set[str]) -> bool:
    return keys <= await _accounts(p)


async def test_invalid_records_are_dead_lettered_together_and_the_valid_ones_land(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    events = await _events(p)
    no_record = {**events[0], "key": "NOREC"}
    del no_record["record"]
    future = {**events[0], "key": "FUTURE", "schema_version": 99}
    p.start("mapper")
    p.start("writer")
    bus = await _bus(p)
    try:
        message_id = await _publish(bus, [events[0], no_record, events[1], future, events[2]])
        keys = {e["key"] for e in events}
        await wait_until(lambda: _has(p, keys), 30, "the three valid customers in Zoho")
        letter = await _one_letter(bus, "mapper")
        summary = letter.summary()
        assert summary["message_id"] == message_id
        assert summary["error_class"] == "permanent" and summary["attempts"] == 1
        assert summary["records"] == ["syspro:ArCustomer:NOREC", "syspro:ArCustomer:FUTURE"]
        error = summary["error"]
        assert error.startswith("2 of 5 records invalid:")
        assert "syspro:ArCustomer:NOREC: record: Field required" in error
        assert "schema_version 99 is not a schema version this build knows (1)" in error
        assert len(summary["record_errors"]) == 2
        assert await _accounts(p) == keys
        refused = await p.pool.fetch(
            "SELECT source_ref FROM audit_events WHERE stage = 'received'"
            " AND status = 'dead_lettered' ORDER BY source_ref"
        )
        assert [r["source_ref"] for r in refused] == [
            "syspro:ArCustomer:FUTURE",
            "syspro:ArCustomer:NOREC",
        ]
    finally:
        await bus.close()


async def test_a_flow_whose_target_connection_does_not_exist_is_dead_lettered_at_once(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    flow = load_flow_file(FLOWS_DIR / "syspro-zoho.yaml")
    flow = flow.model_copy(update={"name": "syspro-nowhere", "target": "nowhere"})
    await FlowStore(p.pool).apply(flow, file="nowhere.yaml")
    p.start("mapper")
    bus = await _bus(p)
    try:
        await _publish(bus, await _events(p, "syspro-nowhere"), "syspro-nowhere")
        letter = await _one_letter(bus, "mapper")
        summary = letter.summary()
        assert summary["error_class"] == "permanent" and summary["attempts"] == 1
        assert summary["error"] == "ConnectionConfigError: no connection named 'nowhere'"
        assert len(summary["records"]) == 3
        assert (letter.headers.get("x-delivery-count") or 0) == 0  # never returned
    finally:
        await bus.close()


async def test_a_writer_with_the_wrong_master_key_dead_letters_then_replay_lands(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    wrong = p.settings.model_copy(update={"master_key": SecretStr(new_master_key())})
    stop = asyncio.Event()
    writer = asyncio.create_task(run_services(wrong, "writer", 0, stop))
    p.start("mapper")
    bus = await _bus(p)
    try:
        await _publish(bus, await _events(p))
        letter = await _one_letter(bus, "writer")
        summary = letter.summary()
        assert summary["error_class"] == "permanent" and summary["attempts"] == 1
        assert summary["error"].startswith("VaultError: secret of 'zoho' failed authentication")
        assert len(summary["records"]) == 3
        assert await _accounts(p) == set()
        stop.set()
        await asyncio.wait_for(writer, 60)

        # the operator starts the writer with the right key and replays
        p.start("writer")
        audit = await AuditWriter(p.pool).start()
        try:
            async with DeadLetterBrowser(bus) as browser:
                (letter,) = await browser.read(Filters(queue="writer"))
                await browser.replay(letter, audit=audit, actor="operator:test")
        finally:
            await audit.close()
        keys = {e["key"] for e in await _events(p)}
        await wait_until(lambda: _has(p, keys), 30, "the replayed customers in Zoho")
    finally:
        stop.set()
        await asyncio.gather(writer, return_exceptions=True)
        await bus.close()


async def test_a_flush_that_loses_the_database_waits_for_it_and_spends_nothing(
    pipeline: Pipeline, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    p = pipeline
    real = writer_service.Batcher._write
    outages: list[int] = []

    async def flaky(self: Any, key: Any, items: Any) -> None:
        if len(outages) < 2:
            outages.append(len(items))
            raise asyncpg.exceptions.CannotConnectNowError("the database system is starting up")
        await real(self, key, items)

    monkeypatch.setattr(writer_service.Batcher, "_write", flaky)
    p.start("mapper")
    p.start("writer")
    bus = await _bus(p)
    try:
        events = await _events(p)
        await _publish(bus, events)
        keys = {e["key"] for e in events}
        await wait_until(lambda: _has(p, keys), 30, "the customers in Zoho after the outage")
        assert outages == [3, 3]
        failed = await p.pool.fetchval("SELECT count(*) FROM audit_events WHERE stage = 'failed'")
        assert failed == 0
        depths = {d.name: d.ready for d in await bus.queue_depths()}
        topo = bus.topology
        wq = writer_queue("zoho_crm")
        for name in (topo.retry_queue(wq, 1), topo.dlq(wq), topo.dlq(MAPPER_QUEUE)):
            assert depths[name] == 0, name
        written = await p.pool.fetchval("SELECT count(*) FROM audit_events WHERE stage = 'written'")
        assert written == 3
    finally:
        await bus.close()
