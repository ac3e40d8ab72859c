"""``ml-connector demo``: emulated SYSPRO and Zoho CRM, every service, records flowing.

It starts the emulators on 127.0.0.1, migrates, registers the emulator connections, applies the
ready flow files, runs all services in this process, backfills, then makes changes in the
emulated ERP for a while, showing live progress, and ends with a summary and the commands to
look further.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from dataclasses import dataclass
from typing import Any

from emulators.sandbox import Sandbox, duplicate_creates
from services.cli import run_services
from shared import db
from shared.bus import Bus
from shared.connections import ConnectionStore
from shared.flow_store import FlowStore
from shared.settings import Settings
from shared.vault import Vault

DEMO_FLOWS = ("syspro-zoho.yaml",)


@dataclass
class DemoOptions:
    customers: int = 2000
    invoices: int = 6000
    duration_s: float = 60.0
    poll_interval_s: float = 5.0
    progress_every_s: float = 2.0

    @classmethod
    def for_mode(
        cls,
        short: bool,
        customers: int | None = None,
        invoices: int | None = None,
        duration: float | None = None,
    ) -> DemoOptions:
        base = cls(200, 600, 8.0, 2.0, 1.0) if short else cls()
        if customers is not None:
            base.customers = customers
        if invoices is not None:
            base.invoices = invoices
        if duration is not None:
            base.duration_s = duration
        return base


def _free(port: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


async def _counts(pool: Any, flows: list[str]) -> dict[str, int]:
    """Rows per stage. Records mapped are the commands the writer has seen (its rows say when
    they were mapped); the mapper's own rows are records it could not map: failed."""
    rows = await pool.fetch(
        """SELECT CASE WHEN stage = 'mapped' THEN 'failed' ELSE stage END AS stage, count(*) AS n
           FROM audit_events WHERE flow = ANY($1::text[]) GROUP BY 1
           UNION ALL
           SELECT 'mapped', count(DISTINCT command_id) FROM audit_events
           WHERE flow = ANY($1::text[]) AND mapped_at IS NOT NULL""",
        flows,
    )
    return {r["stage"]: r["n"] for r in rows}


async def _queue_ready(bus: Bus) -> tuple[int, int]:
    work = dead = 0
    for depth in await bus.queue_depths():
        if depth.name.endswith(".dlq"):
            dead += depth.ready
        else:
            work += depth.ready + (depth.unacked or 0)
    return work, dead


def _line(
    elapsed: float, counts: dict[str, int], zoho: dict[str, int], work: int, dead: int
) -> str:
    return (
        f"[{elapsed:6.1f}s] polled {counts.get('polled', 0):>6}"
        f"  mapped {counts.get('mapped', 0):>6}"
        f"  written {counts.get('written', 0):>6}  skipped {counts.get('skipped', 0):>5}"
        f"  failed {counts.get('failed', 0):>4} | in queues {work:>5}  dead letters {dead:>3}"
        f" | Zoho Accounts {zoho.get('Accounts', 0):>6}  Deals {zoho.get('Deals', 0):>6}"
    )


