"""Backfill through the full pipeline, every service its own process, against the emulators.

    .venv/bin/python -m bench.pipeline [--customers 100000] [--invoices 300000] [--writers 1]

Prints records/s end to end, Zoho write calls and API credits per 1,000 records, p50/p99 latency
from poll to write, the peak RSS of each service; then a resync (every record read, mapped and
decided again: unchanged, so no call to Zoho); then a direct baseline (the same connectors
reading, mapping and writing in one process with the same batching, no bus, no audit) and the
ratio pipeline/baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import date
from typing import Any

import asyncpg

from bench.harness import Bench, cpu_of_command, cpu_seconds, sandbox_connectors
from emulators.sandbox import FLOWS_DIR, ZOHO_CUSTOM_FIELDS, Sandbox, duplicate_creates
from services.runtime import tune_garbage_collector
from shared.connectors.base import Sink, Source
from shared.flow_store import FlowStore
from shared.flows import load_flow_file
from shared.mapping import map_record


async def run_pipeline(
    bench: Bench, total: int, writers: int, *, with_resync: bool = True
) -> dict[str, Any]:
    assert bench.box is not None and bench.pool is not None
    # The services start with the flow disabled and are timed from the moment it is enabled
    # to the last write: a backfill as an operator starts one on running services, without
    # the interpreters' start-up (the baseline runs in a process that has started already).
    flows = FlowStore(bench.pool)
    await flows.set_enabled("syspro-zoho", False)
    bench.spawn("poller")
    bench.spawn("mapper")
    for i in range(writers):
        bench.spawn("writer", f"writer-{i + 1}")
    await bench.services_ready(["poller.notices", "mapper", "writer.zoho_crm"])
    broker0, db0 = cpu_of_command("beam.smp"), cpu_of_command("postgres")
    bench.start_cpu_count()
    started = time.monotonic()
    await flows.set_enabled("syspro-zoho", True)
    enabled_at = await bench.pool.fetchval("SELECT clock_timestamp()")
    last = 0
    while True:
        await asyncio.sleep(5)
        counts = await bench.box.zoho_counts()
        landed = counts["records"].get("Accounts", 0) + counts["records"].get("Deals", 0)
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
    # the end is the last write's audit row, not the progress check that saw it (every 5 s)
    last_write = await bench.pool.fetchval(
        "SELECT max(at) FROM audit_events WHERE stage = 'written'"
    )
    elapsed = (last_write - enabled_at).total_seconds()
    bench.cpu["rabbitmq"] = cpu_of_command("beam.smp") - broker0
    bench.cpu["postgres"] = cpu_of_command("postgres") - db0
    stats = await bench.box.zoho_stats()
    latency = await bench.latency()
    # every audit row of the backfill: a record that failed, or was retried because its parent
    # was not written yet (a second pass through the writer), shows here
    outcomes = await audit_outcomes(bench.pool)
    resync = await run_resync(bench, total) if with_resync else None
    bench.stop_services()
    return {
        "elapsed": elapsed,
        "stats": stats,
        "latency": latency,
        "outcomes": outcomes,
        "resync": resync,
    }


async def audit_outcomes(
    pool: asyncpg.Pool, *, after_id: int | None = None, stages: list[str] | None = None
) -> dict[str, int]:
    """Audit rows counted by stage, status and error class ("written/insert": 100), those
    after ``after_id`` and of ``stages`` where given."""
    rows = await pool.fetch(
        "SELECT stage, status, coalesce(error_class, '') AS error_class, count(*) AS n"
        " FROM audit_events WHERE id > coalesce($1, 0)"
        " AND ($2::text[] IS NULL OR stage = ANY($2)) GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        after_id,
        stages,
    )
    return {
        "/".join(filter(None, (r["stage"], r["status"], r["error_class"]))): r["n"] for r in rows
    }


async def run_resync(bench: Bench, total: int) -> dict[str, Any]:
    """``flows resync``: the poller forgets cursor and snapshots and reads everything again;
    every record goes through mapper and writer, which must find each one unchanged and
    make no call to Zoho at all."""
    assert bench.box is not None and bench.pool is not None
    calls_before = (await bench.box.zoho_stats())["write_calls"]
    mark = await bench.pool.fetchval("SELECT max(id) FROM audit_events")
    started = time.monotonic()
    await FlowStore(bench.pool).resync("syspro-zoho")
    # Count each new audit row once (counting everything since the mark every 2 s made the
    # monitor itself a load on PostgreSQL that grew with the square of the run: 26 s of it).
    decided, seen = 0, mark
    while True:
        await asyncio.sleep(2)
        row = await bench.pool.fetchrow(
            "SELECT count(*) FILTER (WHERE stage IN ('written', 'skipped')) AS n, max(id) AS top"
            " FROM audit_events WHERE id > $1",
            seen,
        )
        decided += row["n"]
        seen = row["top"] or seen
        if decided >= total:
            break
        if time.monotonic() - started > 900:
            raise SystemExit(f"resync: only {decided} of {total} records decided in 15 min")
    outcomes = await audit_outcomes(bench.pool, after_id=mark, stages=["written", "skipped"])
    return {
        "elapsed": time.monotonic() - started,
        "outcomes": outcomes,
        "write_calls": (await bench.box.zoho_stats())["write_calls"] - calls_before,
    }


async def run_baseline(bench: Bench) -> dict[str, Any]:
    """The same connectors and mapping in one process: read, map, upsert in batches of 100."""
    box = bench.box
    assert box is not None
    tune_garbage_collector()  # as in every service process: a like-for-like comparison
    await reset_zoho(box)
    flow = load_flow_file(FLOWS_DIR / "syspro-zoho.yaml")
    source, sink = sandbox_connectors(box)
    assert isinstance(source, Source) and isinstance(sink, Sink)
    ids: dict[str, str] = {}
    today = date.today()
    emulators = {k: p.pid for k, p in bench.procs.items() if k.startswith("emulator")}
    cpu0 = {k: cpu_seconds(pid) for k, pid in emulators.items()}
    own0 = time.process_time()
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
        cpu = {k: cpu_seconds(pid) - cpu0[k] for k, pid in emulators.items()}
        cpu["baseline"] = time.process_time() - own0
    finally:
        await source.close()
        await sink.close()
    return {"elapsed": elapsed, "stats": await box.zoho_stats(), "cpu": cpu}


async def reset_zoho(box: Sandbox) -> None:
    """An empty Zoho organisation with the flow's custom fields (records, counters, tokens)."""
    await box.control("zoho", "POST", "/_control/reset", {})
    for module, fields in ZOHO_CUSTOM_FIELDS.items():
        await box.control("zoho", "POST", "/_control/fields", {"module": module, "fields": fields})


