"""The bus against the real RabbitMQ: topology, confirms, delivery, retries, dead letters."""

from __future__ import annotations

import asyncio
import time

import pytest
from aio_pika.abc import AbstractIncomingMessage

from shared import bus as busmod
from shared.bus import MAPPER_QUEUE, Bus, Routed, UnroutableError
from shared.failures import FailureClass
from shared.messages import ChangeBatch, ChangeEvent, decode


def _batch(n: int = 3) -> ChangeBatch:
    events = [
        ChangeEvent(
            flow="f",
            flow_version=1,
            source_connection="syspro",
            source_system="syspro",
            entity="ArCustomer",
            key=f"C{i}",
            version="v1",
            record={"Customer": f"C{i}"},
        )
        for i in range(n)
    ]
    return ChangeBatch(flow="f", entity="ArCustomer", events=events)


async def _collect(
    bus: Bus, queue_name: str, count: int, wait_s: float = 10.0
) -> list[AbstractIncomingMessage]:
    channel = await bus.connection.channel()  # type: ignore[union-attr]
    queue = await channel.get_queue(queue_name)
    got: list[AbstractIncomingMessage] = []
    deadline = time.monotonic() + wait_s
    while len(got) < count and time.monotonic() < deadline:
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            await asyncio.sleep(0.1)
            continue
        got.append(message)
    return got


async def test_declaring_twice_is_harmless_and_message_delivered_once(bus: Bus) -> None:
    await bus.declare()  # second time
    batch = _batch()
    await bus.publish("changes", "syspro.ArCustomer", batch)

    received: list[ChangeBatch] = []
    done = asyncio.Event()

    async def handler(message: AbstractIncomingMessage) -> None:
        received.append(decode(message.type, message.body))  # type: ignore[arg-type]
        await message.ack()
        done.set()

    await bus.consume(MAPPER_QUEUE, handler, prefetch=10)
    await asyncio.wait_for(done.wait(), 10)
    await asyncio.sleep(0.5)  # nothing else arrives
    assert len(received) == 1
    assert [e.key for e in received[0].events] == ["C0", "C1", "C2"]
    depths = {d.name: d for d in await bus.queue_depths()}
    main = depths[bus.topology.queue(MAPPER_QUEUE)]
    assert main.ready == 0
    assert main.unacked in (0, None)


async def test_unroutable_publish_raises(bus: Bus) -> None:
    with pytest.raises(UnroutableError):
        await bus.publish("commands", "no_such_system.Accounts", _batch(1))


async def test_transient_failure_retried_then_dead_lettered_with_headers(bus: Bus) -> None:
    topo = bus.topology
    await bus.publish("changes", "syspro.ArCustomer", _batch(1))
    deliveries: list[float] = []
    routes: list[Routed] = []
    finished = asyncio.Event()

    async def handler(message: AbstractIncomingMessage) -> None:
        deliveries.append(time.monotonic())
        routed = await bus.route_failure(
            message, MAPPER_QUEUE, FailureClass.TRANSIENT, "HTTP 503 from target", service="t"
        )
        routes.append(routed)
        await message.ack()
        if routed is Routed.DEAD:
            finished.set()

    await bus.consume(MAPPER_QUEUE, handler)
    await asyncio.wait_for(finished.wait(), 20)
    # retry_delays_s=[1, 2]: first delivery, after ~1 s, after ~2 s more, then dead.
    assert routes == [Routed.RETRY, Routed.RETRY, Routed.DEAD]
    assert deliveries[1] - deliveries[0] >= 0.9
    assert deliveries[2] - deliveries[1] >= 1.9

    dead = await _collect(bus, topo.dlq(MAPPER_QUEUE), 1)
    assert len(dead) == 1
    headers = dead[0].headers
    assert headers[busmod.H_ERROR_CLASS] == "transient"
    assert headers[busmod.H_ERROR] == "HTTP 503 from target"
    assert headers[busmod.H_ATTEMPTS] == 3
    assert headers[busmod.H_ORIG_EXCHANGE] == topo.exchange("changes")
    assert headers[busmod.H_ORIG_ROUTING_KEY] == "syspro.ArCustomer"
    assert headers[busmod.H_FIRST_FAILED] <= headers[busmod.H_FAILED_AT]
    assert decode(dead[0].type, dead[0].body).events[0].key == "C0"  # type: ignore[attr-defined]
    await dead[0].ack()


async def test_permanent_failure_dead_lettered_at_once(bus: Bus) -> None:
    await bus.publish("changes", "syspro.ArCustomer", _batch(2))
    done = asyncio.Event()
    routes: list[Routed] = []

    async def handler(message: AbstractIncomingMessage) -> None:
        routes.append(
            await bus.route_failure(message, MAPPER_QUEUE, FailureClass.PERMANENT, "bad field")
        )
        await message.ack()
        done.set()

    await bus.consume(MAPPER_QUEUE, handler)
    await asyncio.wait_for(done.wait(), 10)
    dead = await _collect(bus, bus.topology.dlq(MAPPER_QUEUE), 1)
    assert routes == [Routed.DEAD]
    assert dead[0].headers[busmod.H_ATTEMPTS] == 1
    assert dead[0].headers[busmod.H_ERROR_CLASS] == "permanent"
    await dead[0].ack()


async def test_one_record_split_out_of_a_batch_travels_alone(bus: Bus) -> None:
    await bus.publish("changes", "syspro.ArCustomer", _batch(3))
    done = asyncio.Event()

    async def handler(message: AbstractIncomingMessage) -> None:
        batch = decode(message.type, message.body)
        assert isinstance(batch, ChangeBatch)
        bad = batch.split(batch.events[1])
        body = bad.model_dump_json().encode()
        await bus.route_failure(
            message, MAPPER_QUEUE, FailureClass.PERMANENT, "unmappable", body=body
        )
        await message.ack()
        done.set()

    await bus.consume(MAPPER_QUEUE, handler)
    await asyncio.wait_for(done.wait(), 10)
    dead = await _collect(bus, bus.topology.dlq(MAPPER_QUEUE), 1)
    only = decode(dead[0].type, dead[0].body)
    assert [e.key for e in only.events] == ["C1"]  # type: ignore[attr-defined]
    await dead[0].ack()