async def run_demo(settings: Settings, options: DemoOptions) -> int:
    dsn = settings.database_url.get_secret_value()
    print("ml-connector demo: SYSPRO -> Zoho CRM, both emulated on 127.0.0.1")
    await db.ensure_database(dsn)
    await db.migrate(dsn)
    box = await Sandbox.start(
        customers=options.customers,
        invoices=options.invoices,
        syspro_port=_free(8101),
        zoho_port=_free(8102),
    )
    print(
        f"  SYSPRO emulator  {box.syspro.url}  ({options.customers} customers,"
        f" {options.invoices} invoices)"
    )
    print(f"  Zoho CRM emulator {box.zoho.url}")
    pool = await db.create_pool(dsn)
    flows_store = FlowStore(pool)
    stop = asyncio.Event()
    services: asyncio.Task[None] | None = None
    bus = Bus(settings.amqp_url.get_secret_value(), _topology(settings))
    try:
        applied = await box.register(
            ConnectionStore(pool, Vault.from_settings(settings)),
            flows_store,
            flow_files=DEMO_FLOWS,
            poll_interval=options.poll_interval_s,
        )
        names = [f.name for f in applied]
        await _reset_demo_state(pool, names)
        await bus.connect()
        await bus.declare()
        for q in bus.topology.all_queue_names():
            with contextlib.suppress(Exception):
                await (await bus.channel.get_queue(q)).purge()
        print(f"  flows applied: {', '.join(names)} (poll every {options.poll_interval_s:g} s)")
        print("  starting poller, mapper, writer and webhooks")
        started = time.monotonic()
        # the webhook receiver on its usual port if it is free, else on any free port: a demo
        # never fails because something else listens on 8300
        if settings.webhook_port and not _free(settings.webhook_port):
            settings = settings.model_copy(update={"webhook_port": 0})
        services = asyncio.create_task(run_services(settings, "all", 0, stop))
        expected = options.customers + options.invoices

        async def progress() -> tuple[dict[str, int], dict[str, int], int, int]:
            counts = await _counts(pool, names)
            zoho = (await box.zoho_stats())["records"]
            work, dead = await _queue_ready(bus)
            print(_line(time.monotonic() - started, counts, zoho, work, dead), flush=True)
            return counts, zoho, work, dead

        print("backfill:")
        deadline = time.monotonic() + max(120.0, expected / 200)
        while time.monotonic() < deadline:
            await asyncio.sleep(options.progress_every_s)
            _, zoho, work, _ = await progress()
            if zoho.get("Accounts", 0) + zoho.get("Deals", 0) >= expected and work == 0:
                break
            if services.done():
                break
        backfill_s = time.monotonic() - started
        print(f"changes in the ERP for {options.duration_s:g} s:")
        rng = random.Random(7)
        changed = 0
        change_until = time.monotonic() + options.duration_s
        while time.monotonic() < change_until and not services.done():
            table = rng.choice(["ArCustomer", "ArInvoice"])
            result = await box.control(
                "syspro",
                "POST",
                "/_control/change",
                {"table": table, "count": rng.randint(2, 8), "seed": rng.randint(1, 10**6)},
            )
            changed += int(result.get("count", 0))
            await asyncio.sleep(options.progress_every_s)
            await progress()
        print("waiting for the last changes to land:")
        settle = time.monotonic() + max(30.0, options.poll_interval_s * 4)
        quiet = 0
        last_written = -1
        while time.monotonic() < settle and not services.done():
            await asyncio.sleep(options.progress_every_s)
            counts, _, work, _ = await progress()
            written = counts.get("written", 0) + counts.get("skipped", 0)
            quiet = quiet + 1 if (work == 0 and written == last_written) else 0
            last_written = written
            if quiet >= max(2, int(options.poll_interval_s * 2 / options.progress_every_s)):
                break
        total_s = time.monotonic() - started
        if services.done() and not services.cancelled() and services.exception() is not None:
            print(f"  the services stopped: {services.exception()}")
            return 1
        return await _summary(pool, box, bus, names, options, changed, backfill_s, total_s)
    finally:
        stop.set()
        if services is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(services, 60)
        with contextlib.suppress(Exception):
            await bus.close()
        await pool.close()
        await box.stop()


def _topology(settings: Settings) -> Any:
    from services.runtime import topology_from

    return topology_from(settings)


async def _reset_demo_state(pool: Any, flows: list[str]) -> None:
    """A demo starts from empty emulators: forget links, cursors and snapshots of its flows."""
    for table in ("record_links", "source_snapshots", "cursors"):
        await pool.execute(f"DELETE FROM {table} WHERE flow = ANY($1::text[])", flows)
    await pool.execute("DELETE FROM audit_events WHERE flow = ANY($1::text[])", flows)
    await pool.execute("DELETE FROM token_cache WHERE connection IN ('syspro', 'zoho')")


async def _summary(
    pool: Any,
    box: Sandbox,
    bus: Bus,
    flows: list[str],
    options: DemoOptions,
    changed: int,
    backfill_s: float,
    total_s: float,
) -> int:
    counts = await _counts(pool, flows)
    stats = await box.zoho_stats()
    zoho = stats["records"]
    customers = len(await box.syspro_rows("ArCustomer"))
    invoices = len(await box.syspro_rows("ArInvoice"))
    _, dead = await _queue_ready(bus)
    duplicates = duplicate_creates(stats)
    expected = options.customers + options.invoices
    ok = (
        zoho.get("Accounts", 0) == customers
        and zoho.get("Deals", 0) == invoices
        and duplicates == 0
        and dead == 0
    )
    print()
    print("SUMMARY")
    print(f"  SYSPRO   {customers} customers, {invoices} invoices; {changed} changes made")
    print(
        f"  Zoho CRM {zoho.get('Accounts', 0)} accounts, {zoho.get('Deals', 0)} deals;"
        f" duplicates {duplicates}"
    )
    print(
        f"  backfill {expected} records in {backfill_s:.1f} s"
        f" ({expected / max(backfill_s, 0.001):.0f} records/s); whole run {total_s:.1f} s"
    )
    print(
        f"  records  polled {counts.get('polled', 0)}, mapped {counts.get('mapped', 0)},"
        f" written {counts.get('written', 0)}, skipped {counts.get('skipped', 0)},"
        f" failed {counts.get('failed', 0)}"
    )
    print(
        f"  Zoho API write calls {stats['write_calls']}, credits {stats['credits_used']},"
        f" token grants {stats['tokens_issued']}"
    )
    print(f"  dead letters {dead}")
    print(f"  result   {'OK: every record landed exactly once' if ok else 'NOT OK: see above'}")
    print()
    print("Look further:")
    print("  ml-connector status")
    print("  ml-connector audit syspro:ArCustomer:<customer number>")
    print("  ml-connector audit --failed --since 1h")
    print("  ml-connector dlq list")
    return 0 if ok else 1
