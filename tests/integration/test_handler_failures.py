"""A handler that raises, through the real RabbitMQ: never a nack-requeue loop. An unknown
exception goes through the retry queues to the dead-letter queue with its class, message and
original routing key; an outage of our database or broker holds the message until they answer,
without burning a delivery; a stop while holding still works. The topology migrates its retry
queues when MLC_RETRY_DELAYS_S changes, or says what to do. The dlq commands read letters the
broker dead-lettered itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage

from services.runtime import wait_for_infrastructure
from shared import bus as busmod
from shared.bus import MAPPER_QUEUE, Bus, Topology, TopologyError
from shared.flow_store import FlowStore
from shared.flows import load_flow_file
from shared.messages import ChangeBatch, ChangeEvent
from shared.settings import Settings
from tests.e2e.conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]


def _batch(n: int = 2, flow: str = "f") -> ChangeBatch:
    return ChangeBatch(
        flow=flow,
        entity="ArCustomer",
        events=[
            ChangeEvent(
                flow=flow,
                flow_version=1,
                source_connection="syspro",
                source_system="syspro",
                entity="ArCustomer",
                key=f"C{i}",
                version="v1",
                record={"Customer": f"C{i}"},
            )
            for i in range(n)
        ],
    )


def _topology(prefix: str, delays: list[int], delivery_limit: int = 20) -> Topology:
    return Topology(
        prefix=prefix,
        retry_delays_s=delays,
        writer_targets=("zoho_crm",),
        delivery_limit=delivery_limit,
    )


@pytest_asyncio.fixture
async def fast_bus(services: dict[str, str], bus_prefix: str) -> AsyncIterator[Bus]:
    """Retry delays of 1 s, 1 s; a held message is tried again after 0.05, 0.1, 0.2 s."""
    bus = Bus(services["amqp_url"], _topology(bus_prefix, [1, 1]), hold_backoff_s=(0.05, 0.2))
    await bus.connect()
    await bus.declare()
    yield bus
    await bus.close()
    admin = await Bus(services["amqp_url"], bus.topology).connect()
    try:
        await admin.delete_topology()
    finally:
        await admin.close()


async def _get(bus: Bus, queue_name: str, within: float = 20.0) -> AbstractIncomingMessage:
    channel = await bus.connection.channel()  # type: ignore[union-attr]
    queue = await channel.get_queue(queue_name)

    async def one() -> AbstractIncomingMessage | None:
        return await queue.get(no_ack=False, fail=False)

    return await wait_until(one, within, f"a message in {queue_name}", every=0.1)


async def _depth(bus: Bus, queue_name: str) -> int:
    channel = await bus.connection.channel()  # type: ignore[union-attr]
    try:
        queue = await channel.declare_queue(queue_name, passive=True)
        return queue.declaration_result.message_count or 0
    finally:
        await channel.close()


async def test_an_unknown_exception_is_retried_then_dead_lettered_with_its_class(
    fast_bus: Bus,
) -> None:
    bus, topo = fast_bus, fast_bus.topology
    await bus.publish("changes", "syspro.ArCustomer", _batch())
    deliveries: list[tuple[bool, Any]] = []

    async def handler(message: AbstractIncomingMessage) -> None:
        deliveries.append((message.redelivered, (message.headers or {}).get("x-delivery-count", 0)))
        raise ZeroDivisionError("division by zero")

    await bus.consume(MAPPER_QUEUE, handler)
    dead = await _get(bus, topo.dlq(MAPPER_QUEUE))
    headers = dead.headers
    assert headers[busmod.H_ERROR_CLASS] == "transient"
    assert headers[busmod.H_ERROR] == "ZeroDivisionError: division by zero"
    assert headers[busmod.H_EXCEPTION] == "ZeroDivisionError"
    assert headers[busmod.H_ATTEMPTS] == 3  # the first delivery, then the two retry steps
    assert headers[busmod.H_ORIG_EXCHANGE] == topo.exchange("changes")
    assert headers[busmod.H_ORIG_ROUTING_KEY] == "syspro.ArCustomer"
    assert headers.get("x-delivery-count", 0) == 0  # never returned to a queue
    # three deliveries, each a first one: no nack-requeue, nowhere near the delivery limit
    assert deliveries == [(False, 0)] * 3
    await dead.ack()
    assert await _depth(bus, topo.queue(MAPPER_QUEUE)) == 0


@pytest.mark.parametrize(
    "outage",
    [
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
    ],
)
async def test_an_outage_holds_the_message_and_it_is_processed_once(
    fast_bus: Bus, outage: Exception
) -> None:
    bus, topo = fast_bus, fast_bus.topology
    await bus.publish("changes", "syspro.ArCustomer", _batch())
    runs: list[tuple[bool, Any]] = []
    processed: list[str] = []
    done = asyncio.Event()

    async def handler(message: AbstractIncomingMessage) -> None:
        runs.append((message.redelivered, (message.headers or {}).get("x-delivery-count", 0)))
        if len(runs) <= 3:
            raise outage
        processed.append(message.message_id or "")
        await message.ack()
        done.set()

    await bus.consume(MAPPER_QUEUE, handler)
    await asyncio.wait_for(done.wait(), 10)
    # the same delivery run four times in this process: never redelivered, count unchanged
    assert runs == [(False, 0)] * 4
    assert len(processed) == 1
    for name in (
        topo.queue(MAPPER_QUEUE),
        topo.retry_queue(MAPPER_QUEUE, 1),
        topo.dlq(MAPPER_QUEUE),
    ):
        assert await _depth(bus, name) == 0, name


async def test_a_database_error_while_the_database_answers_is_routed_after_a_few_runs(
    fast_bus: Bus,
) -> None:
    """Not an outage after all (the probe answers): after ``hold_strikes`` more runs the
    message goes the way of any failure, instead of being held for ever."""
    bus, topo = fast_bus, fast_bus.topology
    bus.hold_strikes = 2
    probes: list[float] = []

    async def probe() -> None:
        probes.append(time.monotonic())

    bus.infrastructure_probe = probe
    await bus.publish("changes", "syspro.ArCustomer", _batch())
    runs: list[int] = []

    async def handler(message: AbstractIncomingMessage) -> None:
        runs.append(int((message.headers or {}).get(busmod.H_ATTEMPTS, 0)))
        raise asyncpg.exceptions.InterfaceError("another operation is in progress")

    await bus.consume(MAPPER_QUEUE, handler)
    retried = await _get(bus, topo.retry_queue(MAPPER_QUEUE, 1), within=10)
    assert retried.headers[busmod.H_ERROR_CLASS] == "transient"
    assert "InterfaceError" in retried.headers[busmod.H_EXCEPTION]
    assert runs[:3] == [0, 0, 0] and len(probes) >= 2
    await retried.ack()


async def test_a_stop_while_holding_returns_the_message_to_its_queue(
    services: dict[str, str], bus_prefix: str
) -> None:
    topo = _topology(bus_prefix, [1, 1])
    bus = await Bus(services["amqp_url"], topo, hold_backoff_s=(0.05, 0.2)).connect()
    admin = await Bus(services["amqp_url"], topo).connect()
    try:
        await bus.declare()
        await bus.publish("changes", "syspro.ArCustomer", _batch())
        runs: list[float] = []

        async def handler(message: AbstractIncomingMessage) -> None:
            runs.append(time.monotonic())
            raise asyncpg.exceptions.CannotConnectNowError("the database system is starting up")

        await bus.consume(MAPPER_QUEUE, handler)
        await wait_until(lambda: _true(len(runs) >= 3), 10, "the message held", every=0.05)
        started = time.monotonic()
        await asyncio.wait_for(bus.close(), 10)
        assert time.monotonic() - started < 5
        held = len(runs)
        # back in its queue, ready for the next consumer; nothing routed anywhere
        await wait_until(
            lambda: _depth(admin, topo.queue(MAPPER_QUEUE)), 10, "the message back in its queue"
        )
        assert await _depth(admin, topo.queue(MAPPER_QUEUE)) == 1
        assert await _depth(admin, topo.retry_queue(MAPPER_QUEUE, 1)) == 0
        assert await _depth(admin, topo.dlq(MAPPER_QUEUE)) == 0
        assert len(runs) == held  # the held handler stopped with the bus
    finally:
        await bus.close()
        await admin.delete_topology()
        await admin.close()


async def _true(value: bool) -> bool:
    return value


# -- retry queues when MLC_RETRY_DELAYS_S changes ------------------------------------------------


async def test_changed_retry_delays_migrate_empty_retry_queues_and_refuse_full_ones(
    services: dict[str, str], bus_prefix: str
) -> None:
    url = services["amqp_url"]
    old = await Bus(url, _topology(bus_prefix, [30, 60])).connect()
    new = await Bus(url, _topology(bus_prefix, [5, 60, 90])).connect()
    try:
        await old.declare()
        retry_1 = old.topology.retry_queue(MAPPER_QUEUE, 1)
        await old.publish_raw("", retry_1, Bus.build_message(b"{}", kind="change_batch"))
        with pytest.raises(TopologyError) as refused:
            await new.declare()
        text = str(refused.value)
        assert f"retry queue {retry_1} holds 1 message(s)" in text
        assert "MLC_RETRY_DELAYS_S" in text and "\n" not in text
        assert await _depth(new, retry_1) == 1  # nothing was lost

        channel = await new.connection.channel()  # type: ignore[union-attr]
        await (await channel.get_queue(retry_1)).purge()
        await channel.close()
        await new.declare()  # empty now: deleted and declared with the new delay
        await new.declare()  # and again: nothing to change
        # the queue now has the new TTL: declaring it with the old one is refused
        channel = await new.plain_channel()
        args = {
            "x-queue-type": "quorum",
            "x-message-ttl": 30_000,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": new.topology.queue(MAPPER_QUEUE),
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            await channel.declare_queue(retry_1, durable=True, arguments=args)
        channel = await new.connection.channel()  # type: ignore[union-attr]
        await channel.declare_queue(
            retry_1, durable=True, arguments={**args, "x-message-ttl": 5000}
        )
        await channel.close()
        # publishing still works after the declarations
        await new.publish("changes", "syspro.ArCustomer", _batch(1))
    finally:
        await new.delete_topology()
        await new.close()
        await old.close()


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services",
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


def _env(services: dict[str, str], database_url: str, prefix: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "MLC_AMQP_URL": services["amqp_url"],
        "MLC_DATABASE_URL": database_url,
        "MLC_BUS_PREFIX": prefix,
        "MLC_WRITER_TARGETS": "zoho_crm",
        "MLC_RABBITMQ_API_URL": "",
        "MLC_WEBHOOK_PORT": "0",
        "MLC_LOG_LEVEL": "WARNING",
        **extra,
    }


async def test_a_service_started_with_other_retry_delays_says_what_to_do_in_one_line(
    services: dict[str, str], database_url: str, bus_prefix: str
) -> None:
    old = await Bus(services["amqp_url"], _topology(bus_prefix, [30, 60])).connect()
    try:
        await old.declare()
        retry_1 = old.topology.retry_queue(MAPPER_QUEUE, 1)
        await old.publish_raw("", retry_1, Bus.build_message(b"{}", kind="change_batch"))
        env = _env(services, database_url, bus_prefix, MLC_RETRY_DELAYS_S="5,60")
        code, out, err = await _cli(env, "run", "mapper", "--health-port", "0")
        assert code == 1, out + err
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines == [
            f"ml-connector: retry queue {retry_1} holds 1 message(s) and was declared with"
            " another delay than MLC_RETRY_DELAYS_S gives now (5 s): start with the previous"
            f" MLC_RETRY_DELAYS_S until it is empty (its messages go back to"
            f" {bus_prefix}.mapper as their delay ends), then change it"
        ]
    finally:
        await old.delete_topology()
        await old.close()


# -- dlq commands on letters of any shape --------------------------------------------------------


async def test_dlq_list_show_and_replay_cope_with_letters_the_broker_dead_lettered(
    services: dict[str, str], database_url: str, clean_db: asyncpg.Pool, bus_prefix: str
) -> None:
    flow = load_flow_file(ROOT / "flows" / "syspro-zoho.yaml")
    await FlowStore(clean_db).apply(flow, file="syspro-zoho.yaml")
    topo = _topology(bus_prefix, [1, 1], delivery_limit=2)
    bus = await Bus(services["amqp_url"], topo).connect()
    env = _env(services, database_url, bus_prefix)
    try:
        await bus.declare()
        # 1. a consumer that keeps returning the message: the broker dead-letters it itself
        batch = _batch(1, flow=flow.name)
        await bus.publish("changes", "syspro.ArCustomer", batch)
        channel = await bus.connection.channel()  # type: ignore[union-attr]
        work = await channel.get_queue(topo.queue(MAPPER_QUEUE))

        async def returned() -> bool:
            message = await work.get(no_ack=False, fail=False)
            if message is not None:
                await message.nack(requeue=True)
            return await _depth(bus, topo.dlq(MAPPER_QUEUE)) == 1

        await wait_until(returned, 20, "the broker to dead-letter the message", every=0.05)
        await channel.close()
        # 2. no headers at all, a body that is not JSON, no type
        await bus.publish_raw(
            "", topo.dlq(MAPPER_QUEUE), aio_pika.Message(b"\xff\x00 not json", message_id="junk")
        )
        # 3. an unknown type
        await bus.publish_raw(
            "",
            topo.dlq(MAPPER_QUEUE),
            aio_pika.Message(b'{"a": 1}', type="from_the_future", message_id="future"),
        )

        code, out, err = await _cli(env, "dlq", "list")
        assert code == 0 and "Traceback" not in err, out + err
        assert "3 dead letter(s)" in out and "broker:delivery_limit" in out

        code, out, err = await _cli(env, "dlq", "list", "--json")
        letters = {r["message_id"]: r for r in json.loads(out)}
        broker = letters[batch.batch_id]
        assert broker["dead_lettered_by"] == "broker"
        assert broker["reason"] == "broker:delivery_limit"
        assert "delivery limit" in broker["error"] and topo.queue(MAPPER_QUEUE) in broker["error"]
        assert broker["original_exchange"] == topo.exchange("changes")
        assert broker["original_routing_key"] == "syspro.ArCustomer"
        assert broker["records"] == ["syspro:ArCustomer:C0"]
        assert letters["junk"]["reason"] == "unknown" and letters["junk"]["records"] == []
        assert letters["future"]["decoded"] is False

        code, out, err = await _cli(env, "dlq", "list", "--error-class", "broker", "--json")
        assert [r["message_id"] for r in json.loads(out)] == [batch.batch_id]

        code, out, err = await _cli(env, "dlq", "show", "junk")
        assert code == 0, err
        assert json.loads(out)[0]["body"] == "\\xff\x00 not json"  # not UTF-8: escaped

        # replay: to the exchange and routing key the broker recorded
        code, out, err = await _cli(env, "dlq", "replay", "--message-id", batch.batch_id)
        assert code == 0 and "replayed 1" in out, out + err
        again = await _get(bus, topo.queue(MAPPER_QUEUE), within=10)
        assert again.message_id == batch.batch_id
        assert again.exchange == topo.exchange("changes")
        assert again.routing_key == "syspro.ArCustomer"
        assert again.headers[busmod.H_REPLAYS] == 1
        assert not any(k.startswith("x-death") for k in again.headers)
        await again.ack()

        # a letter that names no destination is refused in one line, the others stay
        code, out, err = await _cli(env, "dlq", "replay", "--message-id", "junk")
        assert code == 1 and "Traceback" not in err
        assert "not replayed: dead letter junk names no original routing key" in err
        code, out, err = await _cli(env, "dlq", "list", "--json")
        assert sorted(r["message_id"] for r in json.loads(out)) == ["future", "junk"]
    finally:
        await bus.delete_topology()
        await bus.close()


# -- a service started while the broker is away ----------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _forward(port: int, to: int) -> asyncio.Server:
    """A broker that appears on ``port``: every connection is piped to ``to``."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", to)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def test_start_up_waits_for_a_broker_that_is_away_then_goes_on(
    services: dict[str, str], database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = _free_port()
    upstream = int(services["amqp_url"].rsplit(":", 1)[1].split("/")[0])
    settings = Settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/", database_url=database_url)
    caplog.set_level(logging.WARNING, logger="services.runtime")
    waiting = asyncio.create_task(wait_for_infrastructure(settings, backoff_s=(0.1, 0.2)))
    await wait_until(
        lambda: _true("waiting for the broker" in caplog.text), 10, "a line saying it waits"
    )
    assert not waiting.done()
    assert "the database" not in caplog.text  # the database answers
    server = await _forward(port, upstream)
    try:
        await asyncio.wait_for(waiting, 10)  # the broker is there: it goes on
    finally:
        server.close()


async def test_a_service_started_while_the_broker_is_away_waits_instead_of_dying(
    services: dict[str, str], database_url: str, bus_prefix: str
) -> None:
    env = _env(services, database_url, bus_prefix)
    env["MLC_AMQP_URL"] = f"amqp://guest:guest@127.0.0.1:{_free_port()}/"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services",
        "run",
        "mapper",
        "--health-port",
        "0",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        seen = b""
        deadline = time.monotonic() + 20
        while b"waiting for the broker" not in seen and time.monotonic() < deadline:
            seen += await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"waiting for the broker" in seen, seen
        assert b"Traceback" not in seen
        assert proc.returncode is None  # still there, waiting
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
