"""Test harness: the real RabbitMQ and PostgreSQL on this machine, isolated per test run.

Each run gets its own database (created, migrated, dropped) and its own bus prefix (its queues
and exchanges are deleted at the end). Services that are down are started with
scripts/ensure-services.sh; on a machine with Docker and neither service, testcontainers.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from shared import db
from shared.bus import Bus, Topology

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = uuid.uuid4().hex[:8]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _docker_fallback() -> tuple[str, str, list[object]]:
    from testcontainers.postgres import PostgresContainer
    from testcontainers.rabbitmq import RabbitMqContainer

    pg = PostgresContainer("postgres:15").start()
    mq = RabbitMqContainer("rabbitmq:3.13-management").start()
    pg_url = pg.get_connection_url().replace("postgresql+psycopg2", "postgresql")
    host, port = mq.get_container_host_ip(), mq.get_exposed_port(5672)
    return f"amqp://guest:guest@{host}:{port}/", pg_url.rsplit("/", 1)[0], [pg, mq]


@pytest.fixture(scope="session")
def services() -> Iterator[dict[str, str]]:
    containers: list[object] = []
    amqp = os.environ.get("MLC_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    pg_base = os.environ.get("MLC_TEST_PG_BASE", "postgresql://postgres@127.0.0.1:5432")
    if not (_port_open(5432) and _port_open(5672)):
        result = subprocess.run([str(ROOT / "scripts/ensure-services.sh")], check=False)
        if result.returncode != 0:
            amqp, pg_base, containers = _docker_fallback()
    yield {"amqp_url": amqp, "pg_base": pg_base}
    for container in containers:
        container.stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def database_url(services: dict[str, str]) -> Iterator[str]:
    name = f"mlc_test_{RUN_ID}"
    base = services["pg_base"]

    async def create() -> None:
        conn = await asyncpg.connect(f"{base}/postgres")
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()
        await db.migrate(f"{base}/{name}")

    async def drop() -> None:
        conn = await asyncpg.connect(f"{base}/postgres")
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()

    asyncio.run(create())
    yield f"{base}/{name}"
    asyncio.run(drop())


@pytest_asyncio.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(database_url, max_size=10)
    yield pool
    await pool.close()


TABLES = (
    "connections, flows, flow_versions, cursors, flow_leases, source_snapshots, record_links,"
    " audit_events, webhook_channels, token_cache"
)


@pytest_asyncio.fixture
async def clean_db(pool: asyncpg.Pool) -> asyncpg.Pool:
    await pool.execute(f"TRUNCATE {TABLES} RESTART IDENTITY")
    return pool


@pytest.fixture
def bus_prefix() -> str:
    return f"t{RUN_ID}{uuid.uuid4().hex[:6]}"


@pytest_asyncio.fixture
async def topology(bus_prefix: str) -> Topology:
    return Topology(prefix=bus_prefix, retry_delays_s=[1, 2], writer_targets=("zoho_crm",))


@pytest_asyncio.fixture
async def bus(services: dict[str, str], topology: Topology) -> AsyncIterator[Bus]:
    bus = await Bus(services["amqp_url"], topology).connect()
    await bus.declare()
    yield bus
    try:
        await bus.delete_topology()
    finally:
        await bus.close()
