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

from bench.harness import Bench
from emulators.sandbox import duplicate_creates


async def one_run(writers: int, records: int, concurrency: int) -> tuple[float, dict[str, Any]]:
    bench = Bench()
    try:
        box = await bench.start_emulators()
        await bench.prepare(records, 0)
        bench.spawn("poller")
        bench.spawn("mapper")
        assert bench.pool is not None
        while (
            await bench.pool.fetchval("SELECT count(*) FROM audit_events WHERE stage = 'mapped'")
            < records
        ):
            await asyncio.sleep(0.5)
        await box.control("zoho", "POST", "/_control/faults", {"latency_ms": 200})
        started = time.monotonic()
        for i in range(writers):
            bench.spawn("writer", f"writer-{i}", MLC_WRITER_CONCURRENCY=str(concurrency))
        while (await box.zoho_stats())["records"].get("Accounts", 0) < records:
            await asyncio.sleep(0.2)
        return time.monotonic() - started, await box.zoho_stats()
    finally:
        await bench.close()


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
