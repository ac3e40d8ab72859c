"""The webhook receiver against what callers can send: slow bodies and slow headers, too many at
once, expired channels, deep nesting, the wrong content type; and a port already taken. The real
aiohttp server on 127.0.0.1, the real broker and database."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

from services.runtime import ServiceContext, open_context
from services.webhooks.service import WebhookServer, WebhookStartError, json_depth_exceeds
from shared.bus import NOTICES_QUEUE
from shared.settings import Settings
from tests.e2e.conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]
READ_TIMEOUT = 0.6
MAX_REQUESTS = 4
GOOD: dict[str, Any] = {
    "server_time": 1718117126473,
    "query_params": {},
    "module": "Accounts",
    "resource_uri": "https://www.zohoapis.com/crm/v2/Accounts",
    "ids": ["5725767000003000064"],
    "affected_fields": [],
    "operation": "update",
    "channel_id": "1000000068001",
    "token": "verify-me-123",
}


def _settings(services: dict[str, str], database_url: str, bus_prefix: str) -> Settings:
    return Settings(
        amqp_url=services["amqp_url"],
        database_url=database_url,
        bus_prefix=bus_prefix,
        writer_targets=["zoho_crm"],
        rabbitmq_api_url="",
        webhook_port=0,
        webhook_read_timeout_s=READ_TIMEOUT,
        webhook_max_requests=MAX_REQUESTS,
    )


@pytest_asyncio.fixture
async def ctx(
    services: dict[str, str], database_url: str, clean_db: asyncpg.Pool, bus_prefix: str
) -> AsyncIterator[ServiceContext]:
    ctx = await open_context(_settings(services, database_url, bus_prefix), "webhooks")
    await ctx.connections.add(
        "zoho",
        "zoho_crm",
        {"accounts_url": "http://127.0.0.1:9", "client_id": "c"},
        {"client_secret": "s", "refresh_token": "r"},
    )
    for channel, expires in (
        ("1000000068001", datetime.now(UTC) + timedelta(days=1)),
        ("1000000068002", datetime.now(UTC) - timedelta(days=30)),
    ):
        await clean_db.execute(
            "INSERT INTO webhook_channels (channel_id, connection, events, token, key_id,"
            " notify_url, expires_at) VALUES ($1, 'zoho', ARRAY['Accounts.all'], $2, $3, 'x', $4)",
            channel,
            ctx.vault.encrypt(b"verify-me-123", "zoho"),
            ctx.vault.current_key_id,
            expires,
        )
    yield ctx
    await ctx.bus.delete_topology()
    await ctx.close()


@pytest_asyncio.fixture
async def server(ctx: ServiceContext) -> AsyncIterator[WebhookServer]:
    server = WebhookServer(ctx)
    await server.start("127.0.0.1", 0)
    yield server
    await server.stop()


async def _post(
    server: WebhookServer, body: bytes, content_type: str | None = "application/json"
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": content_type} if content_type else {}
    url = f"http://127.0.0.1:{server.port}/webhooks/zoho/zoho"
    async with (
        aiohttp.ClientSession(skip_auto_headers=["Content-Type"]) as http,
        http.post(url, data=body, headers=headers) as response,
    ):
        if response.content_type != "application/json":
            return response.status, {"text": await response.text()}
        return response.status, await response.json()


async def _notices(ctx: ServiceContext) -> int:
    channel = await ctx.bus.connection.channel()  # type: ignore[union-attr]
    try:
        queue = await channel.declare_queue(ctx.bus.topology.queue(NOTICES_QUEUE), passive=True)
        return queue.declaration_result.message_count or 0
    finally:
        await channel.close()


async def _slow_request(port: int, *, body_bytes: int) -> tuple[asyncio.StreamReader, Any]:
    """A request whose headers arrive whole and whose body arrives in part (then nothing)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /webhooks/zoho/zoho HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 10000\r\n\r\n" + b"{" * body_bytes
    )
    await writer.drain()
    return reader, writer


