"""Steady load: source changes at a fixed rate; latency from change to target write, memory
over time.

    .venv/bin/python -m bench.steady [--rate 200] [--minutes 5] [--customers 20000]

The flow polls every 2 s; the SYSPRO emulator changes ``rate`` customers a second. Right after
each change the bench reads the changed rows through the SYSPRO connector (as the poller will)
and takes the content hash of the columns the flow reads: the version the poller publishes and
the writer records in its audit row. An edit of columns the flow does not read (a salesperson)
leaves that version as it was: the poller publishes nothing, and the bench counts it apart. A
change is done when the writer has decided on its version or a later one of the same record:
``written`` (an API call), or ``skipped`` when the target payload came out unchanged. Latency
is measured from the change to that decision; a change without one is counted as lost.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime

from bench.harness import Bench, sandbox_connectors
from emulators.sandbox import FLOWS_DIR, Sandbox
from shared.connectors.base import Source
from shared.flows import EntityMapping, Flow, load_flow_file
from shared.mapping import map_record
from shared.messages import content_hash


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=200, help="changes per second")
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--settle", type=float, default=30, help="seconds to wait at the end")
    args = parser.parse_args()
    bench = Bench()
    source = sink = None
    try:
        box = await bench.start_emulators()
        await bench.prepare(args.customers, 0, poll_interval=2)
        for service in ("poller", "mapper", "writer"):
            bench.spawn(service)
        assert bench.pool is not None
        while (await box.zoho_counts())["records"].get("Accounts", 0) < args.customers:
            await asyncio.sleep(1)
        print(
            f"backfill of {args.customers} customers done; {args.rate} changes/s for"
            f" {args.minutes:g} min",
            flush=True,
        )
        source, sink = sandbox_connectors(box)
        assert isinstance(source, Source)
        flow = load_flow_file(FLOWS_DIR / "syspro-zoho.yaml")
        customers = flow.entity("customers")
        stream = customers.stream()
        # The version of every customer as the poller sees it, to tell the changes the flow
        # must carry from edits of columns it does not read (they never leave the poller).
        known: dict[str, str] = {}
        async for page in source.changed_since(stream, None):
            known.update((stream.key_of(r), content_hash(customers.project(r))) for r in page)
        initial = dict(known)
        unread = 0
        changes: list[Change] = []
        started = time.monotonic()
        end = started + args.minutes * 60
        tick = 0
        calls_before = (await box.zoho_stats())["write_calls"]
        while time.monotonic() < end:
            t0 = time.monotonic()
            result = await box.control(
                "syspro",
                "POST",
                "/_control/change",
                {"table": "ArCustomer", "count": args.rate, "seed": tick},
            )
            now = datetime.now(UTC)
            keys = [key.strip() for key in result.get("keys", [])]
            rows = await source.fetch(stream, keys)
            for row in rows:
                key, version = stream.key_of(row), content_hash(customers.project(row))
                if known.get(key) == version:
                    unread += 1
                else:
                    known[key] = version
                    changes.append(Change(key, now, version))
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
        await asyncio.sleep(args.settle)  # let the last changes land
        stats = await box.zoho_stats()
        print(f"  {unread} edits touched only columns the flow does not read (nothing to do)")
        report(changes, initial, await decisions(bench), args, stats["write_calls"] - calls_before)
        differ = await end_state(box, source, flow, customers)
        print(
            f"  end state: {differ} of {args.customers} Zoho accounts differ from their"
            " SYSPRO customer"
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
        for connector in (source, sink):
            if connector is not None:
                await connector.close()
        await bench.close()


@dataclass
class Change:
    key: str
    at: datetime
    version: str


@dataclass
class Decision:
    at: datetime
    version: str
    written: bool


async def decisions(bench: Bench) -> dict[str, list[Decision]]:
    """The writer's decisions per customer: written (an API call) or skipped as unchanged."""
    assert bench.pool is not None
    rows = await bench.pool.fetch(
        """SELECT split_part(source_ref, ':', 3) AS key, at, stage,
                  source_version AS version
           FROM audit_events
           WHERE source_ref LIKE 'syspro:ArCustomer:%'
             AND (stage = 'written' OR (stage = 'skipped' AND status = 'unchanged'))
           ORDER BY at"""
    )
    out: dict[str, list[Decision]] = defaultdict(list)
    for row in rows:
        out[row["key"]].append(Decision(row["at"], row["version"], row["stage"] == "written"))
    return out


