"""End-to-end harness: emulators over real HTTP, every service, the real broker and database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest_asyncio

from emulators.sandbox import Sandbox
from services.cli import run_services
from services.runtime import topology_from
from shared.bus import Bus
from shared.connections import ConnectionStore
from shared.flow_store import FlowStore
from shared.settings import Settings
from shared.vault import Vault

ROOT = Path(__file__).resolve().parents[2]


async def wait_until(
    check: Callable[[], Awaitable[Any]], within: float, what: str, every: float = 0.25
) -> Any:
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {within} s waiting for {what} (last: {last!r})")


async def dump_audit(pool: asyncpg.Pool, limit: int = 60) -> str:
    rows = await pool.fetch(
        "SELECT stage, status, source_ref, error_class, error, actor FROM audit_events"
        " ORDER BY id DESC LIMIT $1",
        limit,
    )
    return "\n".join(str(dict(r)) for r in reversed(rows))


@dataclass
class Pipeline:
    settings: Settings
    pool: asyncpg.Pool
    sandbox: Sandbox
    _tasks: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = field(default_factory=dict)
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        s = self.settings
        return {
            **os.environ,
            "MLC_AMQP_URL": s.amqp_url.get_secret_value(),
            "MLC_DATABASE_URL": s.database_url.get_secret_value(),
            "MLC_BUS_PREFIX": s.bus_prefix,
            "MLC_RETRY_DELAYS_S": ",".join(str(d) for d in s.retry_delays_s),
            "MLC_WRITER_TARGETS": ",".join(s.writer_targets),
            "MLC_RABBITMQ_API_URL": "",
            "MLC_WEBHOOK_PORT": "0",
            "MLC_LOG_LEVEL": "INFO",
        }

    def start(self, service: str = "all") -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_services(self.settings, service, 0, stop))
        self._tasks[service] = (task, stop)

    async def stop(self, service: str = "all") -> None:
        task, stop = self._tasks.pop(service)
        stop.set()
        await asyncio.wait_for(task, 60)

    def spawn(self, service: str) -> subprocess.Popen[bytes]:
        """The service as its own OS process (``ml-connector run SERVICE``); its log goes to
        a file (a pipe nobody reads would block it once full)."""
        log_path = Path(f"/tmp/mlc-{self.settings.bus_prefix}-{service}.log")
        with log_path.open("ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services", "run", service, "--health-port", "0"],
                env=self.env,
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self._procs[service] = proc
        return proc

    async def close(self) -> None:
        for service in list(self._tasks):
            with contextlib.suppress(Exception):
                await self.stop(service)
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    async def audit_count(self, stage: str, status: str | None = None) -> int:
        if status is None:
            return await self.pool.fetchval(
                "SELECT count(*) FROM audit_events WHERE stage = $1", stage
            )
        return await self.pool.fetchval(
            "SELECT count(*) FROM audit_events WHERE stage = $1 AND status = $2", stage, status
        )

    async def zoho_count(self, module: str) -> int:
        stats = await self.sandbox.zoho_stats()
        return int(stats["records"].get(module, 0))


@pytest_asyncio.fixture
async def pipeline_factory(
    services: dict[str, str], database_url: str, clean_db: asyncpg.Pool, bus_prefix: str
) -> AsyncIterator[Callable[..., Awaitable[Pipeline]]]:
    made: list[Pipeline] = []

    async def make(
        *,
        customers: int = 0,
        invoices: int = 0,
        poll_interval: float = 2.0,
        syspro_settings: dict[str, Any] | None = None,
        full_every: float | None = None,
        retry_delays_s: tuple[int, ...] = (1, 2, 3),
        flow_files: tuple[str, ...] = ("syspro-zoho.yaml",),
        invoice_product: bool = False,
        **sandbox: Any,
    ) -> Pipeline:
        settings = Settings(
            amqp_url=services["amqp_url"],
            database_url=database_url,
            bus_prefix=bus_prefix,
            retry_delays_s=list(retry_delays_s),
            writer_targets=["zoho_crm"],
            rabbitmq_api_url="",
            webhook_port=0,
        )
        box = await Sandbox.start(customers=customers, invoices=invoices, **sandbox)
        vault = Vault.from_settings(settings)
        lookups = {}
        if invoice_product:
            lookups["zoho_products"] = {"invoice": await box.seed_invoice_product()}
        await box.register(
            ConnectionStore(clean_db, vault),
            FlowStore(clean_db),
            poll_interval=poll_interval,
            syspro_settings=syspro_settings,
            full_every=full_every,
            flow_files=flow_files,
            lookups=lookups,
        )
        pipeline = Pipeline(settings, clean_db, box)
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        await pipeline.close()
        await pipeline.sandbox.stop()
        bus = await Bus(
            pipeline.settings.amqp_url.get_secret_value(),
            topology_from(pipeline.settings),
        ).connect()
        with contextlib.suppress(Exception):
            await bus.delete_topology()
        await bus.close()
