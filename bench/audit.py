"""Audit trail write rate: COPY in batches through the AuditWriter.

.venv/bin/python -m bench.audit [--rows 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

import asyncpg

from shared import db
from shared.audit import AuditEvent, AuditWriter


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--base", default=os.environ.get("MLC_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
    )
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    name = f"mlc_bench_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(f"{args.base}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = f"{args.base}/{name}"
        await db.migrate(dsn)
        pool = await db.create_pool(dsn)
        writer = await AuditWriter(pool).start()
        started = time.perf_counter()
        for i in range(0, args.rows, 1000):
            writer.add(
                AuditEvent(
                    stage="written",
                    status="update",
                    actor="bench",
                    flow="syspro-zoho",
                    direction="syspro->zoho_crm",
                    source_ref=f"syspro:ArCustomer:C{j:07d}",
                    target_ref=f"zoho_crm:Accounts:{j}",
                    event_id=uuid.uuid4().hex,
                    command_id=uuid.uuid4().hex,
                    transformation="syspro-zoho/customers@v1",
                    details={"source_version": "abc"},
                )
                for j in range(i, min(i + 1000, args.rows))
            )
            await asyncio.sleep(0)
        await writer.close()
        elapsed = time.perf_counter() - started
        count = await pool.fetchval("SELECT count(*) FROM audit_events")
        await pool.close()
        print(
            f"audit benchmark: {count} rows in {elapsed:.2f} s = {count / elapsed:,.0f} rows/s"
            " (COPY, batches of up to 5,000, 5 indexes)"
        )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
