"""The Zoho CRM connector against the Zoho emulator: exact batched lookups by COQL and a
request-level upsert error (issue 18 point 4, issue 19)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from emulators.common import RunningEmulator
from emulators.zoho_crm import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_REFRESH_TOKEN,
    create_app,
)
from shared.connectors.base import SinkRecord
from shared.connectors.zoho_crm import ZohoCrmConnector
from shared.failures import FailureClass
from shared.retry import RetryPolicy

FAST = RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.02)
KEY = "ERP_Customer_No"


class Emulator:
    def __init__(self, running: RunningEmulator, session: aiohttp.ClientSession) -> None:
        self.running = running
        self.session = session
        self.url = running.url

    async def control(self, method: str, path: str, json: Any = None) -> Any:
        async with self.session.request(method, f"{self.url}/_control{path}", json=json) as r:
            assert r.status < 300, await r.text()
            return await r.json()

    async def calls(self) -> dict[str, int]:
        stats = await self.control("GET", "/stats")
        return dict(stats["calls"])


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    running = await RunningEmulator(create_app()).start()
    async with aiohttp.ClientSession() as session:
        yield Emulator(running, session)
    await running.stop()


@pytest.fixture
async def zoho(emulator: Emulator) -> AsyncIterator[ZohoCrmConnector]:
    conn = ZohoCrmConnector(
        "zoho-emulated",
        {"client_id": DEFAULT_CLIENT_ID, "accounts_url": emulator.url},
        {"client_secret": DEFAULT_CLIENT_SECRET, "refresh_token": DEFAULT_REFRESH_TOKEN},
        retry_policy=FAST,
    )
    yield conn
    await conn.close()


async def seed(emulator: Emulator, keys: list[str]) -> None:
    await emulator.control(
        "POST",
        "/fields",
        {"module": "Accounts", "fields": [{"api_name": KEY, "data_type": "text", "unique": True}]},
    )
    records = [{"Account_Name": f"Customer {k}", KEY: k} for k in keys]
    await emulator.control("POST", "/seed", {"module": "Accounts", "records": records})


def coql_calls(calls: dict[str, int]) -> int:
    return sum(n for route, n in calls.items() if "coql" in route.lower())


async def test_find_ids_is_exact_among_look_alike_keys(
    emulator: Emulator, zoho: ZohoCrmConnector
) -> None:
    keys = ["P100", *(f"P100-{n}" for n in range(1, 300)), "O'Brien\\x"]
    await seed(emulator, keys)
    found = await zoho.find_ids("Accounts", KEY, ["P100", "P100-7", "P10", "O'Brien\\x"])
    assert set(found) == {"P100", "P100-7", "O'Brien\\x"}
    accounts = await emulator.control("GET", "/records/Accounts?limit=400")
    by_key = (
        {r[KEY]: r["id"] for r in accounts["data"]}
        if isinstance(accounts, dict)
        else {r[KEY]: r["id"] for r in accounts}
    )
    assert found == {k: by_key[k] for k in found}
    assert "search" not in " ".join((await emulator.calls()).keys()).lower()


async def test_find_ids_asks_one_coql_call_for_100_values(
    emulator: Emulator, zoho: ZohoCrmConnector
) -> None:
    keys = [f"K{n:04d}" for n in range(250)]
    await seed(emulator, keys)
    before = coql_calls(await emulator.calls())
    found = await zoho.find_ids("Accounts", KEY, keys[:100])
    assert len(found) == 100
    assert coql_calls(await emulator.calls()) - before == 1
    found = await zoho.find_ids("Accounts", KEY, [*keys[100:250], "missing"])
    assert len(found) == 150
    assert coql_calls(await emulator.calls()) - before == 3


async def test_upsert_on_a_field_the_module_lacks_fails_every_record_permanently(
    emulator: Emulator, zoho: ZohoCrmConnector
) -> None:
    # plain payloads (the writer of today) and SinkRecords fail alike
    records: list[Any] = [{"Account_Name": f"A{n}", "No_Such_Key": f"K{n}"} for n in range(2)]
    records.append(SinkRecord({"Account_Name": "A2", "No_Such_Key": "K2"}))
    outcomes = await zoho.upsert("Accounts", records, ["No_Such_Key"])
    assert len(outcomes) == 3
    for outcome in outcomes:
        assert not outcome.ok
        assert outcome.failure is FailureClass.PERMANENT
        assert outcome.code == "INVALID_DATA"
        assert "No_Such_Key" in (outcome.error or "")
        assert "malformed" not in (outcome.error or "")
