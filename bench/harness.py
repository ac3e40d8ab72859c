"""Shared pieces of the pipeline benchmarks: emulators and services as separate processes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from pydantic import SecretStr

from emulators.sandbox import Sandbox
from services.runtime import topology_from
from shared import db
from shared.bus import Bus
from shared.connections import ConnectionStore, StoredConnection, build_connector
from shared.connectors.base import Connector
from shared.flow_store import FlowStore
from shared.settings import Settings
from shared.vault import Vault

ROOT = Path(__file__).resolve().parent.parent
PG_BASE = os.environ.get("MLC_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
AMQP = os.environ.get("MLC_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process, with those of its children that exited
    (a PostgreSQL backend that ended during the run is counted by the postmaster)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        user = (int(fields[11]) + int(fields[13])) / ticks
        system = (int(fields[12]) + int(fields[14])) / ticks
        return user, system
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def cpu_of_command(fragment: str) -> float:
    """CPU seconds of every process whose command line contains ``fragment`` (broker, db)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if fragment in cmd:
            total += cpu_seconds(int(entry.name))
    return total


def sandbox_connectors(box: Sandbox) -> tuple[Connector, Connector]:
    """The SYSPRO and Zoho connectors of the sandbox, opened in this process (no database)."""
    opened = []
    for name, system, (settings, secrets) in (
        ("syspro", "syspro", box.syspro_connection()),
        ("zoho", "zoho_crm", box.zoho_connection()),
    ):
        sealed = {k: SecretStr(v) for k, v in secrets.items()}
        opened.append(build_connector(StoredConnection(name, system, settings, sealed, None)))
    return opened[0], opened[1]