def per_record(cpu: dict[str, float], total: int) -> str:
    """CPU microseconds per record, in all and by process."""
    parts = ", ".join(f"{k} {v / total * 1e6:.0f}" for k, v in sorted(cpu.items()))
    return f"{sum(cpu.values()) / total * 1e6:.0f} us ({parts})"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--invoices", type=int, default=300_000)
    parser.add_argument("--writers", type=int, default=1)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--no-resync", action="store_true", help="skip the unchanged re-read")
    args = parser.parse_args()
    total = args.customers + args.invoices
    bench = Bench()
    try:
        await bench.start_emulators()
        await bench.prepare(args.customers, args.invoices)
        # The baseline runs before and after the pipeline: this machine's speed drifts by
        # 10-20% over minutes, and the ratio is taken against the mean of the two.
        bases = []
        if not args.no_baseline:
            bases.append(await run_baseline(bench))
            print(f"baseline before the pipeline: {bases[0]['elapsed']:.1f} s")
            assert bench.box is not None
            await reset_zoho(bench.box)
        print(f"pipeline: poller, mapper, {args.writers} writer(s), each its own process")
        result = await run_pipeline(bench, total, args.writers, with_resync=not args.no_resync)
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
        print("  Zoho calls by route: " + ", ".join(f"{k} {v}" for k, v in stats["calls"].items()))
        print(
            f"  latency poll -> write: p50 {result['latency']['p50']:.2f} s,"
            f" p99 {result['latency']['p99']:.2f} s"
        )
        print(
            "  audit rows of the backfill: "
            + ", ".join(f"{k} {v}" for k, v in result["outcomes"].items())
        )
        print("  peak RSS MB: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(bench.peaks.items())))
        print(
            "  CPU seconds during the run (of which in the kernel): "
            + ", ".join(
                f"{k} {v:.0f}" + (f" ({bench.system_cpu[k]:.0f})" if k in bench.system_cpu else "")
                for k, v in sorted(bench.cpu.items())
            )
        )
        if result["resync"]:
            resync = result["resync"]
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(resync["outcomes"].items()))
            print(
                f"RESYNC    every record read, mapped and decided again in"
                f" {resync['elapsed']:.1f} s ({outcomes}); Zoho write calls"
                f" {resync['write_calls']}"
            )
        if bases:
            bases.append(await run_baseline(bench))
            for when, base in zip(("before", "after"), bases, strict=True):
                print(
                    f"BASELINE  {total} records in {base['elapsed']:.1f} s ="
                    f" {total / base['elapsed']:,.0f} records/s ({when} the pipeline; one"
                    f" process, same connectors and batching, no bus, no audit); write calls"
                    f" {base['stats']['write_calls']}"
                )
            base_rate = sum(total / b["elapsed"] for b in bases) / len(bases)
            print(f"RATIO     pipeline/baseline = {rate / base_rate:.2f} (against their mean)")
            for when, base in zip(("before", "after"), bases, strict=True):
                print(f"  CPU per record: baseline {when} " + per_record(base["cpu"], total))
            print("  CPU per record: pipeline " + per_record(bench.cpu, total))
    finally:
        await bench.close()


if __name__ == "__main__":
    asyncio.run(main())