def report(
    changes: list[Change],
    initial: dict[str, str],
    done: dict[str, list[Decision]],
    args: argparse.Namespace,
    calls: int,
) -> None:
    """Latency of each change: to the first decision on its version or a later version of the
    same record (a later version carries this change too). When a record comes back to a
    version it had before (an on-hold flag set, then cleared), the edits on the way are
    indistinguishable from that earlier version, and the poller rightly publishes nothing
    for them: they are counted apart and left to the end-state check."""
    per_key: dict[str, list[Change]] = defaultdict(list)
    for change in changes:
        per_key[change.key].append(change)
    written: list[float] = []
    skipped: list[float] = []
    lost: list[Change] = []
    reverting = 0
    for key, series in per_key.items():
        history = [initial.get(key), *(c.version for c in series)]
        for i, change in enumerate(series):
            before = set(history[: i + 1])
            later = history[i + 2 :]
            if change.version in before or any(v in before or v == change.version for v in later):
                reverting += 1  # this edit, or one after it, went back to an earlier version
                continue
            versions = {c.version for c in series[i:]}
            first = next(
                (d for d in done.get(key, []) if d.at >= change.at and d.version in versions),
                None,
            )
            if first is None:
                lost.append(change)
            else:
                (written if first.written else skipped).append(
                    (first.at - change.at).total_seconds()
                )
    both = sorted(written + skipped)
    written.sort()
    print(
        f"STEADY  {len(changes)} changes at {args.rate}/s for {args.minutes:g} min:"
        f" {len(written)} written, {len(skipped)} skipped (payload unchanged),"
        f" {len(lost)} without a decision {args.settle:g} s after the end;"
        f" {reverting} edits back to an earlier version (end state only)"
    )
    print(
        f"  change -> write:    p50 {pct(written, 0.5):.2f} s, p99 {pct(written, 0.99):.2f} s,"
        f" max {written[-1] if written else 0:.2f} s"
    )
    print(
        f"  change -> decision: p50 {pct(both, 0.5):.2f} s, p99 {pct(both, 0.99):.2f} s,"
        f" max {both[-1] if both else 0:.2f} s"
    )
    print(
        f"  Zoho write calls during the load: {calls}"
        f" ({calls / max(1, len(written)) * 1000:.1f} per 1,000 written records)"
    )
    for change in lost[:5]:
        print(f"  no decision: {change.key} changed at {change.at:%H:%M:%S.%f}")


# The Zoho fields the emulator's edits move (phone, credit, hold, contact, address).
CHECKED = ("Phone", "Credit_Limit", "On_Hold", "ERP_Contact", "Email", "Billing_Street")


async def end_state(box: Sandbox, source: Source, flow: Flow, entity: EntityMapping) -> int:
    """Customers whose Zoho account differs from what the flow makes of the SYSPRO row now."""
    stream = entity.stream()
    accounts = {a["ERP_Customer_No"]: a for a in await box.zoho_records("Accounts")}
    today = date.today()
    differ = 0
    async for page in source.changed_since(stream, None):
        for row in page:
            payload, _ = map_record(flow, entity, entity.project(row), today=today)
            account = accounts.get(payload["ERP_Customer_No"], {})
            if any(_norm(account.get(f)) != _norm(payload.get(f)) for f in CHECKED):
                differ += 1
    return differ


def _norm(value: object) -> object:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


if __name__ == "__main__":
    asyncio.run(main())