@dataclass
class Bench:
    name: str = field(default_factory=lambda: f"bench{uuid.uuid4().hex[:6]}")
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    system_cpu: dict[str, float] = field(default_factory=dict)
    cpu_start: dict[str, tuple[float, float]] = field(default_factory=dict)
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    box: Sandbox | None = None
    pool: asyncpg.Pool | None = None

    @property
    def dsn(self) -> str:
        return f"{PG_BASE}/mlc_{self.name}"

    @property
    def settings(self) -> Settings:
        return Settings(
            amqp_url=AMQP,
            database_url=self.dsn,
            bus_prefix=self.name,
            writer_targets=["zoho_crm"],
            retry_delays_s=[2, 5, 10],
        )

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "MLC_AMQP_URL": AMQP,
            "MLC_DATABASE_URL": self.dsn,
            "MLC_BUS_PREFIX": self.name,
            "MLC_WRITER_TARGETS": "zoho_crm",
            "MLC_RETRY_DELAYS_S": "2,5,10",
            "MLC_WEBHOOK_PORT": "0",
            "MLC_LOG_LEVEL": "WARNING",
            **extra,
        }

    async def start_emulators(self, zoho_options: dict[str, Any] | None = None) -> Sandbox:
        ports = {"syspro": free_port(), "zoho": free_port()}
        for system, port in ports.items():
            args = [sys.executable, "-m", "emulators.sandbox", system, "--port", str(port)]
            if system == "zoho" and zoho_options:
                args += ["--json-options", json.dumps(zoho_options)]
            self.procs[f"emulator-{system}"] = subprocess.Popen(args, cwd=ROOT)  # noqa: ASYNC220
        async with aiohttp.ClientSession() as http:
            for port in ports.values():
                for _ in range(100):
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/_control/stats"):
                            break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1)
        self.box = await Sandbox.attach(
            f"http://127.0.0.1:{ports['syspro']}", f"http://127.0.0.1:{ports['zoho']}"
        )
        return self.box

    async def prepare(self, customers: int, invoices: int, poll_interval: float = 3600) -> None:
        admin = await asyncpg.connect(f"{PG_BASE}/postgres")
        await admin.execute(f'CREATE DATABASE "mlc_{self.name}"')
        await admin.close()
        await db.migrate(self.dsn)
        self.pool = await db.create_pool(self.dsn)
        assert self.box is not None
        t = time.perf_counter()
        await self.box.control(
            "syspro",
            "POST",
            "/_control/seed",
            {"customers": customers, "invoices": invoices, "seed": 1},
        )
        print(
            f"seeded SYSPRO with {customers} customers and {invoices} invoices"
            f" in {time.perf_counter() - t:.1f} s"
        )
        bus = await Bus(AMQP, topology_from(self.settings)).connect()
        await bus.declare()
        await bus.close()
        vault = Vault.from_settings(self.settings)
        await self.box.register(
            ConnectionStore(self.pool, vault), FlowStore(self.pool), poll_interval=poll_interval
        )

    def spawn(self, service: str, label: str | None = None, **env: str) -> None:
        """Start ``ml-connector run SERVICE`` as its own process. Services named in
        ``MLC_BENCH_PROFILE`` (comma-separated) run under cProfile, which writes
        ``/tmp/mlc-profile-<label>.out`` when the service stops."""
        label = label or service
        profiled = os.environ.get("MLC_BENCH_PROFILE", "").split(",")
        wrapper = ["-m", "cProfile", "-o", f"/tmp/mlc-profile-{label}.out"]
        self.procs[label] = subprocess.Popen(
            [
                sys.executable,
                *(wrapper if service in profiled else []),
                "-m",
                "services",
                "run",
                service,
                "--health-port",
                "0",
            ],
            cwd=ROOT,
            env=self.env(MLC_REPLICA=label, **env),
        )

    async def services_ready(self, queues: list[str], timeout_s: float = 60) -> None:
        """Wait until every named work queue (``mapper``, ``writer.zoho_crm``,
        ``poller.notices``) has a consumer: the services are up and past their start-up."""
        topology = topology_from(self.settings)
        names = {f"{topology.prefix}.{q}" for q in queues}
        bus = await Bus(AMQP, topology).connect()
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                depths = {d.name: d.consumers for d in await bus.queue_depths()}
                if all(depths.get(name) for name in names):
                    return
                if time.monotonic() > deadline:
                    raise SystemExit(f"services not consuming after {timeout_s:.0f} s: {depths}")
                await asyncio.sleep(0.2)
        finally:
            await bus.close()

    def start_cpu_count(self) -> None:
        """CPU is counted from now on for the processes running already (the emulators)."""
        self.cpu_start = {
            label: cpu_times(p.pid) for label, p in self.procs.items() if p.poll() is None
        }

    def sample_memory(self) -> dict[str, float]:
        now = {label: rss_mb(p.pid) for label, p in self.procs.items() if p.poll() is None}
        for label, p in self.procs.items():
            if p.poll() is None:
                user, system = cpu_times(p.pid)
                start_user, start_system = self.cpu_start.get(label, (0.0, 0.0))
                self.cpu[label] = user + system - start_user - start_system
                self.system_cpu[label] = system - start_system
        for label, value in now.items():
            self.peaks[label] = max(self.peaks.get(label, 0.0), value)
        self.samples.append((time.monotonic(), now))
        return now

    def stop_services(self) -> None:
        for label, proc in self.procs.items():
            if not label.startswith("emulator") and proc.poll() is None:
                proc.terminate()
        for label, proc in self.procs.items():
            if not label.startswith("emulator"):
                try:
                    proc.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    proc.kill()

    async def latency(self) -> dict[str, float]:
        assert self.pool is not None
        row = await self.pool.fetchrow(
            """SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d) AS p50,
                      percentile_cont(0.99) WITHIN GROUP (ORDER BY d) AS p99
               FROM (SELECT extract(epoch FROM w.at - p.at) AS d
                     FROM audit_events p JOIN audit_events w ON w.event_id = p.event_id
                     WHERE p.stage = 'polled' AND w.stage = 'written') t"""
        )
        return {"p50": float(row["p50"] or 0), "p99": float(row["p99"] or 0)}

    async def close(self) -> None:
        self.stop_services()
        for _label, proc in self.procs.items():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
        if self.box is not None:
            await self.box.stop()
        if self.pool is not None:
            await self.pool.close()
        try:
            bus = await Bus(AMQP, topology_from(self.settings)).connect()
            await bus.delete_topology()
            await bus.close()
        except Exception:
            pass
        admin = await asyncpg.connect(f"{PG_BASE}/postgres")
        await admin.execute(f'DROP DATABASE IF EXISTS "mlc_{self.name}" WITH (FORCE)')
        await admin.close()
