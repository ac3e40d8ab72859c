"""The Zoho CRM emulator behaves like Zoho on the wire (served on 127.0.0.1, real HTTP)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from emulators.kit import RunningEmulator
from emulators.zoho_crm import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_REFRESH_TOKEN,
    create_app,
)

Json = dict[str, Any]

ERP_FIELD = {
    "api_name": "ERP_Customer_No",
    "data_type": "text",
    "length": 40,
    "unique": True,
    "external": True,
}


class Zoho:
    """A tiny test client: token grant, API calls and control calls."""

    def __init__(self, emulator: RunningEmulator, session: aiohttp.ClientSession) -> None:
        self.emulator = emulator
        self.session = session
        self.url = emulator.url
        self.token: str | None = None

    async def grant(self, **overrides: str) -> Json:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": DEFAULT_REFRESH_TOKEN,
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET,
            **overrides,
        }
        async with self.session.post(f"{self.url}/oauth/v2/token", data=form) as response:
            assert response.status == 200
            body: Json = await response.json()
        return body

    async def login(self) -> str:
        body = await self.grant()
        self.token = body["access_token"]
        return self.token

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        all_headers = {"Authorization": f"Zoho-oauthtoken {token or self.token}"}
        all_headers.update(headers or {})
        async with self.session.request(
            method, f"{self.url}/crm/v8{path}", params=params, json=json, headers=all_headers
        ) as response:
            raw = await response.read()
            body = await response.json() if raw else None
            return response.status, body, dict(response.headers)

    async def control(self, method: str, path: str, json: Any = None) -> Any:
        async with self.session.request(
            method, f"{self.url}/_control{path}", json=json
        ) as response:
            assert response.status < 300, await response.text()
            return await response.json()

    async def stats(self) -> Json:
        result: Json = await self.control("GET", "/stats")
        return result

    async def add_erp_field(self) -> None:
        await self.control("POST", "/fields", {"module": "Accounts", "fields": [ERP_FIELD]})


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def start(session: aiohttp.ClientSession, **options: Any) -> tuple[RunningEmulator, Zoho]:
    emulator = await RunningEmulator(create_app(**options)).start()
    zoho = Zoho(emulator, session)
    await zoho.login()
    return emulator, zoho


@pytest.fixture
async def zoho(session: aiohttp.ClientSession) -> AsyncIterator[Zoho]:
    emulator, client = await start(session)
    try:
        yield client
    finally:
        await emulator.stop()


def account(n: int, **extra: Any) -> Json:
    return {"Account_Name": f"Acme {n}", "ERP_Customer_No": f"C-{n:05d}", **extra}


# --- OAuth -----------------------------------------------------------------------------------


async def test_token_grant_form_and_query(zoho: Zoho) -> None:
    body = await zoho.grant()
    assert set(body) == {"access_token", "scope", "api_domain", "token_type", "expires_in"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["api_domain"] == zoho.url
    params = {
        "grant_type": "refresh_token",
        "refresh_token": DEFAULT_REFRESH_TOKEN,
        "client_id": DEFAULT_CLIENT_ID,
        "client_secret": DEFAULT_CLIENT_SECRET,
    }
    async with zoho.session.post(f"{zoho.url}/oauth/v2/token", params=params) as response:
        assert response.status == 200
        by_query = await response.json()
    status, org, _ = await zoho.call("GET", "/org", token=by_query["access_token"])
    assert status == 200
    assert org["org"][0]["id"]
    assert (await zoho.stats())["tokens_issued"] == 3


async def test_token_errors_are_http_200(zoho: Zoho) -> None:
    assert await zoho.grant(client_secret="wrong") == {"error": "invalid_client"}
    assert await zoho.grant(client_id="1000.OTHERDC") == {"error": "invalid_client"}
    assert await zoho.grant(refresh_token="1000.revoked.token") == {"error": "invalid_code"}


async def test_wrong_datacenter_client_is_invalid_client(session: aiohttp.ClientSession) -> None:
    eu_app = create_app(
        datacenter="EU",
        clients={"1000.EUCLIENT": "eu-secret"},
        refresh_tokens={"1000.eu.refresh": "1000.EUCLIENT"},
    )
    eu = await RunningEmulator(eu_app).start()
    eu_zoho = Zoho(eu, session)
    us = await RunningEmulator(create_app()).start()
    try:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": "1000.eu.refresh",
            "client_id": "1000.EUCLIENT",
            "client_secret": "eu-secret",
        }
        async with session.post(f"{us.url}/oauth/v2/token", data=form) as response:
            assert response.status == 200
            assert await response.json() == {"error": "invalid_client"}
        async with session.post(f"{eu.url}/oauth/v2/token", data=form) as response:
            assert "access_token" in await response.json()
        assert (await eu_zoho.stats())["datacenter"] == "EU"
    finally:
        await us.stop()
        await eu.stop()


async def test_token_throttle_after_ten_per_refresh_token(zoho: Zoho) -> None:
    for _ in range(9):  # the fixture already took one
        assert "access_token" in await zoho.grant()
    throttled = await zoho.grant()
    assert throttled == {
        "error_description": (
            "You have made too many requests continuously. Please try again after some time."
        ),
        "error": "Access Denied",
        "status": "failure",
    }
    stats = await zoho.stats()
    assert stats["tokens_issued"] == 10
    assert stats["token_throttled"] == 1
    await zoho.control("POST", "/advance", {"seconds": 601})
    assert "access_token" in await zoho.grant()


async def test_sixteenth_active_token_invalidates_the_oldest(
    session: aiohttp.ClientSession,
) -> None:
    emulator, zoho = await start(session, token_rate_limit=100)
    try:
        first = zoho.token
        for _ in range(14):
            await zoho.grant()
        assert (await zoho.call("GET", "/org", token=first))[0] == 200
        await zoho.grant()  # the 16th
        status, body, _ = await zoho.call("GET", "/org", token=first)
        assert status == 401
        assert body["code"] == "INVALID_TOKEN"
    finally:
        await emulator.stop()


async def test_revoked_refresh_token(zoho: Zoho) -> None:
    async with zoho.session.post(
        f"{zoho.url}/oauth/v2/token/revoke", params={"token": DEFAULT_REFRESH_TOKEN}
    ) as response:
        assert response.status == 200
    assert await zoho.grant() == {"error": "invalid_code"}
    status, body, _ = await zoho.call("GET", "/org")
    assert (status, body["code"]) == (401, "INVALID_TOKEN")


# --- auth on the API -------------------------------------------------------------------------


async def test_missing_and_expired_tokens(zoho: Zoho) -> None:
    async with zoho.session.get(f"{zoho.url}/crm/v8/org") as response:
        assert response.status == 401
        assert await response.json() == {
            "code": "AUTHENTICATION_FAILURE",
            "details": {},
            "message": "Authentication failed",
            "status": "error",
        }
    status, body, _ = await zoho.call("GET", "/org", headers={"Authorization": "Bearer x"})
    assert (status, body["code"]) == (401, "AUTHENTICATION_FAILURE")
    assert (await zoho.call("GET", "/org"))[0] == 200
    expired = await zoho.control("POST", "/expire_tokens")
    assert expired["expired"] >= 1
    status, body, _ = await zoho.call("GET", "/org")
    assert status == 401
    assert body == {
        "code": "INVALID_TOKEN",
        "details": {},
        "message": "invalid oauth token",
        "status": "error",
    }
    await zoho.login()
    assert (await zoho.call("GET", "/org"))[0] == 200


async def test_token_expires_after_ttl(zoho: Zoho) -> None:
    assert (await zoho.call("GET", "/org"))[0] == 200
    await zoho.control("POST", "/advance", {"seconds": 3601})
    status, body, _ = await zoho.call("GET", "/org")
    assert (status, body["code"]) == (401, "INVALID_TOKEN")


# --- metadata --------------------------------------------------------------------------------


async def test_modules_and_field_metadata(zoho: Zoho) -> None:
    status, body, _ = await zoho.call("GET", "/settings/modules")
    assert status == 200
    names = {m["api_name"] for m in body["modules"]}
    assert {"Accounts", "Contacts", "Deals", "Products", "Vendors", "Invoices"} <= names
    assert {"Sales_Orders", "Purchase_Orders"} <= names
    await zoho.add_erp_field()
    status, body, _ = await zoho.call("GET", "/settings/fields", params={"module": "Accounts"})
    fields = {f["api_name"]: f for f in body["fields"]}
    assert fields["Account_Name"]["system_mandatory"] is True
    assert fields["Account_Name"]["data_type"] == "text"
    assert fields["Parent_Account"]["lookup"]["module"]["api_name"] == "Accounts"
    assert fields["ERP_Customer_No"]["unique"]
    assert fields["ERP_Customer_No"]["external"]["type"] == "org"
    assert fields["ERP_Customer_No"]["custom_field"] is True
    assert fields["Modified_Time"]["read_only"] is True
    status, body, _ = await zoho.call("GET", "/settings/fields", params={"module": "Deals"})
    stage = next(f for f in body["fields"] if f["api_name"] == "Stage")
    values = [v["actual_value"] for v in stage["pick_list_values"]]
    assert {"Qualification", "Needs Analysis", "Closed Won", "Closed Lost"} <= set(values)
    status, body, _ = await zoho.call("GET", "/settings/fields", params={"module": "Invoices"})
    items = next(f for f in body["fields"] if f["api_name"] == "Invoiced_Items")
    assert items["data_type"] == "subform"
    status, body, _ = await zoho.call("GET", "/settings/fields", params={"module": "Nope"})
    assert (status, body["code"]) == (400, "INVALID_MODULE")


async def test_unknown_module_and_url(zoho: Zoho) -> None:
    status, body, _ = await zoho.call("GET", "/Leadz", params={"fields": "id"})
    assert (status, body["code"]) == (400, "INVALID_MODULE")
    status, body, _ = await zoho.call("GET", "/Accounts/1/2/3")
    assert (status, body["code"]) == (404, "INVALID_URL_PATTERN")


# --- reading ---------------------------------------------------------------------------------


async def test_fields_param_is_mandatory_and_limited(zoho: Zoho) -> None:
    status, body, _ = await zoho.call("GET", "/Accounts")
    assert status == 400
    assert body == {
        "code": "REQUIRED_PARAM_MISSING",
        "details": {"param_name": "fields"},
        "message": "required param is missing",
        "status": "error",
    }
    many = ",".join(f"Field_{i}" for i in range(51))
    status, body, _ = await zoho.call("GET", "/Accounts", params={"fields": many})
    assert (status, body["code"], body["details"]["limit"]) == (400, "LIMIT_EXCEEDED", 50)
    status, body, _ = await zoho.call("GET", "/Accounts", params={"fields": "Account_Name"})
    assert status == 204
    assert body is None


async def test_paging_with_page_then_page_token_past_2000(zoho: Zoho) -> None:
    seeded = await zoho.control("POST", "/seed", {"module": "Accounts", "count": 2350})
    assert seeded["count"] == 2350
    fields = {"fields": "Account_Name,Modified_Time", "per_page": "200", "sort_order": "asc"}
    seen: list[str] = []
    info: Json = {}
    for page in range(1, 11):
        status, body, _ = await zoho.call("GET", "/Accounts", params={**fields, "page": str(page)})
        assert status == 200
        info = body["info"]
        assert info["page"] == page
        assert info["count"] == 200
        assert info["more_records"] is True
        seen.extend(r["id"] for r in body["data"])
    status, body, _ = await zoho.call("GET", "/Accounts", params={**fields, "page": "11"})
    assert status == 400
    assert body == {
        "code": "DISCRETE_PAGINATION_LIMIT_EXCEEDED",
        "details": {"limit": 2000},
        "message": "You can only get the first 2000 records without using page_token param",
        "status": "error",
    }
    token = info["next_page_token"]
    assert token and info["page_token_expiry"]
    # the token is bound to its params
    status, body, _ = await zoho.call(
        "GET", "/Accounts", params={**fields, "sort_order": "desc", "page_token": token}
    )
    assert (status, body["code"]) == (400, "TOKEN_BOUND_DATA_MISMATCH")
    status, body, _ = await zoho.call(
        "GET", "/Accounts", params={**fields, "page": "1", "page_token": token}
    )
    assert (status, body["code"]) == (400, "AMBIGUITY_DURING_PROCESSING")
    while token:
        status, body, _ = await zoho.call(
            "GET", "/Accounts", params={**fields, "page_token": token}
        )
        assert status == 200
        seen.extend(r["id"] for r in body["data"])
        token = body["info"]["next_page_token"]
        assert bool(token) == body["info"]["more_records"]
    assert len(seen) == 2350
    assert len(set(seen)) == 2350
    assert seen == sorted(seen, key=int)
    record = body["data"][-1]
    assert set(record) == {"id", "Account_Name", "Modified_Time"}
    assert datetime.fromisoformat(record["Modified_Time"]).tzinfo is not None


async def test_if_modified_since(zoho: Zoho) -> None:
    old = (datetime.now(UTC) - timedelta(days=2)).replace(microsecond=0)
    await zoho.control(
        "POST",
        "/seed",
        {
            "module": "Accounts",
            "records": [
                {"Account_Name": f"Old {i}", "Modified_Time": old.isoformat()} for i in range(3)
            ],
        },
    )
    cutoff = (old + timedelta(days=1)).isoformat()
    params = {"fields": "Account_Name", "sort_by": "Modified_Time", "sort_order": "asc"}
    status, body, _ = await zoho.call(
        "GET", "/Accounts", params=params, headers={"If-Modified-Since": cutoff}
    )
    assert status == 304
    assert body is None
    status, body, _ = await zoho.call("POST", "/Accounts", json={"data": [{"Account_Name": "New"}]})
    assert status == 201
    status, body, _ = await zoho.call(
        "GET", "/Accounts", params=params, headers={"If-Modified-Since": cutoff}
    )
    assert status == 200
    assert [r["Account_Name"] for r in body["data"]] == ["New"]
    status, body, _ = await zoho.call("GET", "/Accounts", params=params)
    assert [r["Account_Name"] for r in body["data"]][:3] == ["Old 0", "Old 1", "Old 2"]


async def test_get_single_record_and_unknown_id(zoho: Zoho) -> None:
    status, body, _ = await zoho.call("GET", "/Accounts/4876876000999999999")
    assert status == 204
    ids = (await zoho.control("POST", "/seed", {"module": "Accounts", "count": 1}))["ids"]
    status, body, _ = await zoho.call("GET", f"/Accounts/{ids[0]}")
    assert status == 200
    record = body["data"][0]
    assert record["id"] == ids[0]
    assert record["Owner"]["id"]
    assert record["Account_Name"].startswith("Seed Account")


# --- writing ---------------------------------------------------------------------------------


async def test_upsert_inserts_then_updates_by_duplicate_check_field(zoho: Zoho) -> None:
    await zoho.add_erp_field()
    body = {"data": [account(1), account(2)], "duplicate_check_fields": ["ERP_Customer_No"]}
    status, first, _ = await zoho.call("POST", "/Accounts/upsert", json=body)
    assert status == 200
    assert [r["action"] for r in first["data"]] == ["insert", "insert"]
    assert first["data"][0]["duplicate_field"] is None
    assert first["data"][0]["message"] == "record added"
    ids = [r["details"]["id"] for r in first["data"]]
    await zoho.control("POST", "/advance", {"seconds": 5})
    body = {
        "data": [account(2, Phone="+1 555 0100"), account(1, Account_Name="Acme One")],
        "duplicate_check_fields": ["ERP_Customer_No"],
    }
    status, second, _ = await zoho.call("POST", "/Accounts/upsert", json=body)
    assert status == 200
    results = second["data"]
    assert [r["action"] for r in results] == ["update", "update"]
    assert [r["details"]["id"] for r in results] == [ids[1], ids[0]]
    assert results[0]["duplicate_field"] == "ERP_Customer_No"
    assert results[0]["message"] == "record updated"
    assert results[0]["details"]["Modified_Time"] > first["data"][1]["details"]["Modified_Time"]
    records = {r["id"]: r for r in (await zoho.control("GET", "/records/Accounts"))["data"]}
    assert len(records) == 2
    assert records[ids[0]]["Account_Name"] == "Acme One"
    assert records[ids[1]]["Phone"] == "+1 555 0100"
    stats = await zoho.stats()
    assert stats["records_inserted"] == 2
    assert stats["records_updated"] == 2
    assert stats["write_calls"] == 2
    assert stats["duplicates"]["Accounts"] == 0
    counts = await zoho.control("GET", "/counts")  # the cheap progress check says the same
    assert counts["write_calls"] == 2
    assert counts["records"] == stats["records"] and counts["records"]["Accounts"] == 2


async def test_upsert_rejects_non_unique_duplicate_check_field(zoho: Zoho) -> None:
    body = {"data": [{"Account_Name": "A", "Phone": "1"}], "duplicate_check_fields": ["Phone"]}
    status, result, _ = await zoho.call("POST", "/Accounts/upsert", json=body)
    assert status == 400
    assert result["data"][0]["code"] == "INVALID_DATA"
    assert result["data"][0]["details"]["api_name"] == "Phone"


async def test_upsert_defaults_to_system_duplicate_field(zoho: Zoho) -> None:
    for _ in range(2):
        status, body, _ = await zoho.call(
            "POST", "/Accounts/upsert", json={"data": [{"Account_Name": "Same Name GmbH"}]}
        )
        assert status == 200
    assert body["data"][0]["action"] == "update"
    assert body["data"][0]["duplicate_field"] == "Account_Name"
    assert (await zoho.stats())["records"]["Accounts"] == 1


async def test_mixed_results_207_in_input_order(zoho: Zoho) -> None:
    data = [
        {"Account_Name": "Good 1"},
        {"Account_Name": "Bad email", "Phone": "call me maybe"},
        {"Phone": "+1 555 0100"},
        {"Account_Name": "Unknown field", "Colour": "blue"},
        {"Account_Name": "Bad picklist", "Industry": "Widgets"},
        {"Account_Name": "x" * 201},
        {"Account_Name": "Bad number", "Annual_Revenue": "lots"},
        {"Account_Name": "Good 2", "Employees": 12, "Annual_Revenue": 1200.5},
    ]
    status, body, _ = await zoho.call("POST", "/Accounts", json={"data": data})
    assert status == 207
    results = body["data"]
    assert [r["code"] for r in results] == [
        "SUCCESS",
        "INVALID_DATA",
        "MANDATORY_NOT_FOUND",
        "INVALID_DATA",
        "INVALID_DATA",
        "INVALID_DATA",
        "INVALID_DATA",
        "SUCCESS",
    ]
    assert results[1]["details"] == {
        "expected_data_type": "phone",
        "api_name": "Phone",
        "json_path": "$.data[1].Phone",
    }
    assert results[2]["details"]["api_name"] == "Account_Name"
    assert results[3]["details"]["api_name"] == "Colour"
    assert "Widgets" not in results[4]["details"]["supported_values"]
    assert results[5]["details"]["maximum_length"] == 200
    assert results[6]["details"]["expected_data_type"] == "currency"
    assert results[0]["details"]["id"] and results[7]["details"]["id"]
    assert all(r["status"] == "error" for r in results[1:7])
    status, body, _ = await zoho.call("POST", "/Accounts", json={"data": [{"Phone": "1"}]})
    assert status == 400
    assert body["data"][0]["code"] == "MANDATORY_NOT_FOUND"


async def test_more_than_100_records_rejected(zoho: Zoho) -> None:
    data = [{"Account_Name": f"A{i}"} for i in range(101)]
    status, body, _ = await zoho.call("POST", "/Accounts/upsert", json={"data": data})
    assert status == 400
    assert body["data"][0]["code"] == "LIMIT_EXCEEDED"
    assert body["data"][0]["details"]["maximum_length"] == 100
    assert (await zoho.stats())["records"]["Accounts"] == 0


async def test_update_by_id(zoho: Zoho) -> None:
    ids = (await zoho.control("POST", "/seed", {"module": "Accounts", "count": 2}))["ids"]
    data = [{"id": ids[0], "Website": "https://acme.example"}, {"id": "123456789", "Phone": "1"}]
    status, body, _ = await zoho.call("PUT", "/Accounts", json={"data": data})
    assert status == 207
    assert body["data"][0]["message"] == "record updated"
    assert body["data"][1]["code"] == "INVALID_DATA"
    status, body, _ = await zoho.call("PUT", "/Accounts", json={"data": [{"Phone": "1"}]})
    assert (status, body["data"][0]["code"]) == (400, "MANDATORY_NOT_FOUND")
    status, body, _ = await zoho.call(
        "PUT", f"/Accounts/{ids[1]}", json={"data": [{"Account_Name": None}]}
    )
    assert (status, body["data"][0]["code"]) == (400, "MANDATORY_NOT_FOUND")


async def test_lookups_are_validated_and_rendered(zoho: Zoho) -> None:
    await zoho.add_erp_field()
    status, body, _ = await zoho.call("POST", "/Accounts", json={"data": [account(7)]})
    account_id = body["data"][0]["details"]["id"]
    contacts = [
        {"Last_Name": "Known", "Account_Name": {"id": account_id}},
        {"Last_Name": "Unknown", "Account_Name": {"id": "4876876000000000001"}},
        {"Last_Name": "Not an object", "Account_Name": account_id},
    ]
    status, body, _ = await zoho.call("POST", "/Contacts", json={"data": contacts})
    assert status == 207
    assert [r["code"] for r in body["data"]] == ["SUCCESS", "INVALID_DATA", "INVALID_DATA"]
    assert body["data"][1]["details"]["api_name"] == "Account_Name"
    assert body["data"][2]["details"]["expected_data_type"] == "jsonobject"
    contact_id = body["data"][0]["details"]["id"]
    status, body, _ = await zoho.call(
        "GET", "/Contacts", params={"fields": "Full_Name,Account_Name", "ids": contact_id}
    )
    assert body["data"][0]["Account_Name"] == {"name": "Acme 7", "id": account_id}
    assert body["data"][0]["Full_Name"] == "Known"
    # lookup by the account's external id
    status, body, _ = await zoho.call(
        "POST",
        "/Contacts",
        json={"data": [{"Last_Name": "Ext", "Account_Name": {"ERP_Customer_No": "C-00007"}}]},
        headers={"X-EXTERNAL": "Contacts.Account_Name.ERP_Customer_No"},
    )
    assert status == 201
    record_id = body["data"][0]["details"]["id"]
    record = await zoho.control("GET", f"/records/Contacts/{record_id}")
    assert record["Account_Name"]["id"] == account_id
    status, body, _ = await zoho.call(
        "GET", "/Accounts/C-00007", headers={"X-EXTERNAL": "Accounts.ERP_Customer_No"}
    )
    assert (status, body["data"][0]["id"]) == (200, account_id)


async def test_unique_duplicate_data_and_duplicate_count(zoho: Zoho) -> None:
    await zoho.add_erp_field()
    status, body, _ = await zoho.call("POST", "/Accounts", json={"data": [account(1)]})
    first_id = body["data"][0]["details"]["id"]
    status, body, _ = await zoho.call(
        "POST", "/Accounts", json={"data": [account(1, Account_Name="Other name")]}
    )
    assert status == 400
    error = body["data"][0]
    assert error["code"] == "DUPLICATE_DATA"
    assert error["details"]["api_name"] == "ERP_Customer_No"
    assert error["details"]["duplicate_record"]["id"] == first_id
    assert (await zoho.stats())["duplicates"]["Accounts"] == 0
    # a plain insert of the same system duplicate value (Account_Name) creates a duplicate
    status, body, _ = await zoho.call(
        "POST", "/Accounts", json={"data": [{"Account_Name": "Acme 1"}, {"Account_Name": "acme 1"}]}
    )
    assert status == 201
    stats = await zoho.stats()
    assert stats["duplicates"]["Accounts"] == 2
    assert stats["record_errors"]["DUPLICATE_DATA"] == 1


async def test_line_items_required_and_totals(zoho: Zoho) -> None:
    status, body, _ = await zoho.call(
        "POST", "/Products", json={"data": [{"Product_Name": "Widget", "Unit_Price": 2.5}]}
    )
    product_id = body["data"][0]["details"]["id"]
    status, body, _ = await zoho.call("POST", "/Invoices", json={"data": [{"Subject": "INV-1"}]})
    assert (status, body["data"][0]["code"]) == (400, "MANDATORY_NOT_FOUND")
    assert body["data"][0]["details"]["api_name"] == "Invoiced_Items"
    invoice = {
        "Subject": "INV-1",
        "Invoice_Date": "2024-05-01",
        "Invoiced_Items": [
            {"Product_Name": {"id": product_id}, "Quantity": 4},
            {"Product_Name": {"id": product_id}, "Quantity": 1, "List_Price": 10},
        ],
    }
    status, body, _ = await zoho.call("POST", "/Invoices", json={"data": [invoice]})
    assert status == 201
    invoice_id = body["data"][0]["details"]["id"]
    status, body, _ = await zoho.call("GET", f"/Invoices/{invoice_id}")
    record = body["data"][0]
    assert record["Grand_Total"] == 20.0
    assert [i["Total"] for i in record["Invoiced_Items"]] == [10.0, 10.0]
    assert record["Invoiced_Items"][0]["Product_Name"] == {"name": "Widget", "id": product_id}
    status, body, _ = await zoho.call(
        "GET", "/Invoices", params={"fields": "Subject,Invoiced_Items"}
    )
    assert "Invoiced_Items" not in body["data"][0]
    bad = {**invoice, "Invoice_Date": "01/05/2024"}
    status, body, _ = await zoho.call("POST", "/Invoices", json={"data": [bad]})
    assert body["data"][0]["details"]["expected_data_type"] == "date"


async def test_line_item_update_merges_by_id(zoho: Zoho) -> None:
    status, body, _ = await zoho.call(
        "POST", "/Products", json={"data": [{"Product_Name": "P", "Unit_Price": 1}]}
    )
    product = {"id": body["data"][0]["details"]["id"]}
    order = {"Subject": "SO-1", "Ordered_Items": [{"Product_Name": product, "Quantity": 1}]}
    status, body, _ = await zoho.call("POST", "/Sales_Orders", json={"data": [order]})
    order_id = body["data"][0]["details"]["id"]
    record = await zoho.control("GET", f"/records/Sales_Orders/{order_id}")
    first_item = record["Ordered_Items"][0]["id"]
    update = {
        "id": order_id,
        "Ordered_Items": [
            {"id": first_item, "Quantity": 3},
            {"Product_Name": product, "Quantity": 2},
        ],
    }
    status, body, _ = await zoho.call("PUT", "/Sales_Orders", json={"data": [update]})
    assert status == 200
    record = await zoho.control("GET", f"/records/Sales_Orders/{order_id}")
    assert [i["Quantity"] for i in record["Ordered_Items"]] == [3, 2]
    assert record["Grand_Total"] == 5.0
    remove = {"id": order_id, "Ordered_Items": [{"id": first_item, "_delete": None}]}
    status, body, _ = await zoho.call("PUT", "/Sales_Orders", json={"data": [remove]})
    record = await zoho.control("GET", f"/records/Sales_Orders/{order_id}")
    assert [i["Quantity"] for i in record["Ordered_Items"]] == [2]
    unknown = {"id": order_id, "Ordered_Items": [{"id": "1234567", "Quantity": 1}]}
    status, body, _ = await zoho.call("PUT", "/Sales_Orders", json={"data": [unknown]})
    assert (status, body["data"][0]["code"]) == (400, "INVALID_DATA")


async def test_delete_and_deleted_list(zoho: Zoho) -> None:
    ids = (await zoho.control("POST", "/seed", {"module": "Vendors", "count": 3}))["ids"]
    status, body, _ = await zoho.call(
        "DELETE", "/Vendors", params={"ids": f"{ids[0]},{ids[1]},999999999"}
    )
    assert status == 207
    assert [r["status"] for r in body["data"]] == ["success", "success", "error"]
    status, body, _ = await zoho.call("GET", "/Vendors/deleted")
    assert status == 200
    assert {r["id"] for r in body["data"]} == {ids[0], ids[1]}
    status, body, _ = await zoho.call("GET", "/Vendors", params={"fields": "Vendor_Name"})
    assert [r["id"] for r in body["data"]] == [ids[2]]
    assert (await zoho.stats())["records_deleted"] == 2


async def test_line_items_optional_when_configured(session: aiohttp.ClientSession) -> None:
    emulator, zoho = await start(session, line_items_required=False)
    try:
        status, _, _ = await zoho.call("POST", "/Invoices", json={"data": [{"Subject": "S"}]})
        assert status == 201
    finally:
        await emulator.stop()


# --- search / COQL ---------------------------------------------------------------------------


async def test_search_equals_contains_and_escaping(zoho: Zoho) -> None:
    await zoho.call(
        "POST",
        "/Accounts",
        json={
            "data": [
                {"Account_Name": "ABC Inc", "Billing_City": "Berlin"},
                {"Account_Name": "ABC", "Billing_City": "Paris"},
                {"Account_Name": "Smith (Holdings), Ltd", "Billing_City": "Berlin"},
            ]
        },
    )
    status, body, _ = await zoho.call(
        "GET", "/Accounts/search", params={"criteria": "(Account_Name:equals:ABC)"}
    )
    assert status == 200
    assert sorted(r["Account_Name"] for r in body["data"]) == ["ABC", "ABC Inc"]
    criteria = r"((Account_Name:equals:Smith \(Holdings\)\, Ltd)and(Billing_City:equals:Berlin))"
    status, body, _ = await zoho.call("GET", "/Accounts/search", params={"criteria": criteria})
    assert [r["Account_Name"] for r in body["data"]] == ["Smith (Holdings), Ltd"]
    status, body, _ = await zoho.call(
        "GET", "/Accounts/search", params={"criteria": "(Account_Name:starts_with:Zed)"}
    )
    assert status == 204
    status, body, _ = await zoho.call(
        "GET", "/Accounts/search", params={"criteria": "(Nope:equals:1)"}
    )
    assert (status, body["code"]) == (400, "INVALID_QUERY")


async def test_coql(zoho: Zoho) -> None:
    await zoho.call(
        "POST",
        "/Accounts",
        json={"data": [{"Account_Name": f"Co {i}", "Employees": i} for i in range(5)]},
    )
    query = (
        "select Account_Name, Employees from Accounts where Employees >= 2 "
        "order by Employees desc limit 0, 2"
    )
    status, body, _ = await zoho.call("POST", "/coql", json={"select_query": query})
    assert status == 200
    assert [r["Employees"] for r in body["data"]] == [4, 3]
    assert body["info"] == {"count": 2, "more_records": True}
    status, body, _ = await zoho.call(
        "POST",
        "/coql",
        json={"select_query": "select Account_Name from Accounts where Account_Name = 'Co 9'"},
    )
    assert status == 204
    status, body, _ = await zoho.call(
        "POST", "/coql", json={"select_query": "select Nope from Accounts where id is not null"}
    )
    assert (status, body["code"]) == (400, "INVALID_QUERY")


async def lookalikes(zoho: Zoho, count: int) -> str:
    """``P100`` first, then ``P100-1`` ... ``P100-<count>`` (ERP_Customer_No), by upsert."""
    await zoho.add_erp_field()
    keys = ["P100"] + [f"P100-{n}" for n in range(1, count + 1)]
    first = ""
    for start in range(0, len(keys), 100):
        batch = [{"Account_Name": f"Acme {k}", "ERP_Customer_No": k} for k in keys[start:][:100]]
        status, body, _ = await zoho.call(
            "POST",
            "/Accounts/upsert",
            json={"data": batch, "duplicate_check_fields": ["ERP_Customer_No"]},
        )
        assert status == 200, body
        first = first or body["data"][0]["details"]["id"]
    return first


async def test_search_is_an_index_search_that_buries_the_exact_match(zoho: Zoho) -> None:
    p100 = await lookalikes(zoho, 300)
    criteria = {"criteria": "(ERP_Customer_No:equals:P100)"}
    status, body, _ = await zoho.call("GET", "/Accounts/search", params=criteria)
    assert status == 200
    page1 = [r["ERP_Customer_No"] for r in body["data"]]
    assert len(page1) == 200 and body["info"]["more_records"] is True
    assert "P100" not in page1  # most recently modified first: look-alikes fill page 1
    assert all(key.startswith("P100-") for key in page1)
    status, body, _ = await zoho.call("GET", "/Accounts/search", params={**criteria, "page": "2"})
    page2 = [r["ERP_Customer_No"] for r in body["data"]]
    assert (len(page2), body["info"]["more_records"]) == (101, False)
    assert page2[-1] == "P100"
    # words and prefixes, case-insensitively: "p100-2" is P100-2, P100-20..29, P100-200..299
    status, body, _ = await zoho.call(
        "GET", "/Accounts/search", params={"criteria": "(ERP_Customer_No:equals:p100-2)"}
    )
    assert body["info"]["count"] == 111 and status == 200
    # not a substring match: "00" is inside every key but starts none of their words
    status, _, _ = await zoho.call(
        "GET", "/Accounts/search", params={"criteria": "(ERP_Customer_No:equals:00)"}
    )
    assert status == 204

    # COQL compares whole values: = and in (...) find exactly P100
    select = "select id, ERP_Customer_No from Accounts where "
    status, body, _ = await zoho.call(
        "POST", "/coql", json={"select_query": select + "ERP_Customer_No = 'P100'"}
    )
    assert status == 200
    assert body["data"] == [{"id": p100, "ERP_Customer_No": "P100"}]
    values = ", ".join(f"'{v}'" for v in ("P100", "P100-0", "P10", "P100-1000"))
    status, body, _ = await zoho.call(
        "POST", "/coql", json={"select_query": select + f"ERP_Customer_No in ({values})"}
    )
    assert status == 200
    assert body["data"] == [{"id": p100, "ERP_Customer_No": "P100"}]


async def test_search_order_and_match_are_options(session: aiohttp.ClientSession) -> None:
    emulator, zoho = await start(session, search_order="created_asc", search_equals="exact")
    try:
        await lookalikes(zoho, 3)
        status, body, _ = await zoho.call(
            "GET", "/Accounts/search", params={"criteria": "(ERP_Customer_No:equals:P100)"}
        )
        assert status == 200
        assert [r["ERP_Customer_No"] for r in body["data"]] == ["P100"]
        await zoho.control("POST", "/config", {"search_equals": "contains"})
        status, body, _ = await zoho.call(
            "GET", "/Accounts/search", params={"criteria": "(ERP_Customer_No:equals:100-)"}
        )
        assert [r["ERP_Customer_No"] for r in body["data"]] == ["P100-1", "P100-2", "P100-3"]
    finally:
        await emulator.stop()


async def test_coql_in_takes_at_most_100_values_and_25_criteria(zoho: Zoho) -> None:
    await lookalikes(zoho, 3)

    async def coql(where: str) -> tuple[int, Any]:
        query = f"select id from Accounts where {where}"
        status, body, _ = await zoho.call("POST", "/coql", json={"select_query": query})
        return status, body

    hundred = ", ".join(f"'P100-{n}'" for n in range(1, 101))
    status, body = await coql(f"ERP_Customer_No in ({hundred})")
    assert (status, body["info"]["count"]) == (200, 3)
    status, body = await coql(f"ERP_Customer_No in ({hundred}, 'P100')")
    assert (status, body["code"]) == (400, "LIMIT_EXCEEDED")
    assert body["details"]["limit"] == 100

    where = "ERP_Customer_No = 'x0'"
    for n in range(1, 25):
        where = f"({where}) or ERP_Customer_No = 'x{n}'"
    assert (await coql(where))[0] == 204  # 25 criteria
    status, body = await coql(f"({where}) or ERP_Customer_No = 'P100'")
    assert (status, body["code"]) == (400, "LIMIT_EXCEEDED")


# --- limits ----------------------------------------------------------------------------------


async def test_credits_and_remaining_header(session: aiohttp.ClientSession) -> None:
    emulator, zoho = await start(session, credits_per_day=30)
    try:
        data = [{"Account_Name": f"A{i}"} for i in range(100)]
        status, _, headers = await zoho.call("POST", "/Accounts", json={"data": data})
        assert status == 201
        assert "X-API-CREDITS-REMAINING" not in headers
        assert (await zoho.stats())["credits_used"] == 10
        status, _, headers = await zoho.call("POST", "/Accounts/upsert", json={"data": data[:11]})
        assert status == 200
        assert (await zoho.stats())["credits_used"] == 12
        for _ in range(3):
            status, _, headers = await zoho.call("GET", "/org")
        assert headers["X-API-CREDITS-REMAINING"] == "15"
        status, _, _ = await zoho.call("POST", "/Accounts/upsert", json={"data": data})
        assert status == 200
        status, body, _ = await zoho.call("POST", "/Accounts/upsert", json={"data": data})
        assert status == 429
        assert body["code"] == "TOO_MANY_REQUESTS"
        stats = await zoho.stats()
        assert stats["credits_used"] == 25
        assert stats["credit_rejections"] == 1
        await zoho.control("POST", "/advance", {"seconds": 24 * 3600 + 1})
        await zoho.login()  # the access token expired with the clock as well
        assert (await zoho.call("GET", "/org"))[0] == 200
    finally:
        await emulator.stop()


async def test_concurrency_limit_429(session: aiohttp.ClientSession) -> None:
    emulator, zoho = await start(session, max_concurrency=3, service_time_ms=150)
    try:
        results = await asyncio.gather(*(zoho.call("GET", "/org") for _ in range(6)))
        statuses = sorted(r[0] for r in results)
        assert statuses == [200, 200, 200, 429, 429, 429]
        rejected = next(r for r in results if r[0] == 429)
        assert rejected[1]["code"] == "TOO_MANY_REQUESTS"
        assert "Retry-After" not in rejected[2]
        stats = await zoho.stats()
        assert stats["peak_concurrency"] == 3
        assert stats["concurrency_rejections"] == 3
    finally:
        await emulator.stop()


async def test_sub_concurrency_for_large_writes(session: aiohttp.ClientSession) -> None:
    emulator, zoho = await start(session, sub_concurrency=2, service_time_ms=150)
    try:
        big = {"data": [{"Account_Name": f"A{i}"} for i in range(11)]}
        small = {"data": [{"Account_Name": "small"}]}
        calls = [zoho.call("POST", "/Accounts/upsert", json=big) for _ in range(4)]
        calls += [zoho.call("POST", "/Accounts", json=small) for _ in range(2)]
        results = await asyncio.gather(*calls)
        big_statuses = sorted(r[0] for r in results[:4])
        assert big_statuses == [200, 200, 429, 429]
        assert [r[0] for r in results[4:]] == [201, 201]
        assert (await zoho.stats())["peak_sub_concurrency"] == 2
    finally:
        await emulator.stop()


async def test_fault_injection_shapes(zoho: Zoho) -> None:
    await zoho.control("POST", "/faults", {"throttle_next": 1, "fail_next": 1})
    status, body, _ = await zoho.call("GET", "/org")
    assert (status, body["code"], body["status"]) == (429, "TOO_MANY_REQUESTS", "error")
    status, body, _ = await zoho.call("GET", "/org")
    assert (status, body["code"]) == (500, "INTERNAL_ERROR")
    assert (await zoho.call("GET", "/org"))[0] == 200
    stats = await zoho.stats()
    assert stats["statuses"]["429"] == 1
    assert stats["calls"]["GET /crm/v8/org"] == 3


async def test_reject_rule(zoho: Zoho) -> None:
    await zoho.control(
        "POST", "/reject", {"module": "Accounts", "field": "Account_Name", "value": "Poison"}
    )
    data = [{"Account_Name": "Fine"}, {"Account_Name": "Poison"}]
    status, body, _ = await zoho.call("POST", "/Accounts/upsert", json={"data": data})
    assert status == 207
    assert body["data"][1]["code"] == "INVALID_DATA"


async def test_reset_forgets_data_but_keeps_tokens(zoho: Zoho) -> None:
    await zoho.add_erp_field()
    await zoho.control("POST", "/seed", {"module": "Accounts", "count": 3})
    await zoho.control("POST", "/reset")
    stats = await zoho.stats()
    assert stats["records"]["Accounts"] == 0
    assert stats["total_calls"] == 0
    status, body, _ = await zoho.call("POST", "/Accounts", json={"data": [account(1)]})
    assert (status, body["data"][0]["details"]["api_name"]) == (400, "ERP_Customer_No")


# --- notifications ---------------------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, asyncio.Queue[Json]]]:
    received: asyncio.Queue[Json] = asyncio.Queue()

    async def callback(request: web.Request) -> web.Response:
        await received.put({"body": await request.json(), "query": dict(request.query)})
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/zoho/callback", callback)
    server = await RunningEmulator(app).start()
    try:
        yield f"{server.url}/zoho/callback", received
    finally:
        await server.stop()


async def test_notification_callbacks(
    zoho: Zoho, receiver: tuple[str, asyncio.Queue[Json]]
) -> None:
    url, received = receiver
    watch = {
        "watch": [
            {
                "channel_id": 1000000068001,
                "events": ["Accounts.all", "Deals.create"],
                "token": "TOKEN_FOR_VERIFICATION",
                "notify_url": f"{url}?key1=val1",
                "return_affected_field_values": True,
            }
        ]
    }
    status, body, _ = await zoho.call("POST", "/actions/watch", json=watch)
    assert status == 201
    details = body["watch"][0]["details"]["events"]
    assert {d["resource_name"] for d in details} == {"Accounts", "Deals"}
    expiry = datetime.fromisoformat(details[0]["channel_expiry"])
    assert timedelta(minutes=59) < expiry - datetime.now(UTC) <= timedelta(hours=1, seconds=5)

    status, body, _ = await zoho.call(
        "POST", "/Accounts", json={"data": [{"Account_Name": "A"}, {"Account_Name": "B"}]}
    )
    ids = [r["details"]["id"] for r in body["data"]]
    event = await asyncio.wait_for(received.get(), 5)
    payload = event["body"]
    assert set(payload) == {
        "server_time",
        "query_params",
        "module",
        "resource_uri",
        "ids",
        "affected_fields",
        "operation",
        "channel_id",
        "token",
    }
    assert payload["module"] == "Accounts"
    assert payload["operation"] == "insert"
    assert payload["ids"] == ids
    assert payload["channel_id"] == "1000000068001"
    assert payload["token"] == "TOKEN_FOR_VERIFICATION"
    assert payload["query_params"] == {"key1": "val1"}

    # a change made by a CRM user (control API) notifies too and bumps Modified_Time
    before = await zoho.control("GET", f"/records/Accounts/{ids[0]}")
    await zoho.control("POST", "/advance", {"seconds": 2})
    after = await zoho.control("PATCH", f"/records/Accounts/{ids[0]}", {"Phone": "+49 30 1234"})
    assert after["Modified_Time"] > before["Modified_Time"]
    event = await asyncio.wait_for(received.get(), 5)
    assert event["body"]["operation"] == "update"
    assert event["body"]["ids"] == [ids[0]]
    assert event["body"]["affected_fields"] == [{ids[0]: ["Phone"]}]

    # Deals only watches create; Contacts not at all
    await zoho.call("POST", "/Contacts", json={"data": [{"Last_Name": "X"}]})
    await zoho.call(
        "POST",
        "/Deals",
        json={"data": [{"Deal_Name": "D", "Stage": "Qualification", "Closing_Date": "2024-06-30"}]},
    )
    event = await asyncio.wait_for(received.get(), 5)
    assert event["body"]["module"] == "Deals"
    assert received.empty()

    # an expired channel is silent
    await zoho.control("POST", "/advance", {"seconds": 3600})
    await zoho.login()
    status, _, _ = await zoho.call("POST", "/Accounts", json={"data": [{"Account_Name": "C"}]})
    assert status == 201
    await asyncio.sleep(0.2)
    assert received.empty()
    assert (await zoho.call("GET", "/actions/watch"))[0] == 204
    assert (await zoho.stats())["notifications_sent"] == 3


async def test_watch_validation_and_lifecycle(zoho: Zoho) -> None:
    base = {"channel_id": "42", "events": ["Accounts.edit"], "notify_url": "http://127.0.0.1:9/x"}
    items = [
        base,
        {**base, "channel_id": "43", "token": "t" * 51},
        {**base, "channel_id": "44", "events": ["Leads.edit"]},
        {"events": ["Accounts.edit"], "notify_url": "http://127.0.0.1:9/x"},
    ]
    status, body, _ = await zoho.call("POST", "/actions/watch", json={"watch": items})
    assert status == 207
    assert [r["code"] for r in body["watch"]] == [
        "SUCCESS",
        "INVALID_DATA",
        "INVALID_DATA",
        "MANDATORY_NOT_FOUND",
    ]
    week = (datetime.now(UTC) + timedelta(days=6)).replace(microsecond=0).isoformat()
    status, body, _ = await zoho.call(
        "PATCH", "/actions/watch", json={"watch": [{"channel_id": "42", "channel_expiry": week}]}
    )
    assert status == 200
    status, body, _ = await zoho.call("GET", "/actions/watch", params={"channel_id": "42"})
    assert status == 200
    assert body["watch"][0]["channel_expiry"] == datetime.fromisoformat(week).isoformat()
    status, body, _ = await zoho.call("DELETE", "/actions/watch", params={"channel_ids": "42"})
    assert status == 200
    assert body["watch"][0]["message"] == "Successfully un-subscribed from actions-watch"
    assert (await zoho.call("GET", "/actions/watch"))[0] == 204


async def test_channel_limits_expiry_and_control(zoho: Zoho) -> None:
    url = "http://127.0.0.1:9/hook"
    many = [f"Accounts.{op}" for op in ("create", "edit", "delete")] * 17  # 51 events
    status, body, _ = await zoho.call(
        "POST",
        "/actions/watch",
        json={"watch": [{"channel_id": "76", "events": many, "notify_url": url}]},
    )
    assert (status, body["watch"][0]["code"]) == (400, "LIMIT_EXCEEDED")

    too_far = (datetime.now(UTC) + timedelta(days=8)).replace(microsecond=0).isoformat()
    item = {
        "channel_id": "77",
        "events": ["Accounts.all"],
        "notify_url": url,
        "token": "t-77",
        "channel_expiry": too_far,
    }
    status, body, _ = await zoho.call("POST", "/actions/watch", json={"watch": [item]})
    assert status == 201
    expiry = datetime.fromisoformat(body["watch"][0]["details"]["events"][0]["channel_expiry"])
    assert timedelta(minutes=59) < expiry - datetime.now(UTC) <= timedelta(hours=1, seconds=5)

    channels = (await zoho.control("GET", "/channels"))["channels"]
    assert [(c["channel_id"], c["token"], c["expired"]) for c in channels] == [
        ("77", "t-77", False)
    ]
    assert 3500 < channels[0]["expires_in_s"] <= 3600

    # renewed before it lapses, a channel lives on past its first expiry
    later = (datetime.now(UTC) + timedelta(hours=5)).replace(microsecond=0).isoformat()
    renew = {"watch": [{"channel_id": "77", "channel_expiry": later}]}
    assert (await zoho.call("PATCH", "/actions/watch", json=renew))[0] == 200
    await zoho.control("POST", "/advance", {"seconds": 3700})
    await zoho.login()
    assert (await zoho.call("GET", "/actions/watch", params={"channel_id": "77"}))[0] == 200

    # once expired it is gone: not listed, not renewable, not disableable; enable it again
    assert await zoho.control("POST", "/channels/expire", {"channel_id": "77"}) == {"expired": 1}
    channels = (await zoho.control("GET", "/channels"))["channels"]
    assert channels[0]["expired"] is True and channels[0]["expires_in_s"] <= 0
    assert (await zoho.call("GET", "/actions/watch"))[0] == 204
    status, body, _ = await zoho.call("PATCH", "/actions/watch", json=renew)
    assert (status, body["watch"][0]["code"]) == (400, "NOT_SUBSCRIBED")
    status, body, _ = await zoho.call("DELETE", "/actions/watch", params={"channel_ids": "77"})
    assert (status, body["watch"][0]["code"]) == (400, "NOT_SUBSCRIBED")
    del item["channel_expiry"]
    assert (await zoho.call("POST", "/actions/watch", json={"watch": [item]}))[0] == 201
    assert (await zoho.call("GET", "/actions/watch", params={"channel_id": "77"}))[0] == 200
    assert await zoho.control("POST", "/channels/expire", {}) == {"expired": 1}
