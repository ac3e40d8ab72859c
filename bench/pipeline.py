"""Backfill through the full pipeline, every service its own process, against the emulators.

    .venv/bin/python -m bench.pipeline [--customers 100000] [--invoices 300000] [--writers 1]

Prints records/s end to end, Zoho write calls and API credits per 1,000 records, p50/p99 latency
from poll to write, the peak RSS of each service; then a direct baseline (the same connectors
reading, mapping and writing in one process with the same batching, no bus, no audit) and the
ratio pipeline/baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import date
from typing import Any

from bench.harness import Bench, cpu_of_command, sandbox_connectors
from emulators.sandbox import FLOWS_DIR, ZOHO_CUSTOM_FIELDS, Sandbox, duplicate_creates
from shared.connectors.base import Sink, Source
from shared.flows import load_flow_file
from shared.mapping import map_record


async def run_pipeline(bench: Bench, total: int, writers: int) -> dict[str, Any]:
    assert bench.box is not None
    broker0, db0 = cpu_of_command("beam.smp"), cpu_of_command("postgres")
    started = time.monotonic()
    bench.spawn("poller")
    bench.spawn("mapper")
    for i in range(writers):
        bench.spawn("writer", f"writer-{i + 1}")
    last = 0
    while True:
        await asyncio.sleep(5)
        stats = await bench.box.zoho_stats()
        landed = stats["records"].get("Accounts", 0) + stats["records"].get("Deals", 0)
        mem = bench.sample_memory()
        elapsed = time.monotonic() - started
        print(
            f"  [{elapsed:6.0f} s] landed {landed:>7}/{total}  ({(landed - last) / 5:,.0f}/s now)"
            f"  RSS MB: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(mem.items())),
            flush=True,
        )
        last = landed
        if landed >= total:
            break
        dead = [label for label, p in bench.procs.items() if p.poll() is not None]
        if dead:
            raise SystemExit(f"process(es) exited: {dead}")
    elapsed = time.monotonic() - started
    bench.cpu["rabbitmq"] = cpu_of_command("beam.smp") - broker0
    bench.cpu["postgres"] = cpu_of_command("postgres") - db0
    stats = await bench.box.zoho_stats()
    latency = await bench.latency()
    bench.stop_services()
    return {"elapsed": elapsed, "stats": stats, "latency": latency}


async def run_baseline(box: Sandbox) -> dict[str, Any]:
    """The same connectors and mapping in one process: read, map, upsert in batches of 100."""
    await box.control("zoho", "POST", "/_control/reset", {})
    for module, fields in ZOHO_CUSTOM_FIELDS.items():
        await box.control("zoho", "POST", "/_control/fields", {"module": module, "fields": fields})
    flow = load_flow_file(FLOWS_DIR / "syspro-zoho.yaml")
    source, sink = sandbox_connectors(box)
    assert isinstance(source, Source) and isinstance(sink, Sink)
    ids: dict[str, str] = {}
    today = date.today()
    started = time.monotonic()
    slots = asyncio.Semaphore(4)
    try:
        for entity in flow.entities:
            stream = entity.stream(5000)
            tasks = []

            async def write(batch: list[dict[str, Any]], keys: list[str], entity=entity) -> None:
                async with slots:
                    outcomes = await sink.upsert(
                        entity.target.entity, batch, list(entity.target.match_on)
                    )
                for key, outcome in zip(keys, outcomes, strict=True):
                    if entity.name == "customers" and outcome.target_id:
                        ids[key] = outcome.target_id

            batch: list[dict[str, Any]] = []
            keys: list[str] = []
            async for page in source.changed_since(stream, None):
                for record in page:
                    payload, parents = map_record(flow, entity, record, today=today)
                    for ref in parents:
                        payload[ref.field] = {"id": ids[ref.source_key]}
                    batch.append(payload)
                    keys.append(stream.key_of(record))
                    if len(batch) == sink.max_batch:
                        tasks.append(asyncio.create_task(write(batch, keys)))
                        batch, keys = [], []
            if batch:
                tasks.append(asyncio.create_task(write(batch, keys)))
            await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
    finally:
        await source.close()
        await sink.close()
    return {"elapsed": elapsed, "stats": await box.zoho_stats()}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--invoices", type=int, default=300_000)
    parser.add_argument("--writers", type=int, default=1)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    total = args.customers + args.invoices
    bench = Bench()
    try:
        box = await bench.start_emulators()
        await bench.prepare(args.customers, args.invoices)
        print(f"pipeline: poller, mapper, {args.writers} writer(s), each its own process")
        result = await run_pipeline(bench, total, args.writers)
        stats = result["stats"]
        rate = total / result["elapsed"]
        minimum = -(-args.customers // 100) - (-args.invoices // 100)
        print()
        print(f"PIPELINE  {total} records in {result['elapsed']:.1f} s = {rate:,.0f} records/s")
        print(
            f"  Zoho write calls {stats['write_calls']} (minimum {minimum},"
            f" {stats['write_calls'] / minimum:.3f}x), {stats['write_calls'] / total * 1000:.2f}"
            f" per 1,000 records; credits {stats['credits_used']}"
            f" ({stats['credits_used'] / total * 1000:.1f} per 1,000); token grants"
            f" {stats['tokens_issued']}; duplicates {duplicate_creates(stats)}"
        )
        print(
            f"  latency poll -> write: p50 {result['latency']['p50']:.2f} s,"
            f" p99 {result['latency']['p99']:.2f} s"
        )
        print("  peak RSS MB: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(bench.peaks.items())))
        print(
            "  CPU seconds during the run (of which in the kernel): "
            + ", ".join(
                f"{k} {v:.0f}" + (f" ({bench.system_cpu[k]:.0f})" if k in bench.system_cpu else "")
                for k, v in sorted(bench.cpu.items())
            )
        )
        if not args.no_baseline:
            base = await run_baseline(box)
            base_rate = total / base["elapsed"]
            print(
                f"BASELINE  {total} records in {base['elapsed']:.1f} s = {base_rate:,.0f}"
                f" records/s (one process, same connectors and batching, no bus, no audit);"
                f" write calls {base['stats']['write_calls']}"
            )
            print(f"RATIO     pipeline/baseline = {rate / base_rate:.2f}")
    finally:
        await bench.close()


if __name__ == "__main__":
    asyncio.run(main())
