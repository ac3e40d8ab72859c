"""The SYSPRO 8 emulator behaves like e.net REST and the SYSPRO OData service on the wire."""

from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import aiohttp
import pytest
from yarl import URL

from emulators.kit import RunningEmulator
from emulators.syspro import create_app

TODAY = date(2024, 6, 30)
REST = "/SYSPROWCFService/Rest"
ODATA = "/SYSPRO8Odata/SYSPROOData"
AUTH = {"Authorization": "Basic " + base64.b64encode(b"ADMIN:syspro").decode()}
PAGE = 40  # max_rows_per_request in these tests


@dataclass
class Emu:
    url: str
    http: aiohttp.ClientSession

    async def rest(self, op: str, **params: str) -> aiohttp.ClientResponse:
        response = await self.http.get(self.url + REST + "/" + op, params=params)
        await response.read()
        return response

    async def logon(self, operator: str = "ADMIN", password: str = "syspro") -> str:
        response = await self.rest(
            "Logon",
            Operator=operator,
            OperatorPassword=password,
            CompanyId="EDU1",
            CompanyPassword="",
        )
        return await response.text()

    async def odata(
        self, path: str, params: dict[str, str] | None = None, **kw: Any
    ) -> aiohttp.ClientResponse:
        headers = kw.pop("headers", AUTH)
        response = await self.http.get(self.url + ODATA + path, params=params, headers=headers)
        await response.read()
        return response

    async def odata_all(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """Follows @odata.nextLink to the end; checks every page respects the row cap."""
        response = await self.odata(path, params)
        assert response.status == 200, await response.text()
        body = await response.json()
        rows = list(body["value"])
        while "@odata.nextLink" in body:
            assert len(body["value"]) == PAGE
            link = body["@odata.nextLink"]
            assert link.startswith(self.url + ODATA + path + "?")
            response = await self.http.get(URL(link, encoded=True), headers=AUTH)
            assert response.status == 200, await response.text()
            body = await response.json()
            rows.extend(body["value"])
        assert len(body["value"]) <= PAGE
        return rows

    async def control(self, method: str, path: str, body: Any = None) -> Any:
        response = await self.http.request(method, self.url + "/_control" + path, json=body)
        assert response.status == 200, await response.text()
        return await response.json()

    async def table(self, name: str) -> list[dict[str, Any]]:
        return (await self.control("GET", f"/tables/{name}"))["rows"]

    async def comfnd(self, user_id: str, xml_in: str) -> str:
        response = await self.rest(
            "Query/Query", UserId=user_id, BusinessObject="COMFND", XmlIn=xml_in
        )
        assert response.status == 200
        return (await response.read()).decode("cp1252")


@pytest.fixture
async def emu() -> AsyncIterator[Emu]:
    app = create_app(customers=50, invoices=300, seed=7, today=TODAY, max_rows_per_request=PAGE)
    async with RunningEmulator(app) as running, aiohttp.ClientSession() as http:
        yield Emu(running.url, http)


def ts(value: str) -> int:
    return int.from_bytes(base64.b64decode(value), "big")


def iso(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value.replace("Z", "+00:00"))


def inv_key(row: dict[str, Any]) -> tuple[str, str, str]:
    return (row["Customer"], row["Invoice"], row["DocumentType"])


def comfnd_xml(
    table: str, columns: list[str], where: str = "", order: str = "", rows: int = 0
) -> str:
    cols = "".join(f"<Column>{c}</Column>" for c in columns)
    return (
        '<?xml version="1.0" encoding="Windows-1252"?>\n'
        '<Query xmlns:xsd="http://www.w3.org/2001/XMLSchema-instance" '
        'xsd:noNamespaceSchemaLocation="COMFND.XSD">'
        f"<TableName>{table}</TableName><ReturnRows>{rows}</ReturnRows>"
        f"<Columns>{cols}</Columns>"
        + (f"<Where>{where}</Where>" if where else "")
        + (f"<OrderBy><Column>{order}</Column></OrderBy>" if order else "")
        + "</Query>"
    )


def expression(
    column: str, condition: str, value: str, and_or: str = "And", open_: str = "", close: str = ""
) -> str:
    return (
        f"<Expression><OpenBracket>{open_}</OpenBracket><AndOr>{and_or}</AndOr>"
        f"<Column>{column}</Column><Condition>{condition}</Condition><Value>{value}</Value>"
        f"<CloseBracket>{close}</CloseBracket></Expression>"
    )


def parse_comfnd(text: str) -> tuple[ET.Element, list[dict[str, str]]]:
    assert text.startswith('<?xml version="1.0" encoding="Windows-1252"?>')
    root = ET.fromstring(re.sub(r"^<\?xml[^>]*\?>", "", text))
    rows = [{el.tag: (el.text or "") for el in row} for row in root.findall("Row")]
    return root, rows


# --------------------------------------------------------------------------------------------
# e.net REST
# --------------------------------------------------------------------------------------------


async def test_logon_returns_session_id_and_failures_are_http_200_error_bodies(emu: Emu) -> None:
    response = await emu.rest(
        "Logon", Operator="ADMIN", OperatorPassword="syspro", CompanyId="EDU1", CompanyPassword=""
    )
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Server"] == "Microsoft-HTTPAPI/2.0"
    assert re.fullmatch(r"[0-9A-F]{32}00  ", await response.text())

    bad_password = await emu.logon(password="wrong")
    assert bad_password == "ERROR: Invalid operator password"
    unknown = await emu.rest(
        "logon", Operator="NOBODY", OperatorPassword="x", CompanyId="EDU1", CompanyPassword=""
    )
    assert unknown.status == 200
    assert (await unknown.text()).startswith("ERROR")
    bad_company = await emu.rest(
        "Logon", Operator="ADMIN", OperatorPassword="syspro", CompanyId="ZZZ", CompanyPassword=""
    )
    assert (await bad_company.text()).startswith("ERROR: Invalid company")

    stats = await emu.control("GET", "/stats")
    assert stats["logons"] == 1
    assert stats["logon_failures"] == 3
    assert stats["active_sessions"] == 1


async def test_quote_guid_option_returns_json_string() -> None:
    app = create_app(customers=1, invoices=0, quote_guid=True)
    async with RunningEmulator(app) as running, aiohttp.ClientSession() as http:
        body = await Emu(running.url, http).logon()
    assert body.startswith('"') and body.endswith('"')
    assert re.fullmatch(r"[0-9A-F]{32}00  ", json.loads(body))


async def test_paths_are_case_insensitive_and_only_get_is_allowed(emu: Emu) -> None:
    user_id = await emu.logon()
    response = await emu.http.get(
        emu.url + REST.lower() + "/getlogonprofile", params={"UserId": user_id}
    )
    assert "<OperatorCode>ADMIN</OperatorCode>" in await response.text()
    post = await emu.http.post(emu.url + REST + "/Logon")
    assert post.status == 405


async def test_second_logon_of_the_same_operator_kills_the_first_session(emu: Emu) -> None:
    first = await emu.logon()
    second = await emu.logon()
    assert first != second
    stale = await emu.rest("GetLogonProfile", UserId=first)
    assert (await stale.text()).startswith("ERROR")
    assert "invalid or the session has expired" in await stale.text()
    fresh = await emu.rest("GetLogonProfile", UserId=second)
    assert "<OperatorCode>ADMIN</OperatorCode>" in await fresh.text()
    stats = await emu.control("GET", "/stats")
    assert stats["sessions_replaced"] == 1
    assert stats["active_sessions"] == 1


async def test_logoff_then_the_session_is_invalid(emu: Emu) -> None:
    user_id = await emu.logon()
    logoff = await emu.rest("Logoff", UserId=user_id)
    assert await logoff.text() == "0"
    again = await emu.rest("GetLogonProfile", UserId=user_id)
    assert again.status == 200
    assert (await again.text()).startswith("ERROR: The UserId")
    unknown = await emu.rest("Query/Query", UserId="NOT-A-SESSION", BusinessObject="COMFND")
    assert (await unknown.text()).startswith("ERROR")
    stats = await emu.control("GET", "/stats")
    assert stats["logoffs"] == 1
    assert stats["active_sessions"] == 0
    assert stats["invalid_session_calls"] == 2


async def test_sessions_expire_after_the_idle_timeout(emu: Emu) -> None:
    user_id = await emu.logon()
    await emu.control("POST", "/advance_clock", {"seconds": 1190})
    alive = await emu.rest("GetLogonProfile", UserId=user_id)  # use refreshes the idle timer
    assert "<CompanyName>" in await alive.text()
    await emu.control("POST", "/advance_clock", {"seconds": 1190})
    still = await emu.rest("GetLogonProfile", UserId=user_id)
    assert "<CompanyName>" in await still.text()
    await emu.control("POST", "/advance_clock", {"seconds": 1201})
    expired = await emu.rest("GetLogonProfile", UserId=user_id)
    assert (await expired.text()).startswith("ERROR")
    stats = await emu.control("GET", "/stats")
    assert stats["sessions_expired"] == 1
    assert stats["active_sessions"] == 0
    # an idle session is gone even if nobody uses it again
    await emu.logon()
    assert (await emu.control("GET", "/stats"))["active_sessions"] == 1
    await emu.control("POST", "/advance_clock", {"seconds": 1201})
    assert (await emu.control("GET", "/stats"))["active_sessions"] == 0


async def test_expire_sessions_control_route(emu: Emu) -> None:
    user_id = await emu.logon()
    assert await emu.control("POST", "/expire_sessions") == {"expired": 1}
    response = await emu.rest("GetLogonProfile", UserId=user_id)
    assert (await response.text()).startswith("ERROR")


async def test_logon_profile_and_version(emu: Emu) -> None:
    user_id = await emu.logon()
    profile = ET.fromstring(
        re.sub(
            r"^<\?xml[^>]*\?>", "", await (await emu.rest("GetLogonProfile", UserId=user_id)).text()
        )
    )
    assert profile.findtext("CompanyName") == "Outdoors Inc"
    assert profile.findtext("OperatorCode") == "ADMIN"
    assert profile.findtext("LocalCurrencyCode") == "USD"
    assert profile.findtext("EnetVersion") == await (await emu.rest("GetVersion")).text()


async def test_comfnd_query_with_columns_where_order_and_return_rows(emu: Emu) -> None:
    user_id = await emu.logon()
    where = expression("Customer", "GE", "0000010", open_="(") + expression(
        "Customer", "LE", "0000014", close=")"
    )
    text = await emu.comfnd(
        user_id, comfnd_xml("ArCustomer", ["Customer", "Name", "CreditLimit"], where, "Customer", 3)
    )
    root, rows = parse_comfnd(text)
    assert root.tag == "ArCustomer"
    assert root.find("HeaderDetails/TableName").text == "ArCustomer"  # type: ignore[union-attr]
    assert [r["Customer"] for r in rows] == ["0000010", "0000011", "0000012"]
    assert set(rows[0]) == {"Customer", "Name", "CreditLimit"}
    assert root.findtext("RowsReturned", "").strip() == "3"
    by_key = {r["Customer"]: r for r in await emu.table("ArCustomer")}
    for row in rows:
        assert row["Name"] == by_key[row["Customer"]]["Name"]
        assert row["CreditLimit"].startswith(" ")  # SYSPRO right-aligns numbers
        assert int(row["CreditLimit"]) == by_key[row["Customer"]]["CreditLimit"]
    stats = await emu.control("GET", "/stats")
    assert stats["enet_queries"] == 1
    assert stats["enet_rows_served"] == 3


async def test_comfnd_and_or_brackets_with_dates(emu: Emu) -> None:
    user_id = await emu.logon()
    # (InvoiceDate >= 2024-06-15 And DocumentType = I) Or Customer = 0000002
    where = (
        expression("InvoiceDate", "GE", "2024-06-15", open_="(")
        + expression("DocumentType", "EQ", "I", close=")")
        + expression("Customer", "EQ", "0000002", and_or="Or")
    )
    text = await emu.comfnd(
        user_id, comfnd_xml("ArInvoice", ["Customer", "Invoice", "InvoiceDate"], where)
    )
    _, rows = parse_comfnd(text)
    expected = sorted(
        (r["Customer"], r["Invoice"])
        for r in await emu.table("ArInvoice")
        if (r["InvoiceDate"] >= "2024-06-15" and r["DocumentType"] == "I")
        or r["Customer"] == "0000002"
    )
    assert expected  # the dataset must make this test meaningful
    assert [(r["Customer"], r["Invoice"]) for r in rows] == expected
    assert all(re.fullmatch(r"\d{4}-\d{2}-\d{2}", r["InvoiceDate"]) for r in rows)


async def test_comfnd_accepts_long_urls_like_http_sys(emu: Emu) -> None:
    user_id = await emu.logon()
    wanted = [f"{n:07d}" for n in range(1, 51)]
    where = "".join(
        expression("Customer", "EQ", c, and_or="Or" if i else "And") for i, c in enumerate(wanted)
    )
    xml_in = comfnd_xml("ArCustomer", ["Customer"], where)
    assert len(xml_in) > 8190  # longer than aiohttp's default request-line limit
    _, rows = parse_comfnd(await emu.comfnd(user_id, xml_in))
    assert [r["Customer"] for r in rows] == wanted


async def test_comfnd_errors_are_http_200_error_bodies(emu: Emu) -> None:
    user_id = await emu.logon()
    assert (await emu.comfnd(user_id, comfnd_xml("NoSuchTable", ["A"]))).startswith(
        "ERROR: Table 'NoSuchTable' not found"
    )
    assert (await emu.comfnd(user_id, comfnd_xml("ArCustomer", ["Nope"]))).startswith(
        "ERROR: Column 'Nope' not found"
    )
    bad_condition = comfnd_xml("ArCustomer", ["Customer"], expression("Customer", "XX", "1"))
    assert (await emu.comfnd(user_id, bad_condition)).startswith("ERROR")
    assert (await emu.comfnd(user_id, "<Query><TableName>")).startswith("ERROR: XML parse")
    other = await emu.rest("Query/Query", UserId=user_id, BusinessObject="ARSQRY", XmlIn="<a/>")
    assert (await other.text()).startswith("ERROR")


# --------------------------------------------------------------------------------------------
# OData
# --------------------------------------------------------------------------------------------


async def test_odata_requires_basic_auth_and_is_read_only(emu: Emu) -> None:
    missing = await emu.odata("/ArCustomer", headers={})
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"].startswith("Basic")
    wrong = await emu.odata(
        "/ArCustomer",
        headers={"Authorization": "Basic " + base64.b64encode(b"ADMIN:nope").decode()},
    )
    assert wrong.status == 401
    ok = await emu.odata("/ArCustomer", {"$top": "1"})
    assert ok.status == 200
    assert ok.headers["OData-Version"] == "4.0"
    assert ok.headers["Server"] == "Microsoft-IIS/10.0"
    post = await emu.http.post(emu.url + ODATA + "/ArCustomer", headers=AUTH, json={})
    assert post.status == 405
    assert "error" in await post.json()
    stats = await emu.control("GET", "/stats")
    assert stats["odata_auth_failures"] == 2


async def test_service_document_and_metadata(emu: Emu) -> None:
    service = await (await emu.odata("")).json()
    assert {s["name"] for s in service["value"]} == {"ArCustomer", "ArInvoice"}
    metadata = await emu.odata("/$metadata")
    assert metadata.status == 200
    ns = {"edm": "http://docs.oasis-open.org/odata/ns/edm"}
    root = ET.fromstring(await metadata.text())
    types = {t.get("Name"): t for t in root.iter(f"{{{ns['edm']}}}EntityType")}
    invoice = types["ArInvoice"]
    keys = [k.get("Name") for k in invoice.findall("edm:Key/edm:PropertyRef", ns)]
    assert keys == ["Customer", "Invoice", "DocumentType"]
    props = {p.get("Name"): p.get("Type") for p in invoice.findall("edm:Property", ns)}
    assert props["TimeStamp"] == "Edm.Binary"
    assert props["InvoiceDate"] == "Edm.DateTimeOffset"
    assert props["InvoiceBal1"] == "Edm.Decimal"
    assert "DueDate" not in props
    customer_props = {p.get("Name") for p in types["ArCustomer"].findall("edm:Property", ns)}
    assert {"Customer", "SoldToAddr5", "CustomerOnHold", "TimeStamp"} <= customer_props


async def test_entity_shape_dates_decimals_and_timestamp(emu: Emu) -> None:
    body = await (await emu.odata("/ArInvoice", {"$top": "5"})).json()
    assert body["@odata.context"] == emu.url + ODATA + "/$metadata#ArInvoice"
    row = body["value"][0]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", row["InvoiceDate"])
    assert isinstance(row["InvoiceBal1"], int | float)
    assert len(base64.b64decode(row["TimeStamp"])) == 8
    single = await emu.odata(
        f"/ArInvoice(Customer='{row['Customer']}',Invoice='{row['Invoice']}',"
        f"DocumentType='{row['DocumentType']}')"
    )
    assert single.status == 200
    assert (await single.json())["TimeStamp"] == row["TimeStamp"]
    missing = await emu.odata("/ArCustomer('NOPE')")
    assert missing.status == 404


async def test_filter_on_dates_with_and(emu: Emu) -> None:
    rows = await emu.odata_all(
        "/ArInvoice", {"$filter": "InvoiceDate ge 2024-05-01T00:00:00Z and InvoiceBal1 gt 0"}
    )
    expected = {
        inv_key(r)
        for r in await emu.table("ArInvoice")
        if r["InvoiceDate"] >= "2024-05-01T00:00:00Z" and r["InvoiceBal1"] > 0
    }
    assert len(expected) > PAGE  # spans several pages
    assert [inv_key(r) for r in rows] == sorted(expected)
    # the same instant written with an offset selects the same rows
    shifted = await emu.odata_all(
        "/ArInvoice", {"$filter": "InvoiceBal1 gt 0 and InvoiceDate ge 2024-05-01T02:00:00+02:00"}
    )
    assert [inv_key(r) for r in shifted] == sorted(expected)


async def test_filter_strings_with_quotes_case_insensitively(emu: Emu) -> None:
    await emu.control(
        "PUT", "/tables/ArCustomer", {"rows": [{"Customer": "0009999", "Name": "O'Brien Tools"}]}
    )
    for literal in ("'O''Brien Tools'", "'o''brien TOOLS'"):
        body = await (await emu.odata("/ArCustomer", {"$filter": f"Name eq {literal}"})).json()
        assert [r["Customer"] for r in body["value"]] == ["0009999"]
    contains = await (
        await emu.odata("/ArCustomer", {"$filter": "contains(Name,'brien t')"})
    ).json()
    assert [r["Customer"] for r in contains["value"]] == ["0009999"]


async def test_filter_or_parentheses_and_null(emu: Emu) -> None:
    table = await emu.table("ArInvoice")
    customer = max(
        {r["Customer"] for r in table}, key=lambda c: sum(r["Customer"] == c for r in table)
    )
    rows = await emu.odata_all(
        "/ArInvoice",
        {
            "$filter": f"(DocumentType eq 'C' or DocumentType eq 'D' or InvoiceBal1 eq 0) "
            f"and Customer eq '{customer}'"
        },
    )
    expected = sorted(
        inv_key(r)
        for r in table
        if r["Customer"] == customer and (r["DocumentType"] in ("C", "D") or r["InvoiceBal1"] == 0)
    )
    assert expected
    assert [inv_key(r) for r in rows] == expected
    never_sold = await emu.odata_all("/ArCustomer", {"$filter": "DateLastSale eq null"})
    expected_none = [
        r["Customer"] for r in await emu.table("ArCustomer") if r["DateLastSale"] is None
    ]
    assert [r["Customer"] for r in never_sold] == expected_none


async def test_server_driven_paging_with_next_link_and_count(emu: Emu) -> None:
    first = await (await emu.odata("/ArInvoice", {"$count": "true"})).json()
    assert first["@odata.count"] == 300
    assert len(first["value"]) == PAGE
    assert first["@odata.nextLink"] == emu.url + ODATA + f"/ArInvoice?$count=true&$skip={PAGE}"
    rows = await emu.odata_all("/ArInvoice", {})
    keys = [inv_key(r) for r in rows]
    assert len(keys) == 300
    assert keys == sorted(keys) == sorted({inv_key(r) for r in await emu.table("ArInvoice")})

    # $top larger than the cap: capped pages, the next link carries the remaining $top
    top = await (await emu.odata("/ArInvoice", {"$top": "50"})).json()
    assert len(top["value"]) == PAGE
    assert "$top=10" in top["@odata.nextLink"] and f"$skip={PAGE}" in top["@odata.nextLink"]
    rest = await (
        await emu.http.get(URL(top["@odata.nextLink"], encoded=True), headers=AUTH)
    ).json()
    assert len(rest["value"]) == 10
    assert "@odata.nextLink" not in rest
    assert [inv_key(r) for r in top["value"] + rest["value"]] == keys[:50]
    # $top under the cap and $skip: no next link
    small = await (await emu.odata("/ArInvoice", {"$top": "30", "$skip": "5"})).json()
    assert [inv_key(r) for r in small["value"]] == keys[5:35]
    assert "@odata.nextLink" not in small
    count_only = await emu.odata("/ArInvoice/$count", {"$filter": "DocumentType eq 'I'"})
    assert int(await count_only.text()) == sum(1 for r in rows if r["DocumentType"] == "I")


async def test_select(emu: Emu) -> None:
    body = await (
        await emu.odata("/ArCustomer", {"$select": "Customer,Name,TimeStamp", "$top": "3"})
    ).json()
    assert body["@odata.context"].endswith("#ArCustomer(Customer,Name,TimeStamp)")
    assert [set(r) for r in body["value"]] == [{"Customer", "Name", "TimeStamp"}] * 3
    bad = await emu.odata("/ArCustomer", {"$select": "Customer,DueDate"})
    assert bad.status == 400


async def test_orderby_several_keys(emu: Emu) -> None:
    rows = await emu.odata_all(
        "/ArCustomer",
        {"$orderby": "CreditLimit desc,Customer asc", "$select": "Customer,CreditLimit"},
    )
    expected = sorted(
        ((r["CreditLimit"], r["Customer"]) for r in await emu.table("ArCustomer")),
        key=lambda t: (-t[0], t[1]),
    )
    assert [(r["CreditLimit"], r["Customer"]) for r in rows] == expected
    dated = await emu.odata_all("/ArInvoice", {"$orderby": "InvoiceDate desc", "$top": "45"})
    dates = [iso(r["InvoiceDate"]) for r in dated]
    assert len(dates) == 45
    assert dates == sorted(dates, reverse=True)  # type: ignore[type-var]


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"$filter": "Nmae eq 'x'"}, "Could not find a property named 'Nmae'"),
        ({"$filter": "Name eq"}, "not valid"),
        ({"$filter": "Name eq 'unterminated"}, "Syntax error"),
        ({"$filter": "CreditLimit eq 'x'"}, "incompatible types"),
        ({"$filter": "DateLastSale gt 2024-01-01"}, "incompatible types"),
        ({"$filter": "DateLastSale gt 2024-01-01T00:00:00"}, "time zone offset"),
        ({"$filter": "Name EQ 'x'"}, "case-sensitive"),
        ({"$filter": "TimeStamp gt binary'AAAAAAAAB9A='"}, "GreaterThan is not defined"),
        ({"$orderby": "Name sideways"}, "asc or desc"),
        ({"$top": "-1"}, "$top"),
        ({"$expand": "Invoices"}, "$expand"),
    ],
)
async def test_bad_query_options_give_odata_400(
    emu: Emu, params: dict[str, str], fragment: str
) -> None:
    response = await emu.odata("/ArCustomer", params)
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == "BadRequest"
    assert fragment in error["message"]


