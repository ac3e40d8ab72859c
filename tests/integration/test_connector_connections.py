"""Connections against the real PostgreSQL and the emulators over real HTTP (issue 17, items 10
and 11, and "Low"): replacing a connection drops its cached token, production refuses plain
http:// URLs where a connection is added and where it is opened, the secrets of an opened
connection are masked, and a token endpoint that answers HTML costs one token call per attempt
of the API call that needs it."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

from emulators.common import RunningEmulator
from emulators.zoho_crm import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_REFRESH_TOKEN,
    create_app,
)
from shared.connections import ConnectionConfigError, ConnectionStore, UrlPolicy
from shared.connectors.zoho_crm import ZohoCrmConnector
from shared.failures import TransientError
from shared.logs import redact
from shared.retry import RetryPolicy
from shared.settings import Settings
from shared.vault import Vault

FAST = RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.02, throttle_delay_s=0.01)
ZOHO_SECRETS = {"client_secret": DEFAULT_CLIENT_SECRET, "refresh_token": DEFAULT_REFRESH_TOKEN}
DEVELOPMENT = UrlPolicy(production=False)
PRODUCTION = UrlPolicy(production=True)
VAULT = Vault("k1", {"k1": os.urandom(32)})


@pytest_asyncio.fixture
async def emulators() -> AsyncIterator[list[RunningEmulator]]:
    """Two Zoho datacenters (accounts server and API each), the same client registered."""
    running = [await RunningEmulator(create_app()).start() for _ in range(2)]
    yield running
    for emulator in running:
        await emulator.stop()


async def stats(emulator: RunningEmulator) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{emulator.url}/_control/stats") as response:
            result: dict[str, Any] = await response.json()
            return result


async def control(emulator: RunningEmulator, path: str, body: Any) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{emulator.url}/_control/{path}", json=body) as response:
            assert response.status < 300, await response.text()


def zoho_settings(emulator: RunningEmulator) -> dict[str, Any]:
    return {"client_id": DEFAULT_CLIENT_ID, "accounts_url": emulator.url, "timeout_s": 10}


def store(pool: asyncpg.Pool, policy: UrlPolicy = DEVELOPMENT) -> ConnectionStore:
    return ConnectionStore(pool, VAULT, url_policy=policy)


async def token_rows(pool: asyncpg.Pool, name: str) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM token_cache WHERE connection = $1", name))


async def test_replacing_a_connection_clears_its_cached_token(
    clean_db: asyncpg.Pool, emulators: list[RunningEmulator]
) -> None:
    old, new = emulators
    connections = store(clean_db)
    await connections.add("crm", "zoho_crm", zoho_settings(old), ZOHO_SECRETS)
    first = await connections.open("crm", retry_policy=FAST)
    try:
        assert (await first.ping()).ok
    finally:
        await first.close()
    assert await token_rows(clean_db, "crm") == 1  # shared with the replicas

    # the account moves: new accounts server, and its tokens name a new API domain
    await connections.add("crm", "zoho_crm", zoho_settings(new), ZOHO_SECRETS, replace=True)
    assert await token_rows(clean_db, "crm") == 0

    second = await connections.open("crm", retry_policy=FAST)
    try:
        result = await second.ping()
    finally:
        await second.close()
    assert result.ok, result.checks
    assert f"API at {new.url}" in result.checks[0].detail
    new_calls = (await stats(new))["calls"]
    assert new_calls.get("POST /oauth/v2/token") == 1
    assert new_calls.get("GET /crm/v8/org") == 1
    old_calls = (await stats(old))["calls"]
    assert old_calls.get("GET /crm/v8/org") == 1  # the first ping only: nothing went there since


async def test_production_refuses_plain_http_where_a_connection_is_added(
    clean_db: asyncpg.Pool, emulators: list[RunningEmulator]
) -> None:
    settings = zoho_settings(emulators[0])  # http://127.0.0.1:...
    with pytest.raises(ConnectionConfigError) as info:
        await store(clean_db, PRODUCTION).add("crm", "zoho_crm", settings, ZOHO_SECRETS)
    message = str(info.value)
    assert "\n" not in message
    assert "connection 'crm': accounts_url is a plain http:// URL" in message
    assert "MLC_ALLOW_HTTP=true" in message
    assert await clean_db.fetchval("SELECT count(*) FROM connections") == 0

    allowed = UrlPolicy(production=True, allow_http=True)
    await store(clean_db, allowed).add("crm", "zoho_crm", settings, ZOHO_SECRETS)
    https = {**settings, "accounts_url": "https://accounts.zoho.eu"}
    await store(clean_db, PRODUCTION).add("crm2", "zoho_crm", https, ZOHO_SECRETS)


async def test_production_refuses_plain_http_where_a_connection_is_opened(
    clean_db: asyncpg.Pool, emulators: list[RunningEmulator]
) -> None:
    """A connection stored before the rule (or by a development build) is refused when a
    production service opens it, before any request carries a secret."""
    await store(clean_db).add("crm", "zoho_crm", zoho_settings(emulators[0]), ZOHO_SECRETS)
    with pytest.raises(ConnectionConfigError, match="accounts_url is a plain http:// URL"):
        await store(clean_db, PRODUCTION).open("crm")
    assert (await stats(emulators[0]))["total_calls"] == 0
    connector = await store(clean_db, UrlPolicy(production=True, allow_http=True)).open("crm")
    await connector.close()


def test_the_url_policy_follows_the_settings() -> None:
    assert UrlPolicy.from_settings(Settings(env="production")) == PRODUCTION
    assert UrlPolicy.from_settings(Settings(env="production", allow_http=True)).allow_http
    assert UrlPolicy.from_settings(Settings()) == DEVELOPMENT


async def test_the_secrets_of_an_opened_connection_are_masked(clean_db: asyncpg.Pool) -> None:
    secrets = {"client_secret": "opened-client-secret-9", "refresh_token": "1000.opened.refresh"}
    connections = store(clean_db)
    await connections.add("masked", "zoho_crm", {"client_id": "1000.X"}, secrets)
    connector = await connections.open("masked")
    await connector.close()
    text = redact(f"echo: {secrets['client_secret']} / {secrets['refresh_token']}")
    assert text == "echo: ******** / ********"


async def test_an_html_token_endpoint_costs_at_most_the_policy_attempts_per_api_call(
    emulators: list[RunningEmulator],
) -> None:
    emulator = emulators[0]
    await control(
        emulator,
        "faults",
        {"malformed_next": 1000, "malformed_kind": "html", "path_prefix": "/oauth"},
    )
    zoho = ZohoCrmConnector("crm-html", zoho_settings(emulator), ZOHO_SECRETS, retry_policy=FAST)
    try:
        with pytest.raises(TransientError, match="HTML page"):
            await zoho.find_ids("Accounts", "Account_Name", ["Acme"])
    finally:
        await zoho.close()
    calls = (await stats(emulator))["calls"]
    assert calls.get("POST /oauth/v2/token") == FAST.attempts  # was attempts squared
    assert "POST /crm/v8/coql" not in calls


async def test_a_secret_too_short_to_mask_is_named_when_the_connection_is_added(
    clean_db: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    settings = {
        "rest_url": "https://erp.example.com/SYSPROWCFService/Rest",
        "odata_url": "https://erp.example.com/SYSPRO8Odata/SYSPROOData",
        "operator": "ADMIN",
        "company_id": "EDU1",
    }
    secrets = {"operator_password": "op1", "company_password": "", "odata_password": "long-1"}
    with caplog.at_level(logging.WARNING, logger="shared.connections"):
        await store(clean_db).add("erp", "syspro", settings, secrets)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "shared.connections"]
    assert "connection 'erp': secret 'operator_password' is shorter than 4 characters" in line
    assert "op1" not in line and "\n" not in line
