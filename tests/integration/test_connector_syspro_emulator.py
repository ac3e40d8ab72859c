"""The SYSPRO connector against the SYSPRO emulator over real HTTP on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

from emulators.common import RunningEmulator
from emulators.syspro import create_app
from shared.connectors.base import StreamSpec
from shared.connectors.syspro import SysproConnector
from shared.failures import AuthError, PermanentError
from shared.retry import RetryPolicy
from shared.tokens import TokenCache
from shared.vault import Vault

REST_PATH = "/SYSPROWCFService/Rest"
ODATA_PATH = "/SYSPRO8Odata/SYSPROOData"
OPERATOR_PASSWORD = "p&ss+w=rd #%1"
COMPANY_PASSWORD = "c0 'co'+&"
ODATA_PASSWORD = "odata&pw+1"
FAST = RetryPolicy(attempts=4, base_delay_s=0.01, max_delay_s=0.05, throttle_delay_s=0.01)

CUSTOMERS = StreamSpec("ArCustomer", ("Customer",))
INVOICES = StreamSpec("ArInvoice", ("Customer", "Invoice", "DocumentType"), "InvoiceDate")
INVOICE_KEY = ("Customer", "Invoice", "DocumentType")


class Emulator:
    """A running emulator plus its control API."""

    def __init__(self, running: RunningEmulator, http: aiohttp.ClientSession) -> None:
        self.running = running
        self.url = running.url
        self.http = http

    async def control(self, method: str, path: str, body: Any = None) -> Any:
        async with self.http.request(method, f"{self.url}/_control/{path}", json=body) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def rows(self, table: str) -> list[dict[str, Any]]:
        return (await self.control("GET", f"tables/{table}"))["rows"]

    async def stats(self) -> dict[str, Any]:
        return await self.control("GET", "stats")

    def connector(
        self, name: str = "syspro-emu", token_cache: TokenCache | None = None, **overrides: Any
    ) -> SysproConnector:
        secrets = {
            "operator_password": OPERATOR_PASSWORD,
            "company_password": COMPANY_PASSWORD,
            "odata_password": ODATA_PASSWORD,
        }
        secrets.update({k: overrides.pop(k) for k in list(overrides) if k in secrets})
        settings = {
            "rest_url": self.url + REST_PATH,
            "odata_url": self.url + ODATA_PATH,
            "operator": "ADMIN",
            "company_id": "EDU1",
            "timeout_s": 10,
            **overrides,
        }
        return SysproConnector(name, settings, secrets, retry_policy=FAST, token_cache=token_cache)


EmulatorFactory = Callable[..., Awaitable[Emulator]]


@pytest_asyncio.fixture
async def start_emulator() -> AsyncIterator[EmulatorFactory]:
    started: list[RunningEmulator] = []
    http = aiohttp.ClientSession()

    async def start(**options: Any) -> Emulator:
        app = create_app(
            operators={"ADMIN": OPERATOR_PASSWORD},
            companies={"EDU1": COMPANY_PASSWORD},
            odata_users={"ADMIN": ODATA_PASSWORD},
            **options,
        )
        running = await RunningEmulator(app).start()
        started.append(running)
        return Emulator(running, http)

    yield start
    for running in started:
        await running.stop()
    await http.close()


@pytest_asyncio.fixture
async def emulator(start_emulator: EmulatorFactory) -> Emulator:
    # a row cap below page_size makes every window mix $skip paging and nextLink paging
    return await start_emulator(customers=420, invoices=1800, max_rows_per_request=150)


async def read(connector: SysproConnector, stream: StreamSpec, since: str | None) -> list[Any]:
    return [page async for page in connector.changed_since(stream, since)]


def flat(pages: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [row for page in pages for row in page]


def invoice_key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(row[name] for name in INVOICE_KEY)


async def test_backfill_reads_every_customer_and_invoice_once(emulator: Emulator) -> None:
    connector = emulator.connector(page_size=400)
    try:
        customer_pages = await read(connector, CUSTOMERS, None)
        invoice_pages = await read(connector, INVOICES, None)
    finally:
        await connector.close()
    assert flat(customer_pages) == await emulator.rows("ArCustomer")
    assert flat(invoice_pages) == await emulator.rows("ArInvoice")
    assert max(len(page) for page in invoice_pages) == 150  # the server cap shaped the pages
    stats = await emulator.stats()
    assert stats["odata_rows_served"] == 420 + 1800
    assert stats["odata_auth_failures"] == 0


async def test_page_size_below_the_server_cap_pages_with_skip(emulator: Emulator) -> None:
    connector = emulator.connector()
    stream = StreamSpec("ArCustomer", ("Customer",), page_size=100)
    try:
        pages = await read(connector, stream, None)
    finally:
        await connector.close()
    assert [len(p) for p in pages] == [100, 100, 100, 100, 20]
    assert flat(pages) == await emulator.rows("ArCustomer")
    assert (await emulator.stats())["calls"]["ODATA GET ArCustomer"] == 5


async def test_incremental_read_by_invoice_date(emulator: Emulator) -> None:
    table = await emulator.rows("ArInvoice")
    dates = sorted({row["InvoiceDate"] for row in table if row["InvoiceDate"]})
    since = dates[len(dates) // 2]
    expected = sorted(
        (row for row in table if row["InvoiceDate"] and row["InvoiceDate"] >= since),
        key=lambda row: (row["InvoiceDate"], *invoice_key(row)),
    )
    assert 0 < len(expected) < len(table)
    connector = emulator.connector(page_size=250)
    try:
        pages = await read(connector, INVOICES, since)
        by_date_only = await read(connector, INVOICES, since[:10])
    finally:
        await connector.close()
    assert flat(pages) == expected
    assert flat(by_date_only) == expected  # a date-only cursor is the same DateTimeOffset


async def test_fetch_changed_invoices_with_select(emulator: Emulator) -> None:
    select = ("InvoiceBal1",)
    stream = StreamSpec("ArInvoice", INVOICE_KEY, "InvoiceDate", select=select, page_size=500)
    connector = emulator.connector()
    try:
        changed = await emulator.control("POST", "change", {"table": "ArInvoice", "count": 5})
        rows = await connector.fetch(stream, changed["keys"])
    finally:
        await connector.close()
    assert sorted("|".join(invoice_key(r)) for r in rows) == sorted(changed["keys"])
    assert all(set(r) == {"InvoiceBal1", *INVOICE_KEY, "InvoiceDate"} for r in rows)


async def test_fetch_by_ids_with_awkward_keys(emulator: Emulator) -> None:
    awkward = {"Customer": "O'B&R+#%1 x", "Name": "Dubois & Fils"}
    await emulator.control("PUT", "tables/ArCustomer", {"rows": [awkward]})
    table = {row["Customer"]: row for row in await emulator.rows("ArCustomer")}
    invoices = await emulator.rows("ArInvoice")
    wanted_customers = [awkward["Customer"], "0000001", "0000077", "NOPE"]
    wanted_invoices = ["|".join(invoice_key(row)) for row in invoices[::97]]
    connector = emulator.connector()
    try:
        customers = await connector.fetch(CUSTOMERS, wanted_customers)
        many = await connector.fetch(CUSTOMERS, sorted(table))  # many chunks, concurrently
        found_invoices = await connector.fetch(INVOICES, [*wanted_invoices, "0000001|X|I"])
        backfill = flat(await read(connector, CUSTOMERS, None))
    finally:
        await connector.close()
    assert {row["Customer"]: row for row in customers} == {
        key: table[key] for key in wanted_customers if key in table
    }
    assert sorted(row["Customer"] for row in many) == sorted(table)
    assert sorted("|".join(invoice_key(r)) for r in found_invoices) == sorted(wanted_invoices)
    assert awkward["Customer"] in [row["Customer"] for row in backfill]
    assert len(backfill) == len(table)


async def test_session_expiry_mid_run_is_renewed_and_no_record_lost(emulator: Emulator) -> None:
    connector = emulator.connector(page_size=300)
    profiles: list[str] = []
    rows: list[dict[str, Any]] = []
    try:
        async for page in connector.changed_since(INVOICES, None):
            rows.extend(page)
            profiles.append((await connector.get_logon_profile()).company_name)
            if len(profiles) == 2:
                await emulator.control("POST", "expire_sessions")
            if len(profiles) == 4:
                await emulator.control("POST", "advance_clock", {"seconds": 1300})
        comfnd = await connector._enet(
            "Query/Query",
            {
                "BusinessObject": "COMFND",
                "XmlIn": "<Query><TableName>ArCustomer</TableName><ReturnRows>3</ReturnRows>"
                "<Columns><Column>Customer</Column></Columns></Query>",
            },
        )
    finally:
        await connector.close()
    assert rows == await emulator.rows("ArInvoice")
    assert set(profiles) == {"Outdoors Inc"}
    assert comfnd.count("<Row>") == 3
    stats = await emulator.stats()
    assert stats["logons"] == 3  # the first, then once after each expiry
    assert stats["invalid_session_calls"] == 2
    assert connector.logons == 3
    assert stats["logoffs"] == 1 and stats["active_sessions"] == 0


async def test_two_connectors_of_one_operator_take_turns(emulator: Emulator) -> None:
    # one session per operator: each logon evicts the other's session, each recovers once
    first, second = emulator.connector("a"), emulator.connector("b")
    try:
        for _ in range(3):
            assert (await first.get_logon_profile()).operator_code == "ADMIN"
            assert (await second.get_logon_profile()).operator_code == "ADMIN"
    finally:
        await first.close()
        await second.close()
    assert first.logons == 3 and second.logons == 3
    assert (await emulator.stats())["sessions_replaced"] == 5


async def test_injected_faults_are_retried_without_losing_rows(emulator: Emulator) -> None:
    connector = emulator.connector(page_size=400)
    try:
        await emulator.control("POST", "faults", {"fail_next": 2})
        customers = flat(await read(connector, CUSTOMERS, None))
        await emulator.control("POST", "faults", {"throttle_next": 2})
        invoices = flat(await read(connector, INVOICES, None))
    finally:
        await connector.close()
    assert customers == await emulator.rows("ArCustomer")
    assert invoices == await emulator.rows("ArInvoice")
    statuses = (await emulator.stats())["statuses"]
    assert statuses["500"] == 2 and statuses["503"] == 2


async def test_ping_ok(emulator: Emulator) -> None:
    connector = emulator.connector()
    try:
        result = await connector.ping()
    finally:
        await connector.close()
    assert result.ok, result.checks
    checks = {c.name: c.detail for c in result.checks}
    assert "e.net 8.0.0.0" in checks["reach"]
    assert checks["logon"] == "logged on as operator 'ADMIN', company 'EDU1'"
    assert "Outdoors Inc (EDU1), SYSPRO 8.0.043" in checks["profile"]
    assert checks["odata"] == "user 'ADMIN' reads ArCustomer, ArInvoice"


async def test_ping_with_wrong_passwords_explains_itself(emulator: Emulator) -> None:
    connector = emulator.connector(operator_password="wrong", odata_password="wrong too")
    try:
        result = await connector.ping()
    finally:
        await connector.close()
    checks = {c.name: c for c in result.checks}
    assert not result.ok
    assert checks["reach"].ok
    assert not checks["logon"].ok
    assert checks["logon"].detail.startswith(
        "SYSPRO refused the logon of operator 'ADMIN' to company 'EDU1': Invalid operator password"
    )
    assert checks["profile"].detail == "not tried: the logon failed"
    assert not checks["odata"].ok
    assert "rejected user 'ADMIN' and its password (HTTP 401)" in checks["odata"].detail
    stats = await emulator.stats()
    assert stats["logon_failures"] == 1  # a refused logon is not hammered


async def test_wrong_company_password_and_wrong_odata_path(emulator: Emulator) -> None:
    bad_company = emulator.connector(company_password="nope")
    bad_path = emulator.connector(odata_url=emulator.url + "/SYSPROOData")
    try:
        with pytest.raises(AuthError, match="Invalid company password"):
            await bad_company.get_logon_profile()
        with pytest.raises(PermanentError) as info:
            await read(bad_path, CUSTOMERS, None)
        result = await bad_path.ping()
    finally:
        await bad_company.close()
        await bad_path.close()
    assert "/SYSPROOData/ArCustomer does not exist (HTTP 404)" in str(info.value)
    assert "check odata_url" in str(info.value)
    checks = {c.name: c for c in result.checks}
    assert checks["logon"].ok and not checks["odata"].ok
    assert "does not exist" in checks["odata"].detail


async def test_json_quoted_session_id(start_emulator: EmulatorFactory) -> None:
    emulator = await start_emulator(customers=5, invoices=5, quote_guid=True)
    connector = emulator.connector()
    try:
        profile = await connector.get_logon_profile()
    finally:
        await connector.close()
    assert profile.company_id == "EDU1"
    stats = await emulator.stats()
    assert stats["invalid_session_calls"] == 0 and stats["logoffs"] == 1


async def test_replicas_share_one_session_through_the_token_cache(
    emulator: Emulator, clean_db: asyncpg.Pool
) -> None:
    cache = TokenCache(clean_db, Vault("k1", {"k1": os.urandom(32)}))
    first = emulator.connector("syspro-shared", token_cache=cache)
    second = emulator.connector("syspro-shared", token_cache=cache)
    tester = emulator.connector("syspro-shared", token_cache=cache)  # `connections test`
    try:
        await first.get_logon_profile()
        await second.get_logon_profile()
        result = await tester.ping()
        await tester.close()  # must not log the services off
        await second.get_logon_profile()
        stats = await emulator.stats()
        assert stats["logons"] == 1 and stats["invalid_session_calls"] == 0
        assert result.ok
        assert {c.name: c.detail for c in result.checks}["logon"].endswith(
            "is open (shared with the running services)"
        )
        await emulator.control("POST", "expire_sessions")
        await second.get_logon_profile()  # renews for everyone
        await first.get_logon_profile()
    finally:
        await second.close()
        await first.close()
    stats = await emulator.stats()
    # one renewal for both: `first` learns of it from one rejected call, then takes the cached one
    assert stats["logons"] == 2 and stats["invalid_session_calls"] == 2
    assert second.logons == 1 and first.logons == 1
    assert stats["logoffs"] == 1 and stats["active_sessions"] == 0  # the renewer logged off