async def test_timestamp_equality_filter_and_binary_ranges_option() -> None:
    app = create_app(customers=20, invoices=0, odata_binary_range_filters=True)
    async with RunningEmulator(app) as running, aiohttp.ClientSession() as http:
        emu = Emu(running.url, http)
        rows = await emu.table("ArCustomer")
        pick = rows[7]
        body = await (
            await emu.odata("/ArCustomer", {"$filter": f"TimeStamp eq binary'{pick['TimeStamp']}'"})
        ).json()
        assert [r["Customer"] for r in body["value"]] == [pick["Customer"]]
        newer = await (
            await emu.odata("/ArCustomer", {"$filter": f"TimeStamp gt binary'{pick['TimeStamp']}'"})
        ).json()
        assert {r["Customer"] for r in newer["value"]} == {
            r["Customer"] for r in rows if ts(r["TimeStamp"]) > ts(pick["TimeStamp"])
        }


# --------------------------------------------------------------------------------------------
# Control API
# --------------------------------------------------------------------------------------------


async def test_change_bumps_timestamp_and_changes_data(emu: Emu) -> None:
    before = {r["Customer"]: r for r in await emu.table("ArCustomer")}
    watermark = max(ts(r["TimeStamp"]) for r in before.values())
    result = await emu.control("POST", "/change", {"table": "ArCustomer", "count": 10, "seed": 3})
    assert result["count"] == 10 and len(set(result["keys"])) == 10
    after = {r["Customer"]: r for r in await emu.table("ArCustomer")}
    for key, row in after.items():
        if key in result["keys"]:
            assert ts(row["TimeStamp"]) > watermark
            changed = {c for c in row if c != "TimeStamp" and row[c] != before[key][c]}
            assert changed, f"{key} got a new TimeStamp but no new data"
        else:
            assert row == before[key]

    invoices = {inv_key(r): r for r in await emu.table("ArInvoice")}
    paid = await emu.control("POST", "/change", {"table": "ArInvoice", "count": 5, "seed": 4})
    assert paid["count"] == 5
    now = {inv_key(r): r for r in await emu.table("ArInvoice")}
    for path in paid["keys"]:
        key = tuple(path.split("|"))
        assert now[key]["InvoiceBal1"] < invoices[key]["InvoiceBal1"]
        assert ts(now[key]["TimeStamp"]) > ts(invoices[key]["TimeStamp"])


