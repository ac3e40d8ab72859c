"""Bad input from outside: malformed API answers, webhooks, credentials files. Each gets a clear
error, no crash loop, and nothing is lost."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

from emulators.common import RunningEmulator
from emulators.sandbox import duplicate_creates
from services.runtime import ServiceContext, open_context
from services.webhooks.service import WebhookServer
from shared.bus import NOTICES_QUEUE
from shared.messages import NoticeBatch, decode
from shared.settings import Settings
from tests.e2e.conftest import Pipeline, wait_until

ROOT = Path(__file__).resolve().parents[2]


async def test_malformed_target_answers_are_retried_and_nothing_is_lost(
    pipeline_factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    p: Pipeline = await pipeline_factory(customers=300, invoices=0)
    box = p.sandbox
    await box.control(
        "zoho",
        "POST",
        "/_control/faults",
        {"malformed_next": 2, "malformed_kind": "truncated", "path_prefix": "/crm/"},
    )
    p.start()
    await wait_until(lambda: p.zoho_count("Accounts"), 60, "accounts despite truncated answers")
    for kind in ("html", "wrong_types"):
        await box.control(
            "zoho", "POST", "/_control/faults", {"malformed_next": 2, "malformed_kind": kind}
        )
        await box.control(
            "syspro", "POST", "/_control/change", {"table": "ArCustomer", "count": 30}
        )
        await wait_until(
            lambda: _faults_used(p),
            60,
            f"the {kind} answers to be served",
        )

    async def all_current() -> bool:
        accounts = {a["ERP_Customer_No"]: a for a in await box.zoho_records("Accounts")}
        rows = await box.syspro_rows("ArCustomer")
        return len(accounts) == 300 and all(
            accounts[r["Customer"].strip()]["Phone"] == r["Telephone"].strip() for r in rows
        )

    await wait_until(all_current, 90, "every account current")
    stats = await box.zoho_stats()
    assert duplicate_creates(stats) == 0
    # Each was a clear, classified error, retried in process or through the retry queue.
    messages = await p.pool.fetch(
        "SELECT DISTINCT error FROM audit_events WHERE error_class = 'transient'"
    )
    text = caplog.text + " ".join(r["error"] for r in messages)
    assert "expected JSON but got an HTML page" in text
    assert "not valid JSON" in text
    assert "malformed response" in text
    task, _ = p._tasks["all"]
    assert not task.done()  # no crash
    await p.stop()


async def _faults_used(p: Pipeline) -> bool:
    faults = await p.sandbox.control("zoho", "POST", "/_control/faults", {})
    return faults["malformed_next"] == 0


async def test_malformed_source_answer_is_a_clear_poll_error_then_recovers(
    pipeline_factory,
) -> None:
    p: Pipeline = await pipeline_factory(customers=50, invoices=0)
    await p.sandbox.control(
        "syspro",
        "POST",
        "/_control/faults",
        {"malformed_next": 3, "malformed_kind": "html", "path_prefix": "/SYSPRO8Odata/"},
    )
    p.start()
    await wait_until(lambda: p.zoho_count("Accounts"), 60, "the poll to recover")
    await wait_until(lambda: _count_is(p, 50), 60, "all 50 accounts")
    row = await p.pool.fetchrow(
        "SELECT last_status, last_error FROM cursors WHERE entity = 'ArCustomer'"
    )
    assert row["last_status"] == "ok"
    await p.stop()


async def _count_is(p: Pipeline, n: int) -> bool:
    return await p.zoho_count("Accounts") == n


@pytest_asyncio.fixture
async def webhook_ctx(
    services: dict[str, str], database_url: str, clean_db: asyncpg.Pool, bus_prefix: str
) -> AsyncIterator[ServiceContext]:
    settings = Settings(
        amqp_url=services["amqp_url"],
        database_url=database_url,
        bus_prefix=bus_prefix,
        writer_targets=["zoho_crm"],
        rabbitmq_api_url="",
    )
    ctx = await open_context(settings, "webhooks")
    await ctx.connections.add(
        "zoho",
        "zoho_crm",
        {"accounts_url": "http://127.0.0.1:9", "client_id": "c"},
        {"client_secret": "s", "refresh_token": "r"},
    )
    await clean_db.execute(
        "INSERT INTO webhook_channels (channel_id, connection, events, token, key_id, notify_url,"
        " expires_at) VALUES ('1000000068001', 'zoho', ARRAY['Accounts.all'], $1, $2, 'x', $3)",
        ctx.vault.encrypt(b"verify-me-123", "zoho"),
        ctx.vault.current_key_id,
        datetime.now(UTC) + timedelta(days=1),
    )
    yield ctx
    await ctx.bus.delete_topology()
    await ctx.close()


async def test_malformed_webhooks_are_refused_clearly(webhook_ctx: ServiceContext) -> None:
    server = WebhookServer(webhook_ctx)
    good = {
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
    async with RunningEmulator(server.app()) as running, aiohttp.ClientSession() as http:
        url = f"{running.url}/webhooks/zoho/zoho"

        async def post(body: object, raw: bytes | None = None) -> tuple[int, dict]:
            data = raw if raw is not None else json.dumps(body).encode()
            async with http.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
                if r.content_type != "application/json":
                    return r.status, {"text": await r.text()}
                return r.status, await r.json()

        assert (await post(None, b"{not json"))[0] == 400
        status, body = await post({**good, "ids": []})
        assert status == 400 and "invalid notification" in body["error"]
        assert (await post({**good, "module": "Acc'; drop"}))[0] == 400
        assert (await post({**good, "channel_id": "999"}))[0] == 401
        status, body = await post({**good, "token": "guess"})
        assert status == 401 and body == {"error": "token mismatch"}
        assert (await post(good)) == (200, {"accepted": 1})
        big = {**good, "ids": ["1"] * 100_000}
        assert (await post(big))[0] in (400, 413)
    assert server.received == 1 and server.rejected >= 5
    channel = await webhook_ctx.bus.connection.channel()  # type: ignore[union-attr]
    queue = await channel.get_queue(webhook_ctx.bus.topology.queue(NOTICES_QUEUE))
    message = await queue.get(no_ack=True, fail=False)
    assert message is not None
    notice = decode(message.type, message.body)
    assert isinstance(notice, NoticeBatch)
    assert notice.notices[0].ids == ["5725767000003000064"]
    assert await queue.get(no_ack=True, fail=False) is None  # refused ones published nothing


async def test_bad_credentials_files_get_clear_errors(tmp_path: Path, database_url: str) -> None:
    env = {**os.environ, "MLC_DATABASE_URL": database_url}
    cases = {
        "missing.json": "cannot read secrets file",
        "bad.json": "is not valid JSON: line 1",
        "list.json": "must hold a JSON object",
    }
    (tmp_path / "bad.json").write_text('{"client_secret": ')
    (tmp_path / "list.json").write_text('["a"]')
    for name, expected in cases.items():
        result = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "services",
                "connections",
                "add",
                "z",
                "--system",
                "zoho_crm",
                "--set=client_id=c",
                "--secrets-file",
                str(tmp_path / name),
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr
        assert "Traceback" not in result.stderr
