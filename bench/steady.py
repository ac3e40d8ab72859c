"""Steady load: source changes at a fixed rate; latency from change to target write, memory
over time.

    .venv/bin/python -m bench.steady [--rate 200] [--minutes 5] [--customers 20000]

The flow polls every 2 s; the SYSPRO emulator changes ``rate`` customers a second. Latency is
measured per change: from the moment the change was made to the moment the writer's audit row
says it was written.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime

from bench.harness import Bench


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=200, help="changes per second")
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--customers", type=int, default=20_000)
    args = parser.parse_args()
    bench = Bench()
    try:
        box = await bench.start_emulators()
        await bench.prepare(args.customers, 0, poll_interval=2)
        for service in ("poller", "mapper", "writer"):
            bench.spawn(service)
        assert bench.pool is not None
        while (await box.zoho_stats())["records"].get("Accounts", 0) < args.customers:
            await asyncio.sleep(1)
        print(
            f"backfill of {args.customers} customers done; {args.rate} changes/s for"
            f" {args.minutes:g} min",
            flush=True,
        )
        changes: list[tuple[str, datetime]] = []
        started = time.monotonic()
        end = started + args.minutes * 60
        tick = 0
        while time.monotonic() < end:
            t0 = time.monotonic()
            result = await box.control(
                "syspro",
                "POST",
                "/_control/change",
                {"table": "ArCustomer", "count": args.rate, "seed": tick},
            )
            now = datetime.now(UTC)
            changes.extend((key.strip(), now) for key in result.get("keys", []))
            tick += 1
            if tick % 30 == 0:
                mem = bench.sample_memory()
                print(
                    f"  [{time.monotonic() - started:5.0f} s] changes {len(changes):>7}  RSS MB: "
                    + ", ".join(
                        f"{k} {v:.0f}"
                        for k, v in sorted(mem.items())
                        if not k.startswith("emulator")
                    ),
                    flush=True,
                )
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
        await asyncio.sleep(15)  # let the last changes land
        # Latency: each change to the first 'written' row of that customer after it.
        rows = await bench.pool.fetch(
            """SELECT split_part(source_ref, ':', 3) AS key, at FROM audit_events
               WHERE stage = 'written' AND source_ref LIKE 'syspro:ArCustomer:%'
               ORDER BY at"""
        )
        written: dict[str, list[datetime]] = {}
        for row in rows:
            written.setdefault(row["key"], []).append(row["at"])
        latencies = []
        missing = 0
        for key, at in changes:
            after = [w for w in written.get(key, []) if w >= at]
            if after:
                latencies.append((after[0] - at).total_seconds())
            else:
                missing += 1
        latencies.sort()

        def pct(q: float) -> float:
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0

        print(
            f"STEADY  {len(changes)} changes at {args.rate}/s for {args.minutes:g} min:"
            f" latency change -> write p50 {pct(0.5):.2f} s, p99 {pct(0.99):.2f} s,"
            f" max {latencies[-1] if latencies else 0:.2f} s; not yet written {missing}"
        )
        first = bench.samples[0][1] if bench.samples else {}
        last = bench.samples[-1][1] if bench.samples else {}
        print(
            "  RSS MB first -> last sample: "
            + ", ".join(
                f"{k} {first.get(k, 0):.0f} -> {last.get(k, 0):.0f}"
                for k in sorted(last)
                if not k.startswith("emulator")
            )
        )
    finally:
        await bench.close()


if __name__ == "__main__":
    asyncio.run(main())