async def test_put_invoice_for_unknown_customer_and_patch(emu: Emu) -> None:
    put = await emu.control(
        "PUT",
        "/tables/ArInvoice",
        {
            "rows": [
                {
                    "Customer": "0777777",
                    "Invoice": "900001",
                    "DocumentType": "I",
                    "InvoiceDate": "2024-06-29",
                    "CurrencyValue": 125.5,
                    "InvoiceBal1": 125.5,
                    "PostCurrency": "USD",
                }
            ]
        },
    )
    assert put == {"inserted": 1, "replaced": 0, "keys": ["0777777|900001|I"]}
    body = await (await emu.odata("/ArInvoice", {"$filter": "Customer eq '0777777'"})).json()
    (row,) = body["value"]
    assert row["InvoiceDate"] == "2024-06-29T00:00:00Z"
    assert row["InvoiceBal1"] == 125.5
    assert (await emu.odata("/ArCustomer('0777777')")).status == 404

    patched = await emu.control("PATCH", "/tables/ArInvoice/0777777|900001|I", {"InvoiceBal1": 0})
    assert patched["InvoiceBal1"] == 0
    assert ts(patched["TimeStamp"]) > ts(row["TimeStamp"])
    again = await (await emu.odata("/ArInvoice", {"$filter": "Customer eq '0777777'"})).json()
    assert again["value"][0]["InvoiceBal1"] == 0
    missing = await emu.http.patch(emu.url + "/_control/tables/ArInvoice/X|Y|I", json={})
    assert missing.status == 404
    bad_column = await emu.http.patch(
        emu.url + "/_control/tables/ArInvoice/0777777|900001|I", json={"DueDate": "x"}
    )
    assert bad_column.status == 400