async def _answer(reader: asyncio.StreamReader, within: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed it."""
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), within)  # read() returns at EOF
    return data, time.monotonic() - started


async def test_a_slow_body_is_cut_off_after_the_read_timeout(server: WebhookServer) -> None:
    reader, writer = await _slow_request(server.port or 0, body_bytes=3)
    try:
        data, elapsed = await _answer(reader, READ_TIMEOUT + 5)
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert READ_TIMEOUT * 0.8 <= elapsed < READ_TIMEOUT + 3
    assert server.in_flight == 0


async def test_slow_headers_and_idle_connections_are_closed(server: WebhookServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /webhooks/zoho/zoho HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    await writer.drain()
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        data, elapsed = await _answer(reader, READ_TIMEOUT + 5)
        assert data == b"" and elapsed < READ_TIMEOUT + 3
        data, _ = await _answer(idle_reader, READ_TIMEOUT + 5)
        assert data == b""
    finally:
        writer.close()
        idle_writer.close()


async def test_requests_beyond_the_limit_get_503_at_once(server: WebhookServer) -> None:
    """Many slow senders hold at most MAX_REQUESTS slots for at most the read timeout; the
    others are refused at once and every connection is closed soon after."""
    started = time.monotonic()
    slow = [await _slow_request(server.port or 0, body_bytes=1) for _ in range(MAX_REQUESTS)]
    await wait_until(
        lambda: asyncio.sleep(0, server.in_flight == MAX_REQUESTS), 5, "the slots taken"
    )
    extra = [await _slow_request(server.port or 0, body_bytes=1) for _ in range(20)]
    try:
        for reader, _ in extra:
            data, _ = await _answer(reader, READ_TIMEOUT + 5)
            assert data.startswith(b"HTTP/1.1 503"), data[:200]
            assert b"Retry-After: 1" in data
        for reader, _ in slow:
            data, _ = await _answer(reader, READ_TIMEOUT + 5)
            assert data.startswith(b"HTTP/1.1 408"), data[:200]
    finally:
        for _, writer in slow + extra:
            writer.close()
    assert time.monotonic() - started < READ_TIMEOUT + 5
    await wait_until(lambda: asyncio.sleep(0, server.in_flight == 0), 5, "the slots freed")
    assert (await _post(server, json.dumps(GOOD).encode()))[0] == 200  # served again


async def test_an_expired_channel_is_refused(server: WebhookServer, ctx: ServiceContext) -> None:
    expired = {**GOOD, "channel_id": "1000000068002"}
    status, body = await _post(server, json.dumps(expired).encode())
    assert (status, body) == (410, {"error": "channel expired"})
    assert await _notices(ctx) == 0
    assert (await _post(server, json.dumps(GOOD).encode())) == (200, {"accepted": 1})
    await wait_until(lambda: _notices(ctx), 5, "the live channel's notice")


async def test_deep_nesting_is_400_not_500(server: WebhookServer, ctx: ServiceContext) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    status, body = await _post(server, deep)
    assert status == 400 and "nested more than 64 deep" in body["error"]
    nested: Any = "x"
    for _ in range(65):
        nested = {"a": nested}
    status, _ = await _post(server, json.dumps({**GOOD, "query_params": nested}).encode())
    assert status == 400
    # brackets inside strings are text, not nesting
    status, body = await _post(server, json.dumps({**GOOD, "operation": "[{" * 100}).encode())
    assert (status, body) == (200, {"accepted": 1})
    assert server.received == 1 and server.rejected == 2


async def test_a_wrong_content_type_is_415(server: WebhookServer, ctx: ServiceContext) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "text/json", None):
        status, body = await _post(server, json.dumps(GOOD).encode(), content_type)
        assert status == 415, content_type
        assert body == {"error": "Content-Type must be application/json"}
    assert await _notices(ctx) == 0
    status, _ = await _post(server, json.dumps(GOOD).encode(), "application/json; charset=utf-8")
    assert status == 200


def test_json_depth_check() -> None:
    assert not json_depth_exceeds(json.dumps(GOOD).encode())
    assert not json_depth_exceeds(b"[" * 64 + b"]" * 64)
    assert json_depth_exceeds(b"[" * 65 + b"]" * 65)
    assert json_depth_exceeds(b'{"a": "\\"", "b": ' + b"[" * 65 + b"]" * 65 + b"}")
    assert not json_depth_exceeds(b'["' + b"[" * 100 + b'"]')
    assert not json_depth_exceeds(b'["\\\\", ' + b"[]," * 100 + b"1]")


async def test_a_taken_port_is_a_start_error(ctx: ServiceContext) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(WebhookStartError) as info:
            await WebhookServer(ctx).start("127.0.0.1", port)
    message = str(info.value)
    assert f"cannot listen on 127.0.0.1:{port}" in message and "\n" not in message


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_run_webhooks_on_a_taken_port_exits_with_one_line_never_ready(
    services: dict[str, str], database_url: str, bus_prefix: str
) -> None:
    health_port = _free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            "MLC_AMQP_URL": services["amqp_url"],
            "MLC_DATABASE_URL": database_url,
            "MLC_BUS_PREFIX": bus_prefix,
            "MLC_WRITER_TARGETS": "zoho_crm",
            "MLC_RABBITMQ_API_URL": "",
            "MLC_WEBHOOK_BIND": "127.0.0.1",
            "MLC_WEBHOOK_PORT": str(port),
            "MLC_LOG_LEVEL": "WARNING",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services",
            "run",
            "webhooks",
            "--health-port",
            str(health_port),
            env=env,
            cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        errors = asyncio.create_task(proc.stderr.read())  # type: ignore[union-attr]
        ready: list[int] = []

        async def readiness() -> bool:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(f"http://127.0.0.1:{health_port}/readyz") as response,
                ):
                    ready.append(response.status)
            return proc.returncode is not None

        try:
            await wait_until(readiness, 60, "ml-connector run webhooks to exit", every=0.05)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        err = await errors
    settings = _settings(services, database_url, bus_prefix)
    ctx = await open_context(settings, "cleanup", declare=False)
    await ctx.bus.delete_topology()
    await ctx.close()
    text = err.decode()
    assert proc.returncode == 1, text
    assert "Traceback" not in text
    last = text.strip().splitlines()[-1]
    assert last == (
        f"ml-connector: webhooks: cannot listen on 127.0.0.1:{port}: Address already in use"
        " (set MLC_WEBHOOK_PORT or MLC_WEBHOOK_BIND)"
    ), text
    assert 200 not in ready  # never said ready
