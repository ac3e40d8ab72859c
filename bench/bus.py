"""Bus throughput: persistent publish with confirms, and consume with ack, on a quorum queue.

    .venv/bin/python -m bench.bus [--messages 2000]

Prints messages/s and records/s for batches of 1, 100 and 500 records per message.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

from aio_pika.abc import AbstractIncomingMessage

from shared.bus import MAPPER_QUEUE, Bus, Topology
from shared.messages import ChangeBatch, ChangeEvent

RECORD = {
    "Customer": "C000123",
    "Name": "Acme Industrial (Pty) Ltd",
    "Telephone": "011 555 0100",
    "SoldToAddr1": "12 Main Road",
    "SoldToAddr3": "Johannesburg",
    "CreditLimit": 250000,
    "Currency": "ZAR",
    "TermsCode": "30",
    "Email": "jane@acme.example",
}


def batch(size: int) -> ChangeBatch:
    return ChangeBatch(
        flow="bench",
        entity="ArCustomer",
        events=[
            ChangeEvent(
                flow="bench",
                flow_version=1,
                source_connection="syspro",
                source_system="syspro",
                entity="ArCustomer",
                key=f"C{i:06d}",
                version="h",
                record=RECORD,
            )
            for i in range(size)
        ],
    )


async def measure(url: str, size: int, messages: int, in_flight: int) -> dict[str, float]:
    topo = Topology(prefix=f"bench{uuid.uuid4().hex[:6]}", retry_delays_s=[5], writer_targets=())
    bus = await Bus(url, topo).connect()
    await bus.declare()
    message = batch(size)
    try:
        started = time.perf_counter()
        sem = asyncio.Semaphore(in_flight)

        async def one() -> None:
            async with sem:
                await bus.publish("changes", "syspro.ArCustomer", message)

        await asyncio.gather(*(one() for _ in range(messages)))
        publish_s = time.perf_counter() - started

        done = asyncio.Event()
        count = 0

        async def handler(msg: AbstractIncomingMessage) -> None:
            nonlocal count
            await msg.ack()
            count += 1
            if count >= messages:
                done.set()

        started = time.perf_counter()
        await bus.consume(MAPPER_QUEUE, handler, prefetch=300)
        await asyncio.wait_for(done.wait(), timeout=600)
        consume_s = time.perf_counter() - started
    finally:
        await bus.delete_topology()
        await bus.close()
    return {
        "publish_msg_s": messages / publish_s,
        "consume_msg_s": messages / consume_s,
        "bytes": len(message.model_dump_json()),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--url", default=os.environ.get("MLC_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=100)
    args = parser.parse_args()
    print(
        f"bus benchmark: quorum queue, persistent, publisher confirms, {args.in_flight} in flight"
    )
    print(
        f"{'records/msg':>11} {'msg bytes':>10} {'publish msg/s':>14} {'publish rec/s':>14}"
        f" {'consume msg/s':>14} {'consume rec/s':>14}"
    )
    for size in (1, 100, 500):
        n = args.messages if size == 1 else max(200, args.messages // (size // 10))
        r = await measure(args.url, size, n, args.in_flight)
        print(
            f"{size:>11} {r['bytes']:>10} {r['publish_msg_s']:>14.0f}"
            f" {r['publish_msg_s'] * size:>14.0f} {r['consume_msg_s']:>14.0f}"
            f" {r['consume_msg_s'] * size:>14.0f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