async def test_seed_replaces_data_deterministically(emu: Emu) -> None:
    counts = await emu.control("POST", "/seed", {"customers": 12, "invoices": 30, "seed": 5})
    assert counts == {"ArCustomer": 12, "ArInvoice": 30}
    first = await emu.table("ArCustomer")
    assert [r["Customer"] for r in first] == [f"{n:07d}" for n in range(1, 13)]
    await emu.control("POST", "/seed", {"customers": 12, "invoices": 30, "seed": 5})
    second = await emu.table("ArCustomer")

    def strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "TimeStamp"} for r in rows]

    assert strip(first) == strip(second)
    assert min(ts(r["TimeStamp"]) for r in second) > max(ts(r["TimeStamp"]) for r in first)
    invoices = await emu.table("ArInvoice")
    assert {r["Customer"] for r in invoices} <= {r["Customer"] for r in first}
    assert all(
        r["InvoiceBal1"] == 0 or r["DocumentType"] != "C" or r["InvoiceBal1"] < 0 for r in invoices
    )


async def test_generated_data_is_realistic(emu: Emu) -> None:
    await emu.control("POST", "/seed", {"customers": 400, "invoices": 2000, "seed": 11})
    customers = await emu.table("ArCustomer")
    invoices = await emu.table("ArInvoice")
    currencies = [c["Currency"] for c in customers]
    assert currencies.count("USD") > 0.8 * len(customers)
    assert {c["TermsCode"] for c in customers} <= {"30", "60", "CO", "EO"}
    assert any(c["CustomerOnHold"] == "Y" for c in customers)
    assert {c["CustomerOnHold"] for c in customers} == {"Y", "N"}
    emails = [c["Email"] for c in customers if c["Email"]]
    assert len(set(emails)) == len(emails) > 0.8 * len(customers)
    dates = [iso(i["InvoiceDate"]) for i in invoices]
    assert min(dates).date() >= date(2024, 1, 1)  # type: ignore[type-var,union-attr]
    assert max(dates).date() <= TODAY  # type: ignore[type-var,union-attr]
    in_number_order = [i["InvoiceDate"] for i in sorted(invoices, key=lambda i: i["Invoice"])]
    assert in_number_order == sorted(in_number_order)  # the register numbers in date order
    normal = [i for i in invoices if i["DocumentType"] == "I"]
    paid = [i for i in normal if i["InvoiceBal1"] == 0]
    open_ = [i for i in normal if i["InvoiceBal1"] > 0]
    overdue = [i for i in open_ if iso(i["InvoiceDate"]).date() < date(2024, 5, 1)]  # type: ignore[union-attr]
    assert paid and open_ and overdue
    assert all(0 <= i["InvoiceBal1"] <= i["CurrencyValue"] * i["ConvRate"] + 0.01 for i in normal)
    by_customer = {c["Customer"]: c for c in customers}
    latest: dict[str, str] = {}
    for inv in invoices:
        latest[inv["Customer"]] = max(latest.get(inv["Customer"], ""), inv["InvoiceDate"])
    assert all(by_customer[c]["DateLastSale"] == d for c, d in latest.items())


