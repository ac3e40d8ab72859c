"""Notification channels through the real database and the Zoho emulator: applying a flow whose
source is Zoho registers a channel (token encrypted, fresh and random); the loop renews it before
it lapses; disabling the flow removes it; a channel Zoho forgot is a failure in the audit trail
and in /metrics, then registered afresh; two replicas register one channel, not two."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest_asyncio
from prometheus_client import REGISTRY

from emulators.sandbox import Sandbox
from services.runtime import ServiceContext, open_context
from services.webhooks.service import WebhookServer, run
from shared.audit import AuditWriter
from shared.bus import NOTICES_QUEUE
from shared.channels import ChannelStore, PushSource, SubscriptionLoop, push_source
from shared.connections import ConnectionStore
from shared.flow_store import FlowStore
from shared.flows import parse_flow
from shared.settings import Settings
from shared.vault import Vault
from tests.e2e.conftest import wait_until

PUBLIC_URL = "http://127.0.0.1:18999"


def zoho_flow(name: str = "zoho-erp", entities: tuple[str, ...] = ("Accounts",)) -> Any:
    return parse_flow(
        {
            "name": name,
            "source": "zoho",
            "target": "erp",
            "entities": [
                {
                    "name": entity.lower(),
                    "source": {"entity": entity, "key": ["id"]},
                    "target": {"entity": "ArCustomer", "match_on": ["Customer"]},
                    "fields": {"Customer": {"from": "id"}},
                }
                for entity in entities
            ],
        }
    )


@dataclass
class Harness:
    pool: asyncpg.Pool
    sandbox: Sandbox
    vault: Vault
    flows: FlowStore
    store: ChannelStore
    audit: AuditWriter
    connections: ConnectionStore
    opened: list[Any]

    def loop(self, lifetime_s: float = 3600, check_s: float = 0.2) -> SubscriptionLoop:
        async def opener(connection: str) -> PushSource | None:
            system = await self.connections.system_of(connection)
            connector = await self.connections.open(connection)
            self.opened.append(connector)
            return push_source(system, connector)

        return SubscriptionLoop(
            self.pool,
            self.store,
            self.audit,
            opener,
            public_url=PUBLIC_URL,
            lifetime_s=lifetime_s,
            check_s=check_s,
            actor="webhooks@test",
        )

    async def emulator_channels(self) -> list[dict[str, Any]]:
        return (await self.sandbox.control("zoho", "GET", "/_control/channels"))["channels"]

    async def rows(self) -> list[asyncpg.Record]:
        return await self.pool.fetch("SELECT * FROM webhook_channels ORDER BY created_at")


@pytest_asyncio.fixture
async def harness(clean_db: asyncpg.Pool) -> AsyncIterator[Harness]:
    box = await Sandbox.start()
    vault = Vault.from_settings(Settings())
    connections = ConnectionStore(clean_db, vault)
    settings, secrets = box.zoho_connection()
    await connections.add("zoho", "zoho_crm", settings, secrets)
    audit = await AuditWriter(clean_db).start()
    h = Harness(
        clean_db, box, vault, FlowStore(clean_db), ChannelStore(clean_db, vault), audit,
        connections, [],
    )  # fmt: skip
    try:
        yield h
    finally:
        for connector in h.opened:
            await connector.close()
        await audit.close()
        await box.stop()


async def _run(loop: SubscriptionLoop) -> tuple[asyncio.Task[None], asyncio.Event]:
    stop = asyncio.Event()
    return asyncio.create_task(loop.run(stop)), stop


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_applying_a_flow_registers_a_channel_and_disabling_it_removes_it(
    harness: Harness,
) -> None:
    await harness.flows.apply(zoho_flow())
    task, stop = await _run(harness.loop())
    try:
        channels = await wait_until(harness.emulator_channels, 10, "a channel on the emulator")
        (channel,) = channels
        assert channel["module"] == "Accounts"
        assert channel["events"] == ["create", "delete", "edit"]
        assert channel["notify_url"] == f"{PUBLIC_URL}/hooks/zoho"
        token = channel["token"]
        assert 32 <= len(token) <= 50
        (row,) = await wait_until(harness.rows, 5, "the channel in webhook_channels")
        assert row["channel_id"] == channel["channel_id"]
        assert token.encode() not in bytes(row["token"])  # stored encrypted
        assert harness.vault.decrypt(row["token"], "zoho").decode() == token
        expiry = _metric("mlc_channel_expiry_seconds", connection="zoho", channel=row["channel_id"])
        assert expiry == row["expires_at"].timestamp()

        await harness.flows.set_enabled("zoho-erp", False)

        async def gone() -> bool:
            return not await harness.emulator_channels() and not await harness.rows()

        await wait_until(gone, 10, "the channel removed on the emulator and in the table")
        removed = await harness.pool.fetchval(
            "SELECT count(*) FROM audit_events WHERE stage = 'channel' AND status = 'removed'"
        )
        assert removed == 1
    finally:
        stop.set()
        await task


async def test_each_channel_gets_its_own_random_token(harness: Harness) -> None:
    await harness.connections.add("zoho2", "zoho_crm", *harness.sandbox.zoho_connection())
    await harness.flows.apply(zoho_flow())
    flow = zoho_flow("zoho2-erp").model_copy(update={"source": "zoho2"})
    await harness.flows.apply(flow)
    await harness.loop().reconcile()
    channels = await harness.emulator_channels()
    assert len(channels) == 2
    assert len({c["token"] for c in channels}) == 2
    assert len({c["channel_id"] for c in channels}) == 2
    assert {c["notify_url"] for c in channels} == {
        f"{PUBLIC_URL}/hooks/zoho",
        f"{PUBLIC_URL}/hooks/zoho2",
    }


async def test_a_short_lived_channel_is_renewed_before_it_lapses(harness: Harness) -> None:
    await harness.flows.apply(zoho_flow())
    renewed_before = _metric("mlc_channel_renewals_total", connection="zoho", outcome="renewed")
    # 6 s: Zoho takes whole seconds only, so a 3 s channel could lapse before its renewal
    task, stop = await _run(harness.loop(lifetime_s=6, check_s=0.2))
    try:
        (first,) = await wait_until(harness.emulator_channels, 10, "a channel on the emulator")

        async def renewed() -> Any:
            rows = await harness.rows()
            return rows if rows and rows[0]["renewed_at"] is not None else None

        await wait_until(renewed, 15, "the channel renewed")
        (now,) = await harness.emulator_channels()
        assert now["channel_id"] == first["channel_id"]
        assert now["channel_expiry"] > first["channel_expiry"]
        assert not now["expired"]
        assert (
            _metric("mlc_channel_renewals_total", connection="zoho", outcome="renewed")
            > renewed_before
        )
        # and it keeps being renewed: it never lapses while the flow is on
        await wait_until(
            lambda: _later_than(harness, now["channel_expiry"]), 15, "a second renewal"
        )
    finally:
        stop.set()
        await task


async def _later_than(harness: Harness, expiry: str) -> bool:
    channels = await harness.emulator_channels()
    return bool(channels) and channels[0]["channel_expiry"] > expiry and not channels[0]["expired"]


async def test_a_renewal_zoho_refuses_is_audited_counted_and_registered_afresh(
    harness: Harness,
) -> None:
    await harness.flows.apply(zoho_flow())
    loop = harness.loop(lifetime_s=3, check_s=0.2)
    await loop.reconcile()
    (first,) = await harness.emulator_channels()
    failed_before = _metric("mlc_channel_renewals_total", connection="zoho", outcome="failed")
    await harness.sandbox.control("zoho", "POST", "/_control/reset")  # Zoho forgets the channel
    task, stop = await _run(loop)
    try:

        async def failure() -> Any:
            return await harness.pool.fetchrow(
                "SELECT * FROM audit_events WHERE stage = 'channel' AND status = 'failed'"
            )

        row = await wait_until(failure, 10, "a failed renewal in the audit trail")
        assert row["error"].startswith("renew: ")
        assert row["source_ref"] == f"zoho:{first['channel_id']}"
        assert (
            _metric("mlc_channel_renewals_total", connection="zoho", outcome="failed")
            == failed_before + 1
        )

        async def fresh() -> Any:
            channels = await harness.emulator_channels()
            return [c for c in channels if c["channel_id"] != first["channel_id"]]

        (new,) = await wait_until(fresh, 10, "a fresh channel registered")
        assert new["token"] != first["token"]
        assert [r["channel_id"] for r in await harness.rows()] == [new["channel_id"]]
    finally:
        stop.set()
        await task


async def test_two_replicas_register_one_channel(harness: Harness) -> None:
    await harness.flows.apply(zoho_flow())
    await asyncio.gather(*(harness.loop().reconcile() for _ in range(4)))
    assert len(await harness.emulator_channels()) == 1
    assert len(await harness.rows()) == 1


async def test_a_flow_that_reads_more_modules_gets_a_channel_that_covers_them(
    harness: Harness,
) -> None:
    await harness.flows.apply(zoho_flow())
    loop = harness.loop()
    await loop.reconcile()
    (first,) = await harness.rows()
    await harness.flows.apply(zoho_flow(entities=("Accounts", "Contacts")))
    await loop.reconcile()
    (row,) = await harness.rows()
    assert row["channel_id"] != first["channel_id"]
    assert sorted(row["events"]) == ["Accounts.all", "Contacts.all"]
    modules = {c["module"] for c in await harness.emulator_channels()}
    assert modules == {"Accounts", "Contacts"}


async def test_a_callback_from_zoho_reaches_the_bus_and_a_wrong_token_is_refused(
    harness: Harness, services: dict[str, str], database_url: str, bus_prefix: str
) -> None:
    settings = Settings(
        amqp_url=services["amqp_url"],
        database_url=database_url,
        bus_prefix=bus_prefix,
        writer_targets=["zoho_crm"],
        rabbitmq_api_url="",
        webhook_port=0,
    )
    ctx = await open_context(settings, "webhooks")
    server = WebhookServer(ctx)
    stop = asyncio.Event()
    service: asyncio.Task[None] | None = None
    try:
        port = await server.start("127.0.0.1", 0)
        ctx.settings = settings.model_copy(
            update={"webhook_public_url": f"http://127.0.0.1:{port}", "channel_check_s": 0.2}
        )
        await harness.flows.apply(zoho_flow())
        service = asyncio.create_task(run(ctx, stop, server))  # the service runs the loop
        (channel,) = await wait_until(harness.emulator_channels, 10, "a channel on the emulator")
        assert channel["notify_url"] == f"http://127.0.0.1:{port}/hooks/zoho"
        seeded = await harness.sandbox.control(
            "zoho", "POST", "/_control/seed", {"module": "Accounts", "count": 1}
        )
        rid = str(seeded["ids"][0])
        await harness.sandbox.control(
            "zoho", "PATCH", f"/_control/records/Accounts/{rid}", {"Account_Name": "Changed"}
        )
        amqp = await ctx.bus.connection.channel()  # type: ignore[union-attr]
        queue = await amqp.declare_queue(ctx.bus.topology.queue(NOTICES_QUEUE), passive=True)

        async def notice() -> Any:
            message = await queue.get(no_ack=True, fail=False)
            return json.loads(message.body) if message is not None else None

        batch = await wait_until(notice, 10, "a ChangeNotice on the bus")
        (sent,) = batch["notices"]
        assert (sent["connection"], sent["system"], sent["entity"]) == (
            "zoho",
            "zoho_crm",
            "Accounts",
        )
        assert rid in sent["ids"]
        await amqp.close()

        forged = {
            "module": "Accounts",
            "ids": [rid],
            "operation": "update",
            "channel_id": channel["channel_id"],
            "token": "not-the-token-" + "x" * 30,
        }
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"http://127.0.0.1:{port}/hooks/zoho", json=forged) as response,
        ):
            assert response.status == 401
            assert await response.json() == {"error": "token mismatch"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"http://127.0.0.1:{port}/hooks/nobody", json=forged) as response,
        ):
            assert response.status == 404
    finally:
        stop.set()
        if service is not None:
            await service
        await server.stop()
        await ctx.bus.delete_topology()
        await ctx.close()


class RecordingBus:
    """Stands in for the broker (the test above goes through the real one)."""

    def __init__(self) -> None:
        self.published: list[tuple[str, str, Any]] = []

    async def publish(self, exchange: str, routing_key: str, message: Any) -> None:
        self.published.append((exchange, routing_key, message))


async def test_hooks_route_a_callback_to_the_connection_push_source(harness: Harness) -> None:
    """/hooks/{connection}: Zoho's callback (sent by the emulator to the registered notify URL)
    becomes a ChangeNotice; a forged token is 401, a connection that cannot push is 404."""
    bus = RecordingBus()
    ctx = ServiceContext(
        settings=Settings(webhook_port=0, channel_check_s=0.2),
        pool=harness.pool,
        bus=bus,  # type: ignore[arg-type]
        audit=harness.audit,
        vault=harness.vault,
        connections=harness.connections,
        flows=harness.flows,
        actor="webhooks@test",
    )
    await harness.connections.add("erp", "syspro", *harness.sandbox.syspro_connection())
    server = WebhookServer(ctx)
    port = await server.start("127.0.0.1", 0)
    ctx.settings = ctx.settings.model_copy(
        update={"webhook_public_url": f"http://127.0.0.1:{port}"}
    )
    stop = asyncio.Event()
    await harness.flows.apply(zoho_flow())
    service = asyncio.create_task(run(ctx, stop, server))
    try:
        (channel,) = await wait_until(harness.emulator_channels, 10, "a channel on the emulator")
        seeded = await harness.sandbox.control(
            "zoho", "POST", "/_control/seed", {"module": "Accounts", "count": 1}
        )
        rid = str(seeded["ids"][0])
        await harness.sandbox.control(
            "zoho", "PATCH", f"/_control/records/Accounts/{rid}", {"Account_Name": "Changed"}
        )

        async def published() -> Any:
            return bus.published

        ((exchange, key, batch),) = await wait_until(published, 10, "a notice published")
        assert (exchange, key) == ("notices", "zoho_crm.Accounts")
        (notice,) = batch.notices
        assert (notice.connection, notice.entity, notice.ids) == ("zoho", "Accounts", [rid])

        forged = {
            "module": "Accounts",
            "ids": [rid],
            "channel_id": channel["channel_id"],
            "token": "x" * 40,
        }
        async with aiohttp.ClientSession() as http:
            for path, status in (("/hooks/zoho", 401), ("/hooks/erp", 404), ("/hooks/none", 404)):
                async with http.post(f"http://127.0.0.1:{port}{path}", json=forged) as response:
                    assert response.status == status, path
        assert len(bus.published) == 1
    finally:
        stop.set()
        await service
