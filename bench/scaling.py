"""Writer scaling on a latency-bound target: the Zoho emulator answers each call after 200 ms.

    .venv/bin/python -m bench.scaling [--records 20000] [--concurrency 1]

The commands are queued first (poller and mapper run, no writer); then 1, 2 and 4 writer
processes drain the same backlog and the time to land every record is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from bench.harness import AMQP, Bench
from emulators.sandbox import duplicate_creates
from services.runtime import topology_from
from shared.bus import MAPPER_QUEUE, Bus, writer_queue


async def one_run(writers: int, records: int, concurrency: int) -> tuple[float, dict[str, Any]]:
    bench = Bench()
    try:
        box = await bench.start_emulators()
        await bench.prepare(records, 0)
        bench.spawn("poller")
        bench.spawn("mapper")
        await commands_queued(bench, records)
        await box.control("zoho", "POST", "/_control/faults", {"latency_ms": 200})
        started = time.monotonic()
        for i in range(writers):
            bench.spawn("writer", f"writer-{i}", MLC_WRITER_CONCURRENCY=str(concurrency))
        while (await box.zoho_counts())["records"].get("Accounts", 0) < records:
            await asyncio.sleep(0.2)
        return time.monotonic() - started, await box.zoho_stats()
    finally:
        await bench.close()


async def commands_queued(bench: Bench, records: int) -> None:
    """Wait until the mapper has queued the commands of every record for the writers: the
    mapper's queue is empty and the writers' queue holds at least a message per 100 records,
    unchanged for a second (the mapper audits no mapped record: the writer's rows say it)."""
    topology = topology_from(bench.settings)
    mapper_q, writer_q = topology.queue(MAPPER_QUEUE), topology.queue(writer_queue("zoho_crm"))
    bus = await Bus(AMQP, topology).connect()
    try:
        last, steady_since = -1, time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            depths = {d.name: d.ready for d in await bus.queue_depths()}
            queued = depths.get(writer_q, 0)
            if queued != last:
                last, steady_since = queued, time.monotonic()
            elif (
                depths.get(mapper_q, 0) == 0
                and queued * 100 >= records
                and time.monotonic() - steady_since >= 1.0
            ):
                return
    finally:
        await bus.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=1, help="calls in flight per writer")
    args = parser.parse_args()
    print(
        f"writer scaling: {args.records} records queued, Zoho answers after 200 ms,"
        f" {args.concurrency} call(s) in flight per writer"
    )
    rates = {}
    for writers in (1, 2, 4):
        elapsed, stats = await one_run(writers, args.records, args.concurrency)
        rates[writers] = args.records / elapsed
        print(
            f"  {writers} writer(s): {elapsed:6.1f} s = {rates[writers]:7,.0f} records/s"
            f"  ({rates[writers] / rates[1]:.2f}x); write calls {stats['write_calls']},"
            f" duplicates {duplicate_creates(stats)}",
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main())