async def test_fault_injection_looks_like_iis(emu: Emu) -> None:
    await emu.control("POST", "/faults", {"throttle_next": 1, "fail_next": 1})
    throttled = await emu.odata("/ArCustomer", {"$top": "1"})
    assert throttled.status == 503
    assert throttled.headers["Content-Type"].startswith("text/html")
    assert "Service Unavailable" in await throttled.text()
    failed = await emu.rest("GetVersion")
    assert failed.status == 500
    assert "500 - Internal server error" in await failed.text()
    ok = await emu.odata("/ArCustomer", {"$top": "1"})
    assert ok.status == 200
    assert (await emu.control("GET", "/stats"))["statuses"] == {"503": 1, "500": 1, "200": 1}


async def test_stats_count_requests_and_rows_and_reset(emu: Emu) -> None:
    user_id = await emu.logon()
    await emu.comfnd(user_id, comfnd_xml("ArCustomer", ["Customer"], rows=7))
    await emu.odata("/ArCustomer", {"$top": "5"})
    await emu.rest("Logoff", UserId=user_id)
    stats = await emu.control("GET", "/stats")
    assert stats["logons"] == 1 and stats["logoffs"] == 1
    assert stats["odata_requests"] == 1
    assert stats["rows_served"] == 12
    assert stats["calls"]["REST logon"] == 1
    await emu.control("POST", "/reset")
    stats = await emu.control("GET", "/stats")
    assert stats["total_calls"] == 0 and stats["rows"] == {"ArCustomer": 0, "ArInvoice": 0}
