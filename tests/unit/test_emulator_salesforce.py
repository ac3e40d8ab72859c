"""The Salesforce emulator behaves like Salesforce on the wire (served on 127.0.0.1, real HTTP)."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from emulators.kit import RunningEmulator
from emulators.salesforce import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, make_app
from emulators.salesforce.errors import id18

Json = dict[str, Any]
V = "v66.0"
ID_RE = re.compile(r"^[0-9A-Za-z]{18}$")
LIMIT_RE = re.compile(r"^api-usage=(\d+)/(\d+)$")


class SF:
    """A tiny test client: token grant, REST calls and control calls."""

    def __init__(self, emulator: RunningEmulator, session: aiohttp.ClientSession) -> None:
        self.emulator = emulator
        self.session = session
        self.url = emulator.url
        self.token = ""

    async def grant(self, **form: str) -> tuple[int, Json]:
        data = {
            "grant_type": "client_credentials",
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET,
            **form,
        }
        async with self.session.post(f"{self.url}/services/oauth2/token", data=data) as response:
            return response.status, await response.json()

    async def login(self) -> None:
        status, body = await self.grant()
        assert status == 200, body
        self.token = body["access_token"]

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
        version: str = V,
    ) -> tuple[int, Any, dict[str, str]]:
        all_headers = {"Authorization": f"Bearer {token or self.token}", **(headers or {})}
        if path.startswith("/services/"):
            url = f"{self.url}{path}"
        else:
            url = f"{self.url}/services/data/{version}{path}"
        async with self.session.request(
            method, url, json=json, params=params, headers=all_headers
        ) as response:
            raw = await response.read()
            body = await response.json(content_type=None) if raw else None
            return response.status, body, dict(response.headers)

    async def query(self, soql: str, **kw: Any) -> tuple[int, Any, dict[str, str]]:
        return await self.call("GET", "/query", params={"q": soql}, **kw)

    async def control(self, method: str, path: str, json: Any = None) -> Any:
        async with self.session.request(
            method, f"{self.url}/_control{path}", json=json
        ) as response:
            assert response.status < 300, await response.text()
            return await response.json()

    async def seed(self, obj: str, records: list[Json], **extra: Any) -> list[str]:
        body = await self.control("POST", "/seed", {"object": obj, "records": records, **extra})
        ids: list[str] = body["ids"]
        return ids

    async def upsert_collection(
        self, obj: str, field: str, records: list[Json], **kw: Any
    ) -> tuple[int, Any, dict[str, str]]:
        body = {
            "allOrNone": kw.pop("all_or_none", False),
            "records": [{"attributes": {"type": obj}, **r} for r in records],
        }
        return await self.call("PATCH", f"/composite/sobjects/{obj}/{field}", json=body, **kw)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def start(session: aiohttp.ClientSession, **options: Any) -> tuple[RunningEmulator, SF]:
    emulator = await RunningEmulator(make_app(**options)).start()
    client = SF(emulator, session)
    await client.login()
    return emulator, client


@pytest.fixture
async def sf(session: aiohttp.ClientSession) -> AsyncIterator[SF]:
    emulator, client = await start(session)
    try:
        yield client
    finally:
        await emulator.stop()


def opportunity(n: int, **extra: Any) -> Json:
    return {
        "Name": f"INV-{n}",
        "StageName": "Prospecting",
        "CloseDate": "2026-01-31",
        "ERP_Invoice_Key__c": f"I-{n}",
        **extra,
    }


def opportunity_body(n: int, **extra: Any) -> Json:
    """An Opportunity for a single-record upsert: the external id is in the URL only."""
    body = opportunity(n, **extra)
    del body["ERP_Invoice_Key__c"]
    return body


def usage(headers: dict[str, str]) -> tuple[int, int]:
    match = LIMIT_RE.match(headers["Sforce-Limit-Info"])
    assert match, headers
    return int(match.group(1)), int(match.group(2))


# --- OAuth ----------------------------------------------------------------------------------


async def test_client_credentials_grant_answers_like_salesforce(sf: SF) -> None:
    status, body = await sf.grant()
    assert status == 200
    assert set(body) == {
        "access_token", "signature", "scope", "instance_url", "id", "token_type", "issued_at",
    }  # fmt: skip
    assert "refresh_token" not in body and "expires_in" not in body
    assert body["instance_url"] == sf.url
    assert body["token_type"] == "Bearer"
    assert re.fullmatch(r"\d{13}", body["issued_at"])
    assert body["access_token"].startswith("00D")
    assert body["id"].startswith(f"{sf.url}/id/00D")
    basic = base64.b64encode(f"{DEFAULT_CLIENT_ID}:{DEFAULT_CLIENT_SECRET}".encode()).decode()
    async with sf.session.post(
        f"{sf.url}/services/oauth2/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": f"Basic {basic}"},
    ) as response:
        assert response.status == 200
        token = (await response.json())["access_token"]
    status, _, _ = await sf.call("GET", "/limits", token=token)
    assert status == 200


async def test_token_endpoint_errors(sf: SF) -> None:
    assert await sf.grant(client_secret="wrong") == (
        400,
        {"error": "invalid_client", "error_description": "invalid client credentials"},
    )
    assert await sf.grant(client_id="3MVGunknown") == (
        400,
        {"error": "invalid_client_id", "error_description": "client identifier invalid"},
    )
    assert await sf.grant(grant_type="password") == (
        400,
        {"error": "unsupported_grant_type", "error_description": "grant type not supported"},
    )
    assert (await sf.control("GET", "/stats"))["token_errors"] == 3


async def test_generic_login_host_refuses_client_credentials(sf: SF) -> None:
    async with sf.session.post(
        f"{sf.url}/services/oauth2/token",
        data={
            "grant_type": "client_credentials",
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET,
        },
        headers={"Host": "login.salesforce.com"},
    ) as response:
        assert response.status == 400
        assert (await response.json())["error"] == "invalid_grant"


# --- versions, describe ----------------------------------------------------------------------


async def test_versions_list_needs_no_session_and_costs_nothing(sf: SF) -> None:
    async with sf.session.get(f"{sf.url}/services/data/") as response:
        assert response.status == 200
        assert "Sforce-Limit-Info" not in response.headers
        versions = await response.json()
    by_version = {v["version"]: v for v in versions}
    assert by_version["66.0"] == {
        "label": "Spring '26",
        "url": "/services/data/v66.0",
        "version": "66.0",
    }
    assert by_version["62.0"]["label"] == "Winter '25"
    assert by_version["64.0"]["label"] == "Summer '25"
    assert "30.0" not in by_version and "67.0" not in by_version
    assert (await sf.control("GET", "/limits"))["used"] == 0
    status, body, _ = await sf.call("GET", "/limits", version="v20.0")
    assert status == 410
    status, body, _ = await sf.call("GET", "/limits", version="v66")
    assert status == 404
    status, body, _ = await sf.call("GET", "/limits", version="v99.0")
    assert (status, body[0]["errorCode"]) == (404, "NOT_FOUND")
    status, body, _ = await sf.call("GET", "/", version="latest")
    assert status == 200 and body["query"] == "/services/data/v66.0/query"


async def test_describe_account_and_opportunity(sf: SF) -> None:
    status, account, _ = await sf.call("GET", "/sobjects/Account/describe")
    assert status == 200
    assert account["name"] == "Account" and account["keyPrefix"] == "001"
    fields = {f["name"]: f for f in account["fields"]}
    ext = fields["ERP_Customer_Id__c"]
    assert (ext["externalId"], ext["unique"], ext["custom"], ext["idLookup"]) == (
        True, True, True, True,
    )  # fmt: skip
    assert (fields["Name"]["nillable"], fields["Name"]["createable"]) == (False, True)
    assert (fields["Id"]["createable"], fields["Id"]["updateable"]) == (False, False)
    assert fields["SystemModstamp"]["type"] == "datetime"
    for name in ("ERP_Credit_Limit__c", "ERP_Currency__c", "ERP_Balance__c"):
        assert name in fields
    status, opp, _ = await sf.call("GET", "/sobjects/Opportunity/describe")
    fields = {f["name"]: f for f in opp["fields"]}
    assert opp["keyPrefix"] == "006"
    for name in ("Name", "StageName", "CloseDate"):
        assert fields[name]["nillable"] is False and fields[name]["createable"] is True
    assert fields["IsClosed"]["createable"] is False
    assert fields["AccountId"]["relationshipName"] == "Account"
    assert fields["AccountId"]["referenceTo"] == ["Account"]
    stages = [v["value"] for v in fields["StageName"]["picklistValues"]]
    assert stages[0] == "Prospecting" and "Closed Won" in stages
    assert fields["StageName"]["restrictedPicklist"] is True
    assert fields["ERP_Invoice_Key__c"]["externalId"] is True
    for name in ("ERP_Payment_Status__c", "ERP_Days_Overdue__c", "ERP_Balance__c"):
        assert name in fields

    await sf.control("POST", "/stages", {"stages": ["Open", "Paid", "Overdue"]})
    await sf.control(
        "POST",
        "/fields",
        {"object": "Account", "fields": [{"name": "Region__c", "type": "string", "length": 20}]},
    )
    _, opp, _ = await sf.call("GET", "/sobjects/Opportunity/describe")
    stage = next(f for f in opp["fields"] if f["name"] == "StageName")
    assert [v["value"] for v in stage["picklistValues"]] == ["Open", "Paid", "Overdue"]
    _, account, _ = await sf.call("GET", "/sobjects/Account/describe")
    assert any(f["name"] == "Region__c" and f["custom"] for f in account["fields"])
    _, listing, _ = await sf.call("GET", "/sobjects")
    assert {s["name"] for s in listing["sobjects"]} == {"Account", "Opportunity", "User"}


async def test_custom_object_can_be_enabled(session: aiohttp.ClientSession) -> None:
    emulator, sf = await start(session, custom_object=True)
    try:
        await sf.seed("Account", [{"Name": "Acme", "ERP_Customer_Id__c": "C1"}])
        status, body, _ = await sf.upsert_collection(
            "ERP_Invoice__c",
            "ERP_Invoice_Key__c",
            [
                {
                    "Name": "INV-1",
                    "ERP_Invoice_Key__c": "I1",
                    "Account__r": {"ERP_Customer_Id__c": "C1"},
                }
            ],
        )
        assert status == 200 and body[0]["success"] is True, body
        assert body[0]["id"].startswith("a0E")
        _, rows, _ = await sf.query("SELECT Name, Account__r.Name FROM ERP_Invoice__c")
        assert rows["records"][0]["Account__r"]["Name"] == "Acme"
    finally:
        await emulator.stop()


# --- SOQL ------------------------------------------------------------------------------------


async def test_query_pages_with_next_records_url_to_the_end(sf: SF) -> None:
    await sf.control("POST", "/seed", {"object": "Account", "count": 450})
    status, page, _ = await sf.query(
        "SELECT Id, Name FROM Account ORDER BY Name",
        headers={"Sforce-Query-Options": "batchSize=200"},
    )
    assert status == 200
    assert (page["totalSize"], page["done"], len(page["records"])) == (450, False, 200)
    assert re.fullmatch(
        r"/services/data/v66\.0/query/01g[0-9A-Za-z]{15}-200", page["nextRecordsUrl"]
    )
    ids = [r["Id"] for r in page["records"]]
    sizes = [len(page["records"])]
    while not page["done"]:
        status, page, _ = await sf.call("GET", page["nextRecordsUrl"])
        assert status == 200 and page["totalSize"] == 450
        ids += [r["Id"] for r in page["records"]]
        sizes.append(len(page["records"]))
    assert sizes == [200, 200, 50]
    assert "nextRecordsUrl" not in page
    assert len(set(ids)) == 450
    status, body, _ = await sf.call("GET", "/query/01gNOSUCHLOCATOR00-200")
    assert (status, body[0]["errorCode"]) == (400, "INVALID_QUERY_LOCATOR")


async def test_query_default_batch_is_2000(sf: SF) -> None:
    await sf.control("POST", "/seed", {"object": "Account", "count": 2100})
    _, page, _ = await sf.query("SELECT Id FROM Account")
    assert (len(page["records"]), page["done"]) == (2000, False)
    assert page["nextRecordsUrl"].endswith("-2000")
    _, rest, _ = await sf.call("GET", page["nextRecordsUrl"])
    assert (len(rest["records"]), rest["done"]) == (100, True)
    _, small, _ = await sf.query(
        "SELECT Id FROM Account", headers={"Sforce-Query-Options": "batchSize=50"}
    )
    assert len(small["records"]) == 200  # batchSize is at least 200


async def test_soql_filters_order_limit_offset_and_relationships(sf: SF) -> None:
    await sf.seed(
        "Account",
        [
            {"Name": "Acme & Co", "ERP_Customer_Id__c": "C1", "ERP_Credit_Limit__c": 5000,
             "ERP_On_Hold__c": True},
            {"Name": "O'Brien 100%", "ERP_Customer_Id__c": "C2", "ERP_Credit_Limit__c": 100},
            {"Name": "Zeta", "ERP_Customer_Id__c": "C3", "SystemModstamp": "2024-01-01T00:00:00Z"},
            {"Name": "beta", "ERP_Customer_Id__c": "C+4"},
        ],
    )  # fmt: skip
    await sf.seed(
        "Opportunity",
        [
            opportunity(1, Account={"ERP_Customer_Id__c": "C1"}, Amount=10, CloseDate="2024-03-01"),
            opportunity(2, Account={"ERP_Customer_Id__c": "C2"}, Amount=20),
            opportunity(3, Amount=30),
        ],
    )

    async def names(soql: str) -> list[str]:
        status, body, _ = await sf.query(soql)
        assert status == 200, body
        return [r.get("Name") for r in body["records"]]

    assert await names("SELECT Name FROM Account WHERE Name = 'Acme & Co'") == ["Acme & Co"]
    assert await names("SELECT Name FROM Account WHERE Name = 'O\\'Brien 100%'") == ["O'Brien 100%"]
    assert await names("select name from account where name like 'ACME%'") == ["Acme & Co"]
    assert await names("SELECT Name FROM Account WHERE ERP_Customer_Id__c = 'C+4'") == ["beta"]
    assert await names(
        "SELECT Name FROM Account WHERE ERP_Customer_Id__c IN ('C1', 'C3') ORDER BY Name DESC"
    ) == ["Zeta", "Acme & Co"]
    assert await names(
        "SELECT Name FROM Account WHERE ERP_Credit_Limit__c >= 100 AND ERP_Credit_Limit__c < 5000"
    ) == ["O'Brien 100%"]
    assert await names(
        "SELECT Name FROM Account WHERE ERP_Credit_Limit__c = null ORDER BY Name"
    ) == ["beta", "Zeta"]
    assert await names(
        "SELECT Name FROM Account WHERE (Name = 'Zeta' OR ERP_On_Hold__c = true) "
        "AND NOT Name LIKE 'Z%'"
    ) == ["Acme & Co"]
    assert await names(
        "SELECT Name FROM Account WHERE ERP_Customer_Id__c NOT IN ('C1','C2') ORDER BY Name"
    ) == ["beta", "Zeta"]
    assert await names("SELECT Name FROM Account WHERE SystemModstamp < 2025-01-01T00:00:00Z") == [
        "Zeta"
    ]
    assert await names(
        "SELECT Name FROM Account WHERE SystemModstamp > 2024-01-01T01:00:00+02:00 "
        "AND SystemModstamp <= 2024-01-01T00:00:00.000Z"
    ) == ["Zeta"]
    assert await names("SELECT Name FROM Opportunity WHERE CloseDate < 2025-01-01") == ["INV-1"]
    assert await names(
        "SELECT Name FROM Account ORDER BY ERP_Credit_Limit__c DESC NULLS LAST, Name LIMIT 2 "
        "OFFSET 1"
    ) == ["O'Brien 100%", "beta"]
    _, body, _ = await sf.query(
        "SELECT Name, Account.Name, Account.ERP_Customer_Id__c FROM Opportunity "
        "WHERE Account.ERP_Customer_Id__c = 'c1' OR Amount = 30 ORDER BY Name"
    )
    assert [r["Name"] for r in body["records"]] == ["INV-1", "INV-3"]
    first, third = body["records"]
    assert first["Account"]["Name"] == "Acme & Co"
    assert first["Account"]["attributes"]["type"] == "Account"
    assert first["attributes"]["url"].startswith("/services/data/v66.0/sobjects/Opportunity/006")
    assert third["Account"] is None
    _, body, _ = await sf.query("SELECT Name, Owner.Name, Owner.IsActive FROM Account LIMIT 1")
    assert body["records"][0]["Owner"]["Name"] == "Integration User"
    assert body["records"][0]["Owner"]["attributes"]["type"] == "User"
    _, body, _ = await sf.query("SELECT COUNT() FROM Opportunity WHERE Amount > 15")
    assert (body["totalSize"], body["done"], body["records"]) == (2, True, [])


@pytest.mark.parametrize(
    ("soql", "code"),
    [
        ("SELECT Foo FROM Account", "INVALID_FIELD"),
        ("SELECT Id FROM Account WHERE Foo__c = 'x'", "INVALID_FIELD"),
        ("SELECT Owner2.Name FROM Account", "INVALID_FIELD"),
        ("SELECT Id FRM Account", "MALFORMED_QUERY"),
        ("SELECT Id FROM Account WHERE", "MALFORMED_QUERY"),
        ("SELECT Id FROM Account WHERE Name = 'a' AND Name = 'b' OR Name = 'c'", "MALFORMED_QUERY"),
        ('SELECT Id FROM Account WHERE Name = "x"', "MALFORMED_QUERY"),
        ("SELECT Id FROM Opportunity WHERE CloseDate > '2024-01-01'", "MALFORMED_QUERY"),
        ("SELECT Id FROM Account WHERE SystemModstamp > 2024-01-01", "MALFORMED_QUERY"),
        ("SELECT Id FROM Account WHERE Name = 5", "MALFORMED_QUERY"),
        ("SELECT Id FROM Widget__c", "INVALID_TYPE"),
        ("SELECT Id FROM Account OFFSET 2001", "NUMBER_OUTSIDE_VALID_RANGE"),
    ],
)
async def test_soql_errors(sf: SF, soql: str, code: str) -> None:
    status, body, headers = await sf.query(soql)
    assert status == 400
    assert body[0]["errorCode"] == code, body
    assert "Sforce-Limit-Info" in headers


async def test_query_without_q_is_malformed(sf: SF) -> None:
    status, body, _ = await sf.call("GET", "/query")
    assert (status, body[0]["errorCode"]) == (400, "MALFORMED_QUERY")


# --- single-record upsert ----------------------------------------------------------------------


async def test_upsert_by_external_id_201_200_300(sf: SF) -> None:
    path = "/sobjects/Account/ERP_Customer_Id__c/C-1"
    status, body, _ = await sf.call("PATCH", path, json={"Name": "Acme"})
    assert status == 201
    assert body["success"] is True and body["errors"] == [] and body["created"] is True
    rid = body["id"]
    assert ID_RE.match(rid) and rid.startswith("001") and id18(rid[:15]) == rid
    status, body, _ = await sf.call(
        "PATCH", "/sobjects/Account/erp_customer_id__c/c-1", json={"name": "Acme Ltd"}
    )
    assert (status, body) == (200, {"id": rid, "success": True, "errors": [], "created": False})
    status, body, _ = await sf.call("PATCH", path, json={"Name": "Acme"}, version="v45.0")
    assert (status, body) == (204, None)
    status, record, _ = await sf.call("GET", f"/sobjects/Account/{rid}")
    assert record["Name"] == "Acme" and record["ERP_Customer_Id__c"] == "C-1"
    assert record["CreatedDate"].endswith(".000+0000")
    assert record["OwnerId"].startswith("005") and record["IsDeleted"] is False

    other = await sf.seed(
        "Account", [{"Name": "Acme twin", "ERP_Customer_Id__c": "C-1"}], allow_duplicates=True
    )
    dupes = await sf.control("GET", "/duplicates")
    assert dupes["total"] == 1 and dupes["duplicates"]["Account"]["ERP_Customer_Id__c"] == 1
    status, body, _ = await sf.call("PATCH", path, json={"Name": "Which?"})
    assert status == 300
    assert sorted(body) == sorted(
        f"/services/data/v66.0/sobjects/Account/{i}" for i in [rid, *other]
    )
    _, rows, _ = await sf.query("SELECT Name FROM Account ORDER BY Name")
    assert [r["Name"] for r in rows["records"]] == ["Acme", "Acme twin"]


async def test_upsert_external_id_in_the_path_is_url_decoded(sf: SF) -> None:
    value = "A/B 1+2 é%"
    status, body, _ = await sf.call(
        "PATCH", f"/sobjects/Account/ERP_Customer_Id__c/{quote(value, safe='')}", json={"Name": "X"}
    )
    assert status == 201, body
    _, rows, _ = await sf.query("SELECT ERP_Customer_Id__c FROM Account WHERE Name = 'X'")
    assert rows["records"][0]["ERP_Customer_Id__c"] == value
    status, body, _ = await sf.call(
        "GET", f"/sobjects/Account/ERP_Customer_Id__c/{quote(value, safe='')}"
    )
    assert status == 200 and body["Name"] == "X"
    status, _, _ = await sf.call(
        "PATCH", "/sobjects/Account/ERP_Customer_Id__c/A%2FB%201%2B2%20%C3%A9%25", json={}
    )
    assert status == 200


async def test_upsert_refusals(sf: SF) -> None:
    status, body, _ = await sf.call("PATCH", "/sobjects/Account/Name/Acme", json={"Name": "x"})
    assert (status, body[0]["errorCode"]) == (404, "NOT_FOUND")
    assert "Name" in body[0]["message"]
    status, body, _ = await sf.call("PATCH", "/sobjects/Account/Nope__c/1", json={"Name": "x"})
    assert (status, body[0]["errorCode"]) == (404, "NOT_FOUND")
    status, body, _ = await sf.call("PATCH", "/sobjects/Widget/Id/1", json={})
    assert (status, body) == (
        404,
        [{"message": "The requested resource does not exist", "errorCode": "NOT_FOUND"}],
    )
    status, body, _ = await sf.call("POST", "/sobjects/User", json={"Username": "x"})
    assert (status, body[0]["errorCode"]) == (403, "INSUFFICIENT_ACCESS")
    path = "/sobjects/Account/ERP_Customer_Id__c/C-9"
    status, body, _ = await sf.call("PATCH", path, json={"Name": "x", "Foo": 1})
    assert (status, body[0]["errorCode"]) == (400, "INVALID_FIELD")
    assert body[0]["message"] == "No such column 'Foo' on sobject of type Account"
    status, body, _ = await sf.call(
        "PATCH", path, json={"Name": "x", "ERP_Credit_Limit__c": "lots"}
    )
    assert (status, body[0]["errorCode"]) == (400, "JSON_PARSER_ERROR")
    status, body, _ = await sf.call("PATCH", path, json={"Name": "x", "ERP_Customer_Id__c": "C-9"})
    assert (status, body[0]["errorCode"]) == (400, "INVALID_FIELD")
    status, body, _ = await sf.call("PATCH", path, json={"Name": "x", "CreatedDate": "2020-01-01"})
    assert (status, body[0]["errorCode"]) == (400, "INVALID_FIELD_FOR_INSERT_UPDATE")
    status, body, _ = await sf.call("PATCH", path, json={"Name": "x" * 256})
    assert (status, body[0]["errorCode"]) == (400, "STRING_TOO_LONG")
    status, body, _ = await sf.call("PATCH", path + "?updateOnly=true", json={"Name": "x"})
    assert status == 404
    assert (await sf.control("GET", "/counts"))["records"]["Account"] == 0


async def test_required_fields_and_restricted_stage(sf: SF) -> None:
    path = "/sobjects/Opportunity/ERP_Invoice_Key__c/I-1"
    status, body, _ = await sf.call(
        "PATCH", path, json={"Name": "INV-1", "StageName": "Prospecting"}
    )
    assert status == 400
    assert body == [
        {
            "message": "Required fields are missing: [CloseDate]",
            "errorCode": "REQUIRED_FIELD_MISSING",
            "fields": ["CloseDate"],
        }
    ]
    status, body, _ = await sf.call(
        "PATCH", path, json={"Name": "INV-1", "StageName": "Paid", "CloseDate": "2026-01-31"}
    )
    assert (status, body[0]["errorCode"], body[0]["fields"]) == (
        400, "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST", ["StageName"],
    )  # fmt: skip
    await sf.control("POST", "/config", {"stage_picklist_restricted": False})
    status, body, _ = await sf.call(
        "PATCH", path, json={"Name": "INV-1", "StageName": "Paid", "CloseDate": "2026-01-31"}
    )
    assert status == 201, body
    status, body, _ = await sf.call(
        "PATCH", path, json={"StageName": "Closed Won", "CloseDate": None}
    )
    assert (status, body[0]["errorCode"]) == (400, "REQUIRED_FIELD_MISSING")
    status, body, _ = await sf.call("PATCH", path, json={"StageName": "Closed Won"})
    assert status == 200
    _, rows, _ = await sf.query("SELECT IsClosed, IsWon, Probability FROM Opportunity")
    assert rows["records"][0] | {"attributes": None} == {
        "attributes": None, "IsClosed": True, "IsWon": True, "Probability": 100.0,
    }  # fmt: skip


async def test_opportunity_names_its_account_by_external_id(sf: SF) -> None:
    [account_id] = await sf.seed("Account", [{"Name": "Acme", "ERP_Customer_Id__c": "C1"}])
    status, body, _ = await sf.call(
        "PATCH",
        "/sobjects/Opportunity/ERP_Invoice_Key__c/I-1",
        json={"Name": "INV-1", "StageName": "Prospecting", "CloseDate": "2026-01-31",
              "Account": {"ERP_Customer_Id__c": "C1"}},
    )  # fmt: skip
    assert status == 201, body
    _, record, _ = await sf.call("GET", f"/sobjects/Opportunity/{body['id']}")
    assert record["AccountId"] == account_id
    status, body, _ = await sf.call(
        "PATCH",
        "/sobjects/Opportunity/ERP_Invoice_Key__c/I-2",
        json={**opportunity_body(2), "Account": {"ERP_Customer_Id__c": "C404"}},
    )
    assert status == 400
    assert body[0]["errorCode"] == "INVALID_FIELD"
    assert body[0]["message"] == (
        "Foreign key external ID: C404 not found for field ERP_Customer_Id__c in entity Account"
    )
    status, body, _ = await sf.call(
        "PATCH",
        "/sobjects/Opportunity/ERP_Invoice_Key__c/I-3",
        json={**opportunity_body(3), "Account": {"Name": "Acme"}},
    )
    assert (status, body[0]["errorCode"]) == (400, "INVALID_FIELD")
    status, body, _ = await sf.call(
        "PATCH",
        "/sobjects/Opportunity/ERP_Invoice_Key__c/I-4",
        json={**opportunity_body(4), "AccountId": "001notanid"},
    )
    assert (status, body[0]["errorCode"]) == (400, "MALFORMED_ID")


# --- sObject Collections -------------------------------------------------------------------------


async def test_collections_upsert_mixed_results_in_input_order(sf: SF) -> None:
    await sf.seed("Account", [{"Name": "Acme", "ERP_Customer_Id__c": "C1"}])
    await sf.seed("Opportunity", [opportunity(1)])
    status, results, headers = await sf.upsert_collection(
        "Opportunity",
        "ERP_Invoice_Key__c",
        [
            opportunity(1, Amount=11),  # update
            opportunity(2, Account={"ERP_Customer_Id__c": "C1"}),  # create
            {"Name": "INV-3", "ERP_Invoice_Key__c": "I-3"},  # stage and close date missing
            opportunity(4, StageName="Paid"),
            opportunity(5, Account={"ERP_Customer_Id__c": "nope"}),
            opportunity(6, ERP_Invoice_Key__c="I-dup"),
            opportunity(7, ERP_Invoice_Key__c="i-DUP"),
            opportunity(8, ERP_Invoice_Key__c=None),
        ],
    )
    assert status == 200
    assert "Sforce-Limit-Info" in headers
    assert [r["success"] for r in results] == [True, True] + [False] * 6
    assert (results[0]["created"], results[1]["created"]) == (False, True)
    assert all(ID_RE.match(r["id"]) and r["id"].startswith("006") for r in results[:2])
    codes = [r["errors"][0]["statusCode"] for r in results[2:]]
    assert codes == [
        "REQUIRED_FIELD_MISSING",
        "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
        "INVALID_FIELD",
        "DUPLICATE_VALUE",
        "DUPLICATE_VALUE",
        "MISSING_ARGUMENT",
    ]
    assert results[2]["errors"][0]["fields"] == ["StageName", "CloseDate"]
    assert all("id" not in r for r in results[2:])
    assert set(results[2]["errors"][0]) == {"statusCode", "message", "fields"}
    counts = await sf.control("GET", "/counts")
    assert counts["records"]["Opportunity"] == 2
    assert counts["write_calls"] == {
        "PATCH /services/data/{version}/composite/sobjects/Opportunity/ERP_Invoice_Key__c": 1
    }
    _, rows, _ = await sf.query("SELECT Amount, Account.Name FROM Opportunity ORDER BY Name")
    assert rows["records"][0]["Amount"] == 11.0
    assert rows["records"][1]["Account"]["Name"] == "Acme"


async def test_collections_cap_is_200_records(sf: SF) -> None:
    records = [{"Name": f"A{i}", "ERP_Customer_Id__c": f"C{i}"} for i in range(201)]
    status, body, _ = await sf.upsert_collection("Account", "ERP_Customer_Id__c", records)
    assert status == 400 and body[0]["errorCode"] == "EXCEEDED_ID_LIMIT"
    assert (await sf.control("GET", "/counts"))["records"]["Account"] == 0
    status, body, _ = await sf.upsert_collection("Account", "ERP_Customer_Id__c", records[:200])
    assert status == 200 and all(r["success"] and r["created"] for r in body)


async def test_collections_request_level_errors(sf: SF) -> None:
    path = "/composite/sobjects/Account/ERP_Customer_Id__c"
    status, body, _ = await sf.call(
        "PATCH", path, json={"records": [{"Name": "A", "ERP_Customer_Id__c": "C1"}]}
    )
    assert (status, body[0]["errorCode"]) == (400, "INVALID_TYPE")
    status, body, _ = await sf.upsert_collection(
        "Account", "ERP_Customer_Id__c", [{"Name": "A", "ERP_Customer_Id__c": "C1", "Bad": 1}]
    )
    assert (status, body[0]["errorCode"]) == (400, "INVALID_FIELD")
    status, body, _ = await sf.upsert_collection("Account", "Name", [{"Name": "A"}])
    assert (status, body[0]["errorCode"]) == (404, "NOT_FOUND")
    status, body, _ = await sf.call("POST", path, json={"records": []})
    assert (status, body[0]["errorCode"]) == (405, "METHOD_NOT_ALLOWED")


async def test_collections_all_or_none_rolls_back(sf: SF) -> None:
    await sf.seed("Account", [{"Name": "Old", "ERP_Customer_Id__c": "C1"}])
    status, body, _ = await sf.upsert_collection(
        "Account",
        "ERP_Customer_Id__c",
        [
            {"Name": "New", "ERP_Customer_Id__c": "C1"},
            {"Name": "Fresh", "ERP_Customer_Id__c": "C2"},
            {"ERP_Customer_Id__c": "C3"},
        ],
        all_or_none=True,
    )
    assert status == 200
    codes = [r["errors"][0]["statusCode"] for r in body]
    assert codes == [
        "ALL_OR_NONE_OPERATION_ROLLED_BACK",
        "ALL_OR_NONE_OPERATION_ROLLED_BACK",
        "REQUIRED_FIELD_MISSING",
    ]
    _, rows, _ = await sf.query("SELECT Name FROM Account")
    assert [r["Name"] for r in rows["records"]] == ["Old"]


async def test_unable_to_lock_row_fault(sf: SF) -> None:
    await sf.control("POST", "/faults", {"lock_next": 1})
    status, body, _ = await sf.upsert_collection(
        "Account",
        "ERP_Customer_Id__c",
        [{"Name": f"A{i}", "ERP_Customer_Id__c": f"C{i}"} for i in range(3)],
    )
    assert status == 200
    assert [r["success"] for r in body] == [False, True, True]
    assert body[0]["errors"][0]["statusCode"] == "UNABLE_TO_LOCK_ROW"
    await sf.control("POST", "/faults", {"lock_rate": 1.0})
    status, body, _ = await sf.call(
        "PATCH", "/sobjects/Account/ERP_Customer_Id__c/C1", json={"Name": "again"}
    )
    assert (status, body[0]["errorCode"]) == (400, "UNABLE_TO_LOCK_ROW")
    assert "unable to obtain exclusive access to this record" in body[0]["message"]
    stats = await sf.control("GET", "/stats")
    assert stats["lock_failures"] == 2 and stats["record_errors"]["UNABLE_TO_LOCK_ROW"] == 2


async def test_duplicate_rules_detect_duplicates(sf: SF) -> None:
    await sf.seed("Account", [{"Name": "Acme", "ERP_Customer_Id__c": "C1"}])
    await sf.control(
        "POST", "/duplicate_rules", {"object": "Account", "fields": ["Name"], "action": "alert"}
    )
    path = "/sobjects/Account/ERP_Customer_Id__c/C2"
    status, body, _ = await sf.call("PATCH", path, json={"Name": "ACME"})
    assert (status, body[0]["errorCode"]) == (400, "DUPLICATES_DETECTED")
    assert body[0]["duplicateResult"]["matchResults"][0]["size"] == 1
    allow = {"Sforce-Duplicate-Rule-Header": "allowSave=true; includeRecordDetails=true"}
    status, body, _ = await sf.call("PATCH", path, json={"Name": "ACME"}, headers=allow)
    assert status == 201
    await sf.control("DELETE", "/duplicate_rules")
    await sf.control(
        "POST", "/duplicate_rules", {"object": "Account", "fields": ["Name"], "action": "block"}
    )
    status, body, _ = await sf.upsert_collection(
        "Account", "ERP_Customer_Id__c", [{"Name": "acme", "ERP_Customer_Id__c": "C3"}],
        headers=allow,
    )  # fmt: skip
    assert body[0]["errors"][0]["statusCode"] == "DUPLICATES_DETECTED"


async def test_unique_field_clash_is_duplicate_value(sf: SF) -> None:
    [first, second] = await sf.seed(
        "Account",
        [{"Name": "A", "ERP_Customer_Id__c": "C1"}, {"Name": "B", "ERP_Customer_Id__c": "C2"}],
    )
    status, body, _ = await sf.call(
        "PATCH", f"/sobjects/Account/{second}", json={"ERP_Customer_Id__c": "c1"}
    )
    assert (status, body[0]["errorCode"]) == (400, "DUPLICATE_VALUE")
    assert first in body[0]["message"]
    status, _, _ = await sf.call(
        "PATCH", f"/sobjects/Account/{second}", json={"ERP_Customer_Id__c": "C3"}
    )
    assert status == 204
    assert (await sf.control("GET", "/duplicates"))["total"] == 0


# --- session, limits, faults ---------------------------------------------------------------------


INVALID_SESSION = [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]


async def test_session_expires_and_a_new_grant_works(sf: SF) -> None:
    assert (await sf.call("GET", "/limits"))[0] == 200
    assert (await sf.control("POST", "/expire_sessions"))["expired"] == 1
    status, body, headers = await sf.call("GET", "/limits")
    assert (status, body) == (401, INVALID_SESSION)
    assert "Sforce-Limit-Info" not in headers
    status, body, _ = await sf.call("GET", "/limits", token="00Dbogus!token")
    assert (status, body) == (401, INVALID_SESSION)
    status, body, _ = await sf.call("GET", "/limits", headers={"Authorization": ""})
    assert (status, body) == (401, INVALID_SESSION)
    await sf.login()
    assert (await sf.call("GET", "/limits"))[0] == 200


async def test_session_times_out_after_inactivity(session: aiohttp.ClientSession) -> None:
    emulator, sf = await start(session, session_timeout_s=100)
    try:
        await sf.control("POST", "/advance", {"seconds": 90})
        assert (await sf.call("GET", "/limits"))[0] == 200  # activity renews the session
        await sf.control("POST", "/advance", {"seconds": 90})
        assert (await sf.call("GET", "/limits"))[0] == 200
        await sf.control("POST", "/advance", {"seconds": 101})
        assert (await sf.call("GET", "/limits"))[:2] == (401, INVALID_SESSION)
    finally:
        await emulator.stop()


async def test_daily_limit_and_limit_header(sf: SF) -> None:
    _, body, headers = await sf.call("GET", "/limits")
    assert usage(headers) == (1, 15000)
    assert body["DailyApiRequests"] == {"Max": 15000, "Remaining": 14999}
    _, _, headers = await sf.query("SELECT Foo FROM Account")  # errors carry it too
    assert usage(headers) == (2, 15000)
    _, _, headers = await sf.call("GET", "/sobjects/Nope/describe")
    assert usage(headers) == (3, 15000)
    await sf.control("POST", "/limits", {"used": 99, "max": 100})
    status, _, headers = await sf.call("GET", "/sobjects")
    assert status == 200 and headers["Sforce-Limit-Info"] == "api-usage=100/100"
    status, body, headers = await sf.call("PATCH", "/sobjects/Account/ERP_Customer_Id__c/C1",
                                          json={"Name": "A"})  # fmt: skip
    assert (status, body) == (
        403,
        [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}],
    )
    assert headers["Sforce-Limit-Info"] == "api-usage=100/100"
    assert (await sf.control("GET", "/counts"))["records"]["Account"] == 0
    async with sf.session.get(f"{sf.url}/services/data/") as response:
        assert response.status == 200
    await sf.control("POST", "/config", {"api_requests_max": 200})
    assert (await sf.call("GET", "/limits"))[1]["DailyApiRequests"] == {"Max": 200, "Remaining": 99}


async def test_allocation_is_a_rolling_24_hour_window(session: aiohttp.ClientSession) -> None:
    emulator, sf = await start(session, api_requests_max=2)
    try:
        assert (await sf.call("GET", "/limits"))[0] == 200
        assert (await sf.call("GET", "/limits"))[0] == 200
        assert (await sf.call("GET", "/limits"))[0] == 403
        await sf.control("POST", "/advance", {"seconds": 24 * 3600 + 1})
        await sf.login()
        status, _, headers = await sf.call("GET", "/limits")
        assert status == 200 and usage(headers) == (1, 2)
    finally:
        await emulator.stop()


async def test_injected_faults_have_salesforce_shapes(sf: SF) -> None:
    await sf.control("POST", "/faults", {"fail_next": 1})
    status, body, headers = await sf.call("GET", "/limits")
    assert (status, body[0]["errorCode"]) == (500, "UNKNOWN_EXCEPTION")
    assert "Sforce-Limit-Info" in headers
    await sf.control("POST", "/faults", {"throttle_next": 1})
    status, body, _ = await sf.call("GET", "/limits")
    assert (status, body[0]["errorCode"]) == (403, "REQUEST_LIMIT_EXCEEDED")
    await sf.control("POST", "/config", {"fault_error_status": 503})
    await sf.control("POST", "/faults", {"fail_next": 1, "path_prefix": "/services/data"})
    status, body, _ = await sf.call("GET", "/limits")
    assert (status, body[0]["errorCode"]) == (503, "SERVER_UNAVAILABLE")
    assert (await sf.call("GET", "/limits"))[0] == 200


# --- control API, records ----------------------------------------------------------------------


async def test_records_ids_and_system_fields(sf: SF) -> None:
    status, body, _ = await sf.call(
        "POST", "/sobjects/Account", json={"name": "Acme", "erp_customer_id__c": "C1"}
    )
    assert status == 201 and body["success"] is True
    rid = body["id"]
    record = await sf.control("GET", f"/records/Account/{rid}")
    assert record["Name"] == "Acme" and record["ERP_Customer_Id__c"] == "C1"
    for name in ("CreatedDate", "LastModifiedDate", "SystemModstamp"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.000\+0000", record[name])
    assert record["attributes"] == {
        "type": "Account",
        "url": f"/services/data/v66.0/sobjects/Account/{rid}",
    }
    await sf.control("POST", "/advance", {"seconds": 5})
    assert (await sf.call("PATCH", f"/sobjects/Account/{rid[:15]}", json={"Phone": "1"}))[0] == 204
    after = await sf.control("GET", f"/records/Account/{rid}")
    assert after["SystemModstamp"] > record["SystemModstamp"]
    assert after["CreatedDate"] == record["CreatedDate"]
    status, body, _ = await sf.call("GET", "/sobjects/Account/NotAnId")
    assert (status, body[0]["errorCode"]) == (404, "NOT_FOUND")
    status, body, _ = await sf.call("GET", f"/sobjects/Account/{rid}", params={"fields": "Name"})
    assert set(body) == {"attributes", "Name"}
    listing = await sf.control("GET", "/records/Account")
    assert listing["count"] == 1 and listing["records"][0]["Id"] == rid


async def test_counts_stats_and_reset(sf: SF) -> None:
    await sf.call("PATCH", "/sobjects/Account/ERP_Customer_Id__c/C1", json={"Name": "A"})
    await sf.call("PATCH", "/sobjects/Account/ERP_Customer_Id__c/C2", json={"Name": "B"})
    await sf.upsert_collection(
        "Account", "ERP_Customer_Id__c", [{"Name": "C", "ERP_Customer_Id__c": "C3"}]
    )
    counts = await sf.control("GET", "/counts")
    assert counts["records"] == {"Account": 3, "Opportunity": 0}
    assert counts["write_calls"] == {
        "PATCH /services/data/{version}/sobjects/Account/ERP_Customer_Id__c/{value}": 2,
        "PATCH /services/data/{version}/composite/sobjects/Account/ERP_Customer_Id__c": 1,
    }
    stats = await sf.control("GET", "/stats")
    assert (
        stats["calls"]["PATCH /services/data/{version}/sobjects/Account/ERP_Customer_Id__c/{value}"]
        == 2
    )
    assert stats["duplicate_total"] == 0 and stats["records_created"] == 3
    await sf.control("POST", "/reset")
    counts = await sf.control("GET", "/counts")
    assert counts["records"]["Account"] == 0 and counts["write_calls_total"] == 0
    assert (await sf.call("GET", "/limits"))[0] == 200  # sessions survive a reset


async def test_q_is_url_decoded_and_a_raw_plus_is_a_space(sf: SF) -> None:
    await sf.seed("Account", [{"Name": "A&B", "ERP_Customer_Id__c": "C1"}])
    headers = {"Authorization": f"Bearer {sf.token}"}
    query = "SELECT+Id,Name+FROM+Account+WHERE+Name+%3D+%27A%26B%27"
    async with sf.session.get(
        f"{sf.url}/services/data/v66.0/query/?q={query}", headers=headers
    ) as response:
        assert response.status == 200
        assert [r["Name"] for r in (await response.json())["records"]] == ["A&B"]
    unencoded_offset = "SELECT+Id+FROM+Account+WHERE+SystemModstamp+>+2024-01-01T00:00:00+02:00"
    async with sf.session.get(
        f"{sf.url}/services/data/v66.0/query?q={unencoded_offset}", headers=headers
    ) as response:
        assert response.status == 400
        assert (await response.json())[0]["errorCode"] == "MALFORMED_QUERY"


async def test_an_eleventh_cursor_releases_the_oldest(sf: SF) -> None:
    await sf.control("POST", "/seed", {"object": "Account", "count": 201})
    urls = []
    for _ in range(11):
        _, page, _ = await sf.query(
            "SELECT Id FROM Account", headers={"Sforce-Query-Options": "batchSize=200"}
        )
        urls.append(page["nextRecordsUrl"])
    status, body, _ = await sf.call("GET", urls[0])
    assert (status, body[0]["errorCode"]) == (400, "INVALID_QUERY_LOCATOR")
    status, body, _ = await sf.call("GET", urls[1])
    assert status == 200 and len(body["records"]) == 1 and body["done"] is True


async def test_collections_upsert_on_a_value_held_twice_fails_that_record(sf: SF) -> None:
    await sf.seed(
        "Account",
        [{"Name": "A", "ERP_Customer_Id__c": "C1"}, {"Name": "A2", "ERP_Customer_Id__c": "C1"}],
        allow_duplicates=True,
    )
    status, body, _ = await sf.upsert_collection(
        "Account",
        "ERP_Customer_Id__c",
        [{"Name": "B", "ERP_Customer_Id__c": "C1"}, {"Name": "C", "ERP_Customer_Id__c": "C2"}],
    )
    assert status == 200
    assert body[0]["errors"][0]["statusCode"] == "DUPLICATE_EXTERNAL_ID"
    assert body[1]["success"] is True
    assert (await sf.control("GET", "/stats"))["duplicate_total"] == 1


async def test_control_refuses_bad_input_in_one_line(sf: SF) -> None:
    async with sf.session.post(
        f"{sf.url}/_control/fields",
        json={"object": "Account", "fields": [{"name": "Region", "type": "string"}]},
    ) as response:
        assert response.status == 400
        assert "__c" in (await response.json())["error"]
    async with sf.session.post(
        f"{sf.url}/_control/seed", json={"object": "Account", "records": [{"Name": "x", "Foo": 1}]}
    ) as response:
        assert response.status == 400
        assert "INVALID_FIELD" in (await response.json())["error"]
    async with sf.session.post(f"{sf.url}/_control/config", json={"clock": 1}) as response:
        assert response.status == 400
