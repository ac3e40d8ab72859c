"""SYSPRO connector edge cases against scripted HTTP answers (aioresponses)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aioresponses import CallbackResult, aioresponses
from aioresponses import core as aioresponses_core
from pydantic import SecretStr, ValidationError
from yarl import URL

from shared.connections import StoredConnection, build_connector, connector_type
from shared.connectors.base import Source, StreamSpec
from shared.connectors.paging import PagingError
from shared.connectors.syspro import (
    CONNECTOR_TYPE,
    FETCH_CHUNK_IDS,
    FETCH_FILTER_MAX_CHARS,
    SessionExpiredError,
    SysproConnector,
    SysproSecrets,
    SysproSettings,
    _decode,
    _encode_query,
    odata_literal,
    parse_logon_profile,
    since_literal,
)
from shared.failures import (
    AuthError,
    FailureClass,
    PermanentError,
    ThrottledError,
    TransientError,
    classify,
    describe,
)
from shared.retry import RetryPolicy
from shared.tokens import Token

REST = "http://syspro.test:8101/SYSPROWCFService/Rest"
ODATA = "https://syspro.test/SYSPRO8Odata/SYSPROOData"
OP_PASSWORD = "Op&Pa+ss w0rd#1"
CO_PASSWORD = "c0mpany%Secret"
OD_PASSWORD = "odata-S3cret!"
SECRETS = (OP_PASSWORD, CO_PASSWORD, OD_PASSWORD)
GUID_1 = "6F1C2A0B9E8D47F2A1B3C4D5E6F7A8B900"
GUID_2 = "0A1B2C3D4E5F60718293A4B5C6D7E8F900"
FAST = RetryPolicy(attempts=3, base_delay_s=0.001, max_delay_s=0.005, throttle_delay_s=0.001)

PROFILE_XML = (
    '<?xml version="1.0" encoding="Windows-1252"?>\n<LogonProfile>\n'
    "<CompanyName>Outdoors Inc</CompanyName>\n<CompanyId>EDU1</CompanyId>\n"
    "<OperatorCode>ADMIN</OperatorCode>\n<SysproVersion>8.0.043</SysproVersion>\n"
    "<EnetVersion>8.0.0.0</EnetVersion>\n<DefaultCustomer/>\n</LogonProfile>\n"
)

CUSTOMERS = StreamSpec("ArCustomer", ("Customer",))
INVOICES = StreamSpec("ArInvoice", ("Customer", "Invoice", "DocumentType"), "InvoiceDate")


def settings(**overrides: Any) -> dict[str, Any]:
    return {
        "rest_url": REST,
        "odata_url": ODATA,
        "operator": "ADMIN",
        "company_id": "EDU1",
        **overrides,
    }


def secrets() -> dict[str, str]:
    return {
        "operator_password": OP_PASSWORD,
        "company_password": CO_PASSWORD,
        "odata_password": OD_PASSWORD,
    }


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text
        assert URL.build(query={"x": secret}).raw_query_string[2:] not in text


@pytest_asyncio.fixture
async def connector() -> AsyncIterator[SysproConnector]:
    conn = SysproConnector("syspro-main", settings(), secrets(), retry_policy=FAST)
    yield conn
    if conn._http is not None:
        await conn._http.close()


class _Response(aiohttp.ClientResponse):
    """aioresponses 0.7.9 builds responses without the ``stream_writer`` aiohttp 3.14 requires."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


@pytest.fixture(autouse=True)
def _aioresponses_compat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aioresponses_core, "ClientResponse", _Response)


@pytest.fixture
def http() -> Any:
    with aioresponses() as mocked:
        yield mocked


Calls = list[tuple[str, dict[str, str]]]


def enet(
    mocked: aioresponses,
    operation: str,
    answer: Callable[[dict[str, str]], str | CallbackResult],
    calls: Calls,
) -> None:
    """Route ``GET {REST}/{operation}?...`` to ``answer(query)``; record every call."""

    def callback(url: URL, **_: Any) -> CallbackResult:
        query = dict(url.query)
        calls.append((operation, query))
        result = answer(query)
        if isinstance(result, CallbackResult):
            return result
        return CallbackResult(body=result.encode("cp1252"), content_type="application/octet-stream")

    pattern = re.compile(rf"^{re.escape(REST)}/{re.escape(operation)}(\?.*)?$")
    mocked.get(pattern, callback=callback, repeat=True)


def odata(
    mocked: aioresponses,
    entity_set: str,
    answer: Callable[[URL], CallbackResult],
    calls: list[URL],
) -> None:
    def callback(url: URL, **kwargs: Any) -> CallbackResult:
        calls.append(url)
        scheme, _, token = kwargs["headers"]["Authorization"].partition(" ")
        assert scheme == "Basic"
        assert base64.b64decode(token).decode() == f"ADMIN:{OD_PASSWORD}"
        return answer(url)

    pattern = re.compile(rf"^{re.escape(ODATA)}/{entity_set}(\?.*)?$")
    mocked.get(pattern, callback=callback, repeat=True)


def collection(rows: list[dict[str, Any]], next_link: str | None = None) -> CallbackResult:
    body: dict[str, Any] = {"@odata.context": f"{ODATA}/$metadata#X", "value": rows}
    if next_link is not None:
        body["@odata.nextLink"] = next_link
    return CallbackResult(
        body=json.dumps(body),
        content_type="application/json",
        headers={"OData-Version": "4.0"},
    )


async def read_all(conn: SysproConnector, stream: StreamSpec, since: str | None) -> list[Any]:
    return [page async for page in conn.changed_since(stream, since)]


# --------------------------------------------------------------------------------------------
# Settings, secrets, registration
# --------------------------------------------------------------------------------------------


def test_settings_defaults_and_normalisation() -> None:
    s = SysproSettings.model_validate(
        settings(rest_url=REST + "/", odata_url=f" {ODATA}/ ", odata_user="  ")
    )
    assert s.rest_url == REST
    assert s.odata_url == ODATA
    assert s.odata_username == "ADMIN"
    assert s.entity_sets == {"ArCustomer": "ArCustomer", "ArInvoice": "ArInvoice"}
    assert s.entity_set("SorMaster") == "SorMaster"
    assert (s.page_size, s.max_concurrency) == (1000, 4)
    custom = SysproSettings.model_validate(
        settings(odata_user="ODATAUSR", entity_sets={"ArCustomer": "Customers"})
    )
    assert custom.odata_username == "ODATAUSR"
    assert custom.entity_set("ArCustomer") == "Customers"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rest_url": "ftp://syspro.test/Rest"}, "rest_url must be an http(s) URL"),
        ({"odata_url": "syspro.test/odata"}, "odata_url must be an http(s) URL"),
        ({"odata_url": "https://u:p@syspro.test/o"}, "must not carry a user name or password"),
        ({"rest_url": REST + "?Operator=x"}, "must not have a query string"),
        ({"operator": "   "}, "operator"),
        ({"page_size": 0}, "page_size"),
        ({"entity_sets": {"ArCustomer": "Ar Customer"}}, "not a table or entity-set name"),
        ({"pagesize": 10}, "pagesize"),
    ],
)
def test_settings_errors_are_clear(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        SysproSettings.model_validate(settings(**overrides))
    assert message in str(info.value)


def test_secrets_never_show() -> None:
    s = SysproSecrets.model_validate(secrets())
    for text in (repr(s), str(s), s.model_dump_json()):
        assert_no_secret(text)
    none = SysproSecrets.model_validate({**secrets(), "company_password": None})
    assert none.company_password.get_secret_value() == ""
    assert (
        SysproSecrets.model_validate(
            {"operator_password": "x", "odata_password": "y"}
        ).company_password.get_secret_value()
        == ""
    )
    with pytest.raises(ValidationError) as info:
        SysproSecrets.model_validate({"operator_password": OP_PASSWORD, "odata_password": 12})
    assert_no_secret(str(info.value))
    assert "odata_password" in str(info.value)
    with pytest.raises(ValidationError):
        SysproSecrets.model_validate({"operator_password": OP_PASSWORD})


def test_registered_connector_type_builds_a_source() -> None:
    assert connector_type("syspro") is CONNECTOR_TYPE
    stored = StoredConnection(
        "syspro-main",
        "syspro",
        settings(),
        {k: SecretStr(v) for k, v in secrets().items()},
        "k1",
    )
    conn = build_connector(stored, token_cache=None)
    assert isinstance(conn, SysproConnector)
    assert isinstance(conn, Source)
    assert conn.name == "syspro-main" and conn.system == "syspro"
    assert_no_secret(repr(conn))
    assert "syspro-main" in repr(conn)


# --------------------------------------------------------------------------------------------
# e.net session
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [f"{GUID_1}  ", json.dumps(GUID_1), f'"{GUID_1}"\r\n'])
async def test_logon_unwraps_plain_and_json_quoted_guid(
    connector: SysproConnector,
    http: aioresponses,
    answer: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    calls: Calls = []
    enet(http, "Logon", lambda q: answer, calls)
    enet(http, "GetLogonProfile", lambda q: json.dumps(PROFILE_XML), calls)
    profile = await connector.get_logon_profile()
    assert profile.company_name == "Outdoors Inc"
    assert (profile.syspro_version, profile.enet_version) == ("8.0.043", "8.0.0.0")
    assert calls[0] == (
        "Logon",
        {
            "Operator": "ADMIN",
            "OperatorPassword": OP_PASSWORD,
            "CompanyId": "EDU1",
            "CompanyPassword": CO_PASSWORD,
        },
    )
    assert calls[1] == ("GetLogonProfile", {"UserId": GUID_1})
    assert connector.logons == 1
    assert "/SYSPROWCFService/Rest/Logon" in caplog.text  # calls are logged, by path only
    assert_no_secret(caplog.text)
    assert "OperatorPassword" not in caplog.text


async def test_credentials_are_percent_encoded_on_the_wire(
    connector: SysproConnector, http: aioresponses
) -> None:
    raw: list[str] = []

    def callback(url: URL, **_: Any) -> CallbackResult:
        raw.append(url.raw_query_string)
        return CallbackResult(body=GUID_1, content_type="application/octet-stream")

    http.get(re.compile(rf"^{re.escape(REST)}/Logon\?.*"), callback=callback)
    await connector._current_session()
    # aioresponses re-encodes the query; the values still decode to the exact passwords
    assert dict(URL("http://x/?" + raw[0], encoded=True).query)["OperatorPassword"] == OP_PASSWORD
    query = _encode_query({"OperatorPassword": OP_PASSWORD, "XmlIn": "<a b='1'>x</a>"})
    assert query == "OperatorPassword=Op%26Pa%2Bss%20w0rd%231&XmlIn=%3Ca%20b%3D'1'%3Ex%3C%2Fa%3E"


async def test_logon_error_is_an_auth_error_with_the_syspro_text_minus_secrets(
    connector: SysproConnector, http: aioresponses
) -> None:
    calls: Calls = []
    enet(http, "Logon", lambda q: f"ERROR: Invalid operator password '{OP_PASSWORD}'", calls)
    with pytest.raises(AuthError) as info:
        await connector.get_logon_profile()
    exc = info.value
    assert classify(exc) is FailureClass.AUTH
    assert exc.code == "LOGON_FAILED"
    assert "Invalid operator password" in str(exc)
    assert "operator 'ADMIN' to company 'EDU1'" in str(exc)
    for text in (str(exc), repr(exc), exc.message, repr(exc.args)):
        assert_no_secret(text)
    assert [op for op, _ in calls] == ["Logon"]  # a refused logon is not retried
    assert connector.logons == 0


async def test_logon_answering_html_is_a_clear_transient_error(
    connector: SysproConnector, http: aioresponses
) -> None:
    calls: Calls = []
    enet(http, "Logon", lambda q: "<html><title>Proxy login</title></html>", calls)
    with pytest.raises(TransientError) as info:
        await connector.get_logon_profile()
    assert "not a session id" in str(info.value)
    assert "Proxy login" in str(info.value)


async def test_expired_session_is_renewed_once_and_the_call_repeated(
    connector: SysproConnector, http: aioresponses
) -> None:
    calls: Calls = []
    guids = iter([GUID_1, GUID_2])
    enet(http, "Logon", lambda q: next(guids), calls)

    def profile(query: dict[str, str]) -> str:
        if query["UserId"] == GUID_1:
            return f"ERROR: The UserId '{GUID_1}' is invalid or the session has expired"
        return PROFILE_XML

    enet(http, "GetLogonProfile", profile, calls)
    result = await connector.get_logon_profile()
    assert result.operator_code == "ADMIN"
    assert [(op, q.get("UserId")) for op, q in calls] == [
        ("Logon", None),
        ("GetLogonProfile", GUID_1),
        ("Logon", None),
        ("GetLogonProfile", GUID_2),
    ]
    assert connector.logons == 2
    # the renewed session is kept for the next call
    await connector.get_logon_profile()
    assert calls[-1] == ("GetLogonProfile", {"UserId": GUID_2})
    assert connector.logons == 2


async def test_session_rejected_again_after_relogon_is_raised_not_looped(
    connector: SysproConnector, http: aioresponses
) -> None:
    calls: Calls = []
    guids = iter([GUID_1, GUID_2, "FFFF0000FFFF0000"])
    enet(http, "Logon", lambda q: next(guids), calls)
    enet(http, "GetLogonProfile", lambda q: f"ERROR: Session {q['UserId']} expired", calls)
    with pytest.raises(SessionExpiredError) as info:
        await connector.get_logon_profile()
    assert classify(info.value) is FailureClass.AUTH
    assert connector.logons == 2
    assert [op for op, _ in calls].count("GetLogonProfile") == 2
    assert "expired" in str(info.value)
    assert GUID_2 not in str(info.value)  # the live session id is not echoed


async def test_relogon_refused_surfaces_the_logon_error(
    connector: SysproConnector, http: aioresponses
) -> None:
    calls: Calls = []
    answers = iter([GUID_1, "ERROR: Invalid operator password"])
    enet(http, "Logon", lambda q: next(answers), calls)
    enet(http, "GetLogonProfile", lambda q: "ERROR: Session has timed out", calls)
    with pytest.raises(AuthError) as info:
        await connector.get_logon_profile()
    assert info.value.code == "LOGON_FAILED"  # the password changed while the session lived
    assert "Invalid operator password" in str(info.value)
    assert [op for op, _ in calls] == ["Logon", "GetLogonProfile", "Logon"]


async def test_concurrent_callers_share_one_relogon(
    connector: SysproConnector, http: aioresponses
) -> None:
    calls: Calls = []
    guids = iter([GUID_1, GUID_2, "FFFF0000FFFF0000"])
    enet(http, "Logon", lambda q: next(guids), calls)

    def profile(query: dict[str, str]) -> str:
        if query["UserId"] == GUID_1:
            return f"ERROR: The UserId '{GUID_1}' is invalid or the session has expired"
        return PROFILE_XML

    enet(http, "GetLogonProfile", profile, calls)
    await connector._current_session()
    results = await asyncio.gather(*(connector.get_logon_profile() for _ in range(8)))
    assert all(r.company_id == "EDU1" for r in results)
    assert connector.logons == 2
    assert [op for op, _ in calls].count("Logon") == 2


async def test_business_object_error_is_permanent_and_keeps_the_session(
    connector: SysproConnector, http: aioresponses
) -> None:
    calls: Calls = []
    enet(http, "Logon", lambda q: GUID_1, calls)
    answer = "ERROR: Column 'Nmae' not found in table 'ArCustomer'"
    enet(http, "Query/Query", lambda q: answer, calls)
    with pytest.raises(PermanentError) as info:
        await connector._enet(
            "Query/Query",
            {
                "BusinessObject": "COMFND",
                "XmlIn": "<Query><TableName>ArCustomer</TableName></Query>",
            },
        )
    assert "Column 'Nmae' not found" in str(info.value)
    assert not isinstance(info.value, AuthError)
    assert connector.logons == 1
    assert calls[-1][1]["BusinessObject"] == "COMFND"


async def test_close_logs_off_the_session_and_closes_http(
    connector: SysproConnector, http: aioresponses
) -> None:
    calls: Calls = []
    enet(http, "Logon", lambda q: GUID_1, calls)
    enet(http, "Logoff", lambda q: "0", calls)
    await connector._current_session()
    client = connector._http
    assert client is not None
    await connector.close()
    assert calls[-1] == ("Logoff", {"UserId": GUID_1})
    assert client.closed
    calls.clear()
    await connector.close()  # nothing left to log off
    assert calls == []


class FakeTokenCache:
    """Stands in for the Postgres token cache that replicas share."""

    def __init__(self, value: str | None) -> None:
        self.token = Token(value, time.time() + 3600) if value else None
        self.stored: list[str] = []

    async def with_lock(self, connection: str, work: Callable[[Any], Any]) -> Token:
        return await work(None)

    async def load(self, conn: Any, connection: str) -> Token | None:
        return self.token

    async def store(self, conn: Any, connection: str, token: Token) -> None:
        self.token = token
        self.stored.append(token.value)


async def test_a_shared_session_is_used_and_left_open(http: aioresponses) -> None:
    cache = FakeTokenCache(GUID_1)
    conn = SysproConnector(
        "syspro-main", settings(), secrets(), retry_policy=FAST, token_cache=cache
    )
    calls: Calls = []
    enet(http, "Logon", lambda q: GUID_2, calls)
    enet(http, "Logoff", lambda q: "0", calls)
    enet(http, "GetLogonProfile", lambda q: PROFILE_XML, calls)
    await conn.get_logon_profile()
    await conn.close()  # the replica that opened GUID_1 logs it off, not this one
    assert calls == [("GetLogonProfile", {"UserId": GUID_1})]
    assert conn.logons == 0


async def test_an_expired_shared_session_is_replaced_for_everyone(http: aioresponses) -> None:
    cache = FakeTokenCache(GUID_1)
    conn = SysproConnector(
        "syspro-main", settings(), secrets(), retry_policy=FAST, token_cache=cache
    )
    calls: Calls = []
    enet(http, "Logon", lambda q: GUID_2, calls)
    enet(http, "Logoff", lambda q: "0", calls)

    def profile(query: dict[str, str]) -> str:
        if query["UserId"] == GUID_1:
            return f"ERROR: The UserId '{GUID_1}' is invalid or the session has expired"
        return PROFILE_XML

    enet(http, "GetLogonProfile", profile, calls)
    await conn.get_logon_profile()
    assert cache.stored == [GUID_2]  # the other replicas pick the new session up
    await conn.close()
    assert [(op, q.get("UserId")) for op, q in calls] == [
        ("GetLogonProfile", GUID_1),
        ("Logon", None),
        ("GetLogonProfile", GUID_2),
        ("Logoff", GUID_2),  # this one it opened, so it logs it off
    ]


async def test_close_without_a_session_makes_no_call(connector: SysproConnector) -> None:
    with aioresponses() as mocked:
        await connector.close()
        assert mocked.requests == {}


async def test_enet_404_names_the_path_and_the_setting(
    connector: SysproConnector, http: aioresponses
) -> None:
    http.get(re.compile(rf"^{re.escape(REST)}/Logon\?.*"), status=404, body="Endpoint not found.")
    with pytest.raises(PermanentError) as info:
        await connector.get_logon_profile()
    assert "/SYSPROWCFService/Rest/Logon does not exist" in str(info.value)
    assert "rest_url" in str(info.value)
    assert_no_secret(str(info.value))


async def test_enet_redirect_is_not_followed_and_hides_the_query(
    connector: SysproConnector, http: aioresponses
) -> None:
    http.get(
        re.compile(rf"^{re.escape(REST)}/Logon\?.*"),
        status=301,
        headers={
            "Location": f"https://syspro.test/SYSPROWCFService/Rest/Logon?OperatorPassword={OP_PASSWORD}"
        },
    )
    with pytest.raises(PermanentError) as info:
        await connector.get_logon_profile()
    assert "https://syspro.test/SYSPROWCFService/Rest/Logon" in str(info.value)
    assert_no_secret(str(info.value))


async def test_network_errors_never_carry_the_url_query(
    connector: SysproConnector, http: aioresponses, caplog: pytest.LogCaptureFixture
) -> None:
    # aiohttp's own message for a connect timeout contains the whole URL, query included
    leaky = f"Connection timeout to host {REST}/Logon?OperatorPassword={OP_PASSWORD}"
    http.get(
        re.compile(rf"^{re.escape(REST)}/Logon\?.*"),
        exception=aiohttp.ConnectionTimeoutError(leaky),
        repeat=True,
    )
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TransientError) as info:
        await connector.get_logon_profile()
    exc = info.value
    assert exc.code == "TIMEOUT"
    assert "no answer from syspro.test:8101" in str(exc)
    assert exc.__suppress_context__
    for text in (str(exc), repr(exc), caplog.text):
        assert_no_secret(text)


# --------------------------------------------------------------------------------------------
# OData reads
# --------------------------------------------------------------------------------------------


async def test_incremental_read_builds_filter_order_and_select(
    connector: SysproConnector, http: aioresponses
) -> None:
    calls: list[URL] = []
    keys = {"DocumentType": "I"}
    rows = [
        {**keys, "Customer": "0000001", "Invoice": "100001", "InvoiceDate": "2024-03-01T00:00:00Z"},
        {**keys, "Customer": "0000002", "Invoice": "100002", "InvoiceDate": "2024-03-02T00:00:00Z"},
    ]
    answers = iter([collection(rows), collection([])])
    odata(http, "ArInvoice", lambda url: next(answers), calls)
    stream = StreamSpec(
        "ArInvoice", ("Customer", "Invoice", "DocumentType"), "InvoiceDate", select=("InvoiceBal1",)
    )
    pages = await read_all(connector, stream, "2024-03-01T10:15:30.123+02:00")
    assert pages == [rows]
    first = dict(calls[0].query)
    assert first == {
        "$filter": "InvoiceDate ge 2024-03-01T08:15:30Z",
        "$orderby": "InvoiceDate,Customer,Invoice,DocumentType",
        "$select": "InvoiceBal1,Customer,Invoice,DocumentType,InvoiceDate",
        "$top": "1000",
    }
    # a short window without server paging is confirmed by one more (empty) window
    assert dict(calls[1].query)["$skip"] == "2"
    assert len(calls) == 2


async def test_snapshot_read_orders_by_key_only(
    connector: SysproConnector, http: aioresponses
) -> None:
    calls: list[URL] = []
    odata(http, "ArCustomer", lambda url: collection([]), calls)
    odata(http, "ArInvoice", lambda url: collection([]), calls)
    assert await read_all(connector, CUSTOMERS, "2024-01-01") == []
    assert await read_all(connector, INVOICES, None) == []
    assert dict(calls[0].query) == {"$orderby": "Customer", "$top": "1000"}
    assert dict(calls[1].query) == {"$orderby": "Customer,Invoice,DocumentType", "$top": "1000"}


async def test_row_annotations_are_dropped_and_plain_rows_kept_as_sent(
    connector: SysproConnector, http: aioresponses
) -> None:
    rows = [
        {"@odata.etag": 'W/"1"', "Customer": "0000001", "Name": "A@B"},
        {"Customer": "0000002", "Name": "x@y.example"},
    ]
    odata(http, "ArCustomer", lambda url: collection(rows[int(url.query.get("$skip", 0)) :]), [])
    (page,) = await read_all(connector, CUSTOMERS, None)
    assert page == [
        {"Customer": "0000001", "Name": "A@B"},
        {"Customer": "0000002", "Name": "x@y.example"},
    ]


async def test_next_link_paging_reads_every_row_once(
    connector: SysproConnector, http: aioresponses
) -> None:
    calls: list[URL] = []
    table = [{"Customer": f"{n:07d}", "Name": f"C{n}"} for n in range(1, 12)]
    cap = 3

    def answer(url: URL) -> CallbackResult:
        q = url.query
        skip, top = int(q.get("$skip", 0)), int(q["$top"])
        served = table[skip : skip + min(top, cap)]
        more = top > cap and skip + cap < len(table)
        link = None
        if more:  # relative nextLink, as OData allows
            link = f"ArCustomer?$orderby=Customer&$top={top - cap}&$skip={skip + cap}"
        return collection(served, link)

    odata(http, "ArCustomer", answer, calls)
    stream = StreamSpec("ArCustomer", ("Customer",), page_size=5)
    pages = await read_all(connector, stream, None)
    got = [row["Customer"] for page in pages for row in page]
    assert got == [row["Customer"] for row in table]
    assert [len(p) for p in pages] == [3, 2, 3, 2, 1]
    assert [(u.query.get("$skip"), u.query["$top"]) for u in calls] == [
        (None, "5"),
        ("3", "2"),
        ("5", "5"),
        ("8", "2"),
        ("10", "5"),
    ]  # the server signals its cap with nextLink, so the short last window is the end


async def test_silent_row_cap_loses_nothing(connector: SysproConnector, http: aioresponses) -> None:
    calls: list[URL] = []
    table = [{"Customer": f"{n:07d}"} for n in range(1, 8)]

    def answer(url: URL) -> CallbackResult:
        skip = int(url.query.get("$skip", 0))
        return collection(table[skip : skip + 3])  # caps at 3 rows, no nextLink

    odata(http, "ArCustomer", answer, calls)
    pages = await read_all(connector, StreamSpec("ArCustomer", ("Customer",), page_size=5), None)
    assert [r["Customer"] for p in pages for r in p] == [r["Customer"] for r in table]
    assert [u.query.get("$skip") for u in calls] == [None, "3", "6", "7"]


async def test_a_full_window_proves_a_short_one_is_the_end(
    connector: SysproConnector, http: aioresponses
) -> None:
    calls: list[URL] = []
    table = [{"Customer": f"{n:07d}"} for n in range(1, 6)]

    def answer(url: URL) -> CallbackResult:
        skip, top = int(url.query.get("$skip", 0)), int(url.query["$top"])
        return collection(table[skip : skip + top])

    odata(http, "ArCustomer", answer, calls)
    pages = await read_all(connector, StreamSpec("ArCustomer", ("Customer",), page_size=2), None)
    assert [[r["Customer"] for r in p] for p in pages] == [
        ["0000001", "0000002"],
        ["0000003", "0000004"],
        ["0000005"],
    ]
    assert [u.query.get("$skip") for u in calls] == [None, "2", "4"]


async def test_service_ignoring_skip_is_detected(
    connector: SysproConnector, http: aioresponses
) -> None:
    rows = [{"Customer": "0000001"}, {"Customer": "0000002"}]
    odata(http, "ArCustomer", lambda url: collection(rows), [])
    stream = StreamSpec("ArCustomer", ("Customer",), page_size=2)
    with pytest.raises(PermanentError, match="ignores \\$skip"):
        await read_all(connector, stream, None)


async def test_next_link_to_another_host_is_refused(
    connector: SysproConnector, http: aioresponses
) -> None:
    link = "https://evil.test/SYSPRO8Odata/SYSPROOData/ArCustomer?$skip=1"
    odata(http, "ArCustomer", lambda url: collection([{"Customer": "1"}], link), [])
    with pytest.raises(PermanentError, match="another server"):
        await read_all(connector, CUSTOMERS, None)


async def test_html_page_with_status_200_is_a_clear_transient_error(
    connector: SysproConnector, http: aioresponses
) -> None:
    calls: list[URL] = []
    html = "<html><head><title>Service Error</title></head><body>Oops</body></html>"
    odata(
        http,
        "ArCustomer",
        lambda url: CallbackResult(body=html, content_type="text/html"),
        calls,
    )
    with pytest.raises(TransientError) as info:
        await read_all(connector, CUSTOMERS, None)
    assert "SYSPRO OData ArCustomer" in str(info.value)
    assert "HTML page" in str(info.value)
    assert len(calls) == FAST.attempts  # retried, then given up


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"@odata.context": "x"}, "not an OData collection"),
        ([1, 2], "JSON list instead of an object"),
        ({"value": {"Customer": "1"}}, "not an OData collection"),
        ({"value": ["0000001"]}, "a row is a str"),
        ({"value": [{"Name": "no key"}]}, "no field 'Customer'"),
        ({"value": [{"Customer": "1"}], "@odata.nextLink": 5}, "nextLink is a int"),
    ],
)
async def test_malformed_collections_are_permanent_and_name_the_entity_set(
    connector: SysproConnector, http: aioresponses, body: Any, message: str
) -> None:
    calls: list[URL] = []
    odata(
        http,
        "ArCustomer",
        lambda url: CallbackResult(body=json.dumps(body), content_type="application/json"),
        calls,
    )
    with pytest.raises(PermanentError) as info:
        await read_all(connector, CUSTOMERS, None)
    assert "SYSPRO OData ArCustomer" in str(info.value)
    assert message in str(info.value)
    assert len(calls) == 1


async def test_odata_401_says_the_credentials_are_wrong_and_is_not_retried(
    connector: SysproConnector, http: aioresponses
) -> None:
    calls: list[URL] = []
    odata(
        http,
        "ArCustomer",
        lambda url: CallbackResult(status=401, body="<html>401</html>", content_type="text/html"),
        calls,
    )
    with pytest.raises(AuthError) as info:
        await read_all(connector, CUSTOMERS, None)
    text = str(info.value)
    assert "rejected user 'ADMIN' and its password" in text
    assert "odata_password" in text
    assert_no_secret(text)
    assert len(calls) == 1


async def test_odata_403_and_404_are_permanent_with_plain_words(
    connector: SysproConnector, http: aioresponses
) -> None:
    odata(
        http,
        "ArCustomer",
        lambda url: CallbackResult(status=403, body="Forbidden", content_type="text/plain"),
        [],
    )
    error = {"error": {"code": "NotFound", "message": "No HTTP resource was found"}}
    odata(
        http,
        "ArInvoice",
        lambda url: CallbackResult(status=404, body=json.dumps(error)),
        [],
    )
    with pytest.raises(PermanentError, match="operator 'ADMIN' lacks OData access"):
        await read_all(connector, CUSTOMERS, None)
    with pytest.raises(PermanentError) as info:
        await read_all(connector, INVOICES, None)
    text = str(info.value)
    assert "/SYSPRO8Odata/SYSPROOData/ArInvoice does not exist" in text
    assert "odata_url" in text and "No HTTP resource was found" in text


@pytest.mark.parametrize(
    ("status", "headers", "kind"),
    [
        (500, {}, TransientError),
        (503, {}, ThrottledError),
        (429, {"Retry-After": "0"}, ThrottledError),
        (400, {}, PermanentError),
    ],
)
async def test_odata_status_classes(
    connector: SysproConnector,
    http: aioresponses,
    status: int,
    headers: dict[str, str],
    kind: type[Exception],
) -> None:
    calls: list[URL] = []
    error = json.dumps({"error": {"code": "X", "message": f"status {status}"}})
    odata(
        http,
        "ArCustomer",
        lambda url: CallbackResult(status=status, body=error, headers=headers),
        calls,
    )
    with pytest.raises(kind) as info:
        await read_all(connector, CUSTOMERS, None)
    assert type(info.value) is kind
    assert f"status {status}" in str(info.value)
    assert len(calls) == (1 if kind is PermanentError else FAST.attempts)


async def test_transient_failure_then_success_loses_no_page(
    connector: SysproConnector, http: aioresponses
) -> None:
    answers = iter(
        [
            CallbackResult(status=500, body="<html><title>500</title></html>"),
            collection([{"Customer": "0000001"}]),
            collection([]),
        ]
    )
    odata(http, "ArCustomer", lambda url: next(answers), [])
    pages = await read_all(connector, CUSTOMERS, None)
    assert pages == [[{"Customer": "0000001"}]]


async def test_fetch_escapes_values_and_chunks_the_filter(
    connector: SysproConnector, http: aioresponses
) -> None:
    calls: list[URL] = []
    odd = ["O'Brien & Sons", "A+B #1", "50% off"]
    ids = odd + [f"{n:07d}" for n in range(1, 120)]

    def answer(url: URL) -> CallbackResult:
        wanted = re.findall(r"Customer eq '((?:[^']|'')*)'", url.query["$filter"])
        return collection([{"Customer": value.replace("''", "'")} for value in wanted])

    odata(http, "ArCustomer", answer, calls)
    rows = await connector.fetch(CUSTOMERS, [*ids, ids[0]])
    assert sorted(r["Customer"] for r in rows) == sorted(ids)
    assert len(calls) > 1
    first = calls[0].query["$filter"]
    assert first.startswith("Customer eq 'O''Brien & Sons' or Customer eq 'A+B #1' or ")
    for url in calls:
        assert url.query["$orderby"] == "Customer"
        assert len(_encode_query({"$filter": url.query["$filter"]})) <= FETCH_FILTER_MAX_CHARS + 8


async def test_fetch_failure_of_one_chunk_is_raised_after_all_chunks_end(
    connector: SysproConnector, http: aioresponses
) -> None:
    calls: list[URL] = []

    def answer(url: URL) -> CallbackResult:
        if "'0000001'" in url.query["$filter"]:
            return CallbackResult(status=400, body=json.dumps({"error": {"message": "bad"}}))
        return collection([])

    odata(http, "ArCustomer", answer, calls)
    ids = [f"{n:07d}" for n in range(1, 200)]
    with pytest.raises(PermanentError, match="HTTP 400: bad"):
        await connector.fetch(CUSTOMERS, ids)
    assert len(calls) == -(-len(ids) // FETCH_CHUNK_IDS)  # every chunk asked once, none left


async def test_fetch_composite_keys_and_bad_ids(
    connector: SysproConnector, http: aioresponses
) -> None:
    calls: list[URL] = []
    row = {"Customer": "0000001", "Invoice": "100001", "DocumentType": "I", "InvoiceDate": None}
    odata(http, "ArInvoice", lambda url: collection([row]), calls)
    assert await connector.fetch(INVOICES, ["0000001|100001|I"]) == [row]
    assert calls[0].query["$filter"] == (
        "(Customer eq '0000001' and Invoice eq '100001' and DocumentType eq 'I')"
    )
    with pytest.raises(PermanentError, match="does not have the key Customer\\|Invoice"):
        await connector.fetch(INVOICES, ["0000001|100001"])
    assert await connector.fetch(INVOICES, []) == []


async def test_field_names_are_validated_before_they_reach_the_url(
    connector: SysproConnector,
) -> None:
    bad = StreamSpec("ArCustomer", ("Customer eq 'x' or 1",))
    with pytest.raises(PermanentError, match="not a valid OData property"):
        await read_all(connector, bad, None)
    with pytest.raises(PermanentError, match="not a valid OData property"):
        await connector.fetch(StreamSpec("Ar/Customer", ("Customer",)), ["1"])


# --------------------------------------------------------------------------------------------
# Literals and parsing
# --------------------------------------------------------------------------------------------


def test_odata_literals() -> None:
    assert odata_literal("O'Brien") == "'O''Brien'"
    assert odata_literal("''") == "''''''"
    assert odata_literal(None) == "null"
    assert odata_literal(True) == "true"
    assert odata_literal(12) == "12"
    assert odata_literal(date(2024, 2, 29)) == "2024-02-29T00:00:00Z"
    assert odata_literal(datetime(2024, 2, 29, 13, 5, 9, 999)) == "2024-02-29T13:05:09Z"
    sast = timezone(timedelta(hours=2))
    assert odata_literal(datetime(2024, 3, 1, 1, 0, tzinfo=sast)) == "2024-02-29T23:00:00Z"
    with pytest.raises(PermanentError):
        odata_literal(float("nan"))
    with pytest.raises(PermanentError):
        odata_literal(b"\x00")


def test_since_literal() -> None:
    assert since_literal("2024-03-01") == "2024-03-01T00:00:00Z"
    assert since_literal("2024-03-01T10:00:00Z") == "2024-03-01T10:00:00Z"
    assert since_literal("2024-03-01T10:00:00.5+01:00") == "2024-03-01T09:00:00Z"
    assert since_literal(datetime(2024, 3, 1, tzinfo=UTC)) == "2024-03-01T00:00:00Z"
    assert since_literal("2024-13-45") == "'2024-13-45'"
    assert since_literal("ABC' or 1 eq 1") == "'ABC'' or 1 eq 1'"


def test_logon_profile_and_cp1252_bodies() -> None:
    xml = PROFILE_XML.replace("Outdoors Inc", "Müller &amp; Söhne")
    assert parse_logon_profile(_decode(xml.encode("cp1252"), None)).company_name == (
        "Müller & Söhne"
    )
    assert _decode("Ol\u00e9".encode(), "utf-8") == "Olé"
    with pytest.raises(PermanentError, match="not XML"):
        parse_logon_profile("ERRORish text")


# --------------------------------------------------------------------------------------------
# ping
# --------------------------------------------------------------------------------------------


def _route_all_ok(http: aioresponses, calls: Calls) -> None:
    enet(http, "GetVersion", lambda q: "8.0.0.0", calls)
    enet(http, "Logon", lambda q: GUID_1, calls)
    enet(http, "GetLogonProfile", lambda q: PROFILE_XML, calls)


async def test_ping_all_checks_pass(connector: SysproConnector, http: aioresponses) -> None:
    calls: Calls = []
    _route_all_ok(http, calls)
    odata_calls: list[URL] = []
    odata(http, "ArCustomer", lambda url: collection([{"Customer": "1"}]), odata_calls)
    odata(http, "ArInvoice", lambda url: collection([]), odata_calls)
    result = await connector.ping()
    assert result.ok, result.checks
    checks = {c.name: c.detail for c in result.checks}
    assert list(checks) == ["reach", "logon", "profile", "odata"]
    assert "e.net 8.0.0.0" in checks["reach"]
    assert "logged on as operator 'ADMIN'" in checks["logon"]
    assert "Outdoors Inc" in checks["profile"] and "SYSPRO 8.0.043" in checks["profile"]
    assert "ArCustomer, ArInvoice" in checks["odata"]
    assert [dict(u.query) for u in odata_calls] == [{"$top": "1"}, {"$top": "1"}]
    assert "plain HTTP" in checks["reach"]  # syspro.test is not loopback


async def test_ping_wrong_passwords_explain_themselves(
    connector: SysproConnector, http: aioresponses
) -> None:
    calls: Calls = []
    enet(http, "GetVersion", lambda q: "8.0.0.0", calls)
    enet(http, "Logon", lambda q: "ERROR: Invalid operator password", calls)
    odata(
        http,
        "ArCustomer",
        lambda url: CallbackResult(status=401, body="denied", content_type="text/html"),
        [],
    )
    result = await connector.ping()
    assert not result.ok
    checks = {c.name: c for c in result.checks}
    assert checks["reach"].ok
    assert not checks["logon"].ok
    assert "SYSPRO refused the logon of operator 'ADMIN'" in checks["logon"].detail
    assert "Invalid operator password" in checks["logon"].detail
    assert checks["profile"].detail == "not tried: the logon failed"
    assert not checks["odata"].ok and "rejected user 'ADMIN'" in checks["odata"].detail
    for check in result.checks:
        assert_no_secret(check.detail)


async def test_ping_unreachable_host_in_plain_words() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    conn = SysproConnector(
        "syspro-down",
        settings(
            rest_url=f"http://127.0.0.1:{port}/SYSPROWCFService/Rest",
            odata_url=f"http://127.0.0.1:{port}/SYSPRO8Odata/SYSPROOData",
            timeout_s=5,
        ),
        secrets(),
        retry_policy=FAST,
    )
    try:
        result = await conn.ping()
    finally:
        await conn.close()
    checks = {c.name: c for c in result.checks}
    assert not result.ok
    assert f"cannot connect to 127.0.0.1:{port}" in checks["reach"].detail
    assert "nothing listens on that port" in checks["reach"].detail
    assert checks["logon"].detail.startswith("not tried")
    assert not checks["odata"].ok and f"127.0.0.1:{port}" in checks["odata"].detail
    for check in result.checks:
        assert_no_secret(check.detail)


async def test_ping_turns_an_unexpected_exception_into_a_failed_check(
    connector: SysproConnector, http: aioresponses, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: Calls = []
    _route_all_ok(http, calls)
    odata(http, "ArCustomer", lambda url: collection([]), [])
    odata(http, "ArInvoice", lambda url: collection([]), [])

    async def broken(**_: Any) -> Any:
        raise RuntimeError(f"boom {OP_PASSWORD}")

    monkeypatch.setattr(connector, "get_logon_profile", broken)
    result = await connector.ping()
    checks = {c.name: c for c in result.checks}
    assert not result.ok
    assert checks["logon"].ok and checks["odata"].ok
    assert not checks["profile"].ok
    assert checks["profile"].detail.startswith("unexpected error (RuntimeError): boom")
    assert_no_secret(checks["profile"].detail)


# --------------------------------------------------------------------------------------------
# Issue 17: endless paging, OData errors with HTTP 200, echoed credentials
# --------------------------------------------------------------------------------------------

RUNAWAY = 500  # requests: far more than any read below needs


def runaway_guard(answer: Callable[[URL], CallbackResult]) -> Callable[[URL], CallbackResult]:
    """Fails the read once it has made ``RUNAWAY`` requests (today's code loops until killed,
    and without ever yielding to the event loop, so a time limit would not stop it)."""
    served = [0]

    def guarded(url: URL) -> CallbackResult:
        served[0] += 1
        if served[0] > RUNAWAY:
            raise RuntimeError(f"{served[0]} requests and the read goes on")
        return answer(url)

    return guarded


@pytest.mark.parametrize("rows_per_page", [2, 0])
async def test_a_next_link_that_changes_forever_stops_with_a_clear_error(
    connector: SysproConnector, http: aioresponses, rows_per_page: int
) -> None:
    calls: list[URL] = []
    same_rows = [{"Customer": "0000001"}, {"Customer": "0000002"}][:rows_per_page]

    def answer(url: URL) -> CallbackResult:
        token = int(url.query.get("$skiptoken", 0))  # a new link every time, the same rows
        return collection(same_rows, f"ArCustomer?$orderby=Customer&$skiptoken={token + 1}")

    odata(http, "ArCustomer", runaway_guard(answer), calls)
    with pytest.raises(PagingError) as info:
        await read_all(connector, CUSTOMERS, None)
    message = str(info.value)
    assert "connection 'syspro-main', ArCustomer" in message
    assert "loop" in message
    assert info.value.code == "PAGING_LOOP"
    assert len(calls) == (2 if rows_per_page else 1)


async def test_windows_of_rows_already_read_stop_the_read(
    connector: SysproConnector, http: aioresponses
) -> None:
    """A service that answers $skip with rows of the read already (in another order)."""
    calls: list[URL] = []
    table = [{"Customer": f"{n:07d}"} for n in range(1, 5)]

    def answer(url: URL) -> CallbackResult:
        skip = int(url.query.get("$skip", 0))
        return collection(table[:2] if skip == 0 else [table[1], table[0]])

    odata(http, "ArCustomer", runaway_guard(answer), calls)
    stream = StreamSpec("ArCustomer", ("Customer",), page_size=2)
    with pytest.raises(PagingError, match="all read already"):
        await read_all(connector, stream, None)
    assert len(calls) == 2


async def test_the_page_ceiling_is_a_connection_setting(http: aioresponses) -> None:
    conn = SysproConnector(
        "syspro-ceiling", settings(max_pages_per_read=7), secrets(), retry_policy=FAST
    )
    calls: list[URL] = []

    def answer(url: URL) -> CallbackResult:  # new rows on every page, and always more
        token = int(url.query.get("$skiptoken", 0))
        rows = [{"Customer": f"{token:07d}"}]
        return collection(rows, f"ArCustomer?$orderby=Customer&$skiptoken={token + 1}")

    odata(http, "ArCustomer", runaway_guard(answer), calls)
    try:
        with pytest.raises(PagingError) as info:
            await read_all(conn, CUSTOMERS, None)
    finally:
        await conn.close()
    assert info.value.code == "PAGE_LIMIT"
    assert "ceiling of 7 pages" in str(info.value)
    assert "max_pages_per_read" in str(info.value)
    assert len(calls) == 7


@pytest.mark.parametrize(
    "error",
    [
        {"code": "QueryTimeout", "message": "Execution Timeout Expired (SQL Server)"},
        {
            "code": "QueryTimeout",
            "message": {"lang": "en-US", "value": "Execution Timeout Expired"},
        },
    ],
)
async def test_an_odata_error_object_with_http_200_gives_the_servers_message(
    connector: SysproConnector, http: aioresponses, error: dict[str, Any]
) -> None:
    odata(
        http,
        "ArCustomer",
        lambda url: CallbackResult(
            body=json.dumps({"error": error}), content_type="application/json"
        ),
        [],
    )
    with pytest.raises(PermanentError) as info:
        await read_all(connector, CUSTOMERS, None)
    message = str(info.value)
    assert "Execution Timeout Expired" in message
    assert info.value.code == "QueryTimeout"
    assert "service root" not in message


async def test_credentials_echoed_by_odata_are_masked(
    connector: SysproConnector, http: aioresponses
) -> None:
    basic = base64.b64encode(f"ADMIN:{OD_PASSWORD}".encode()).decode()
    echo = f"denied for Authorization: Basic {basic} (password {OD_PASSWORD})"
    body = json.dumps({"error": {"code": "Denied", "message": echo}})
    odata(http, "ArCustomer", lambda url: CallbackResult(status=403, body=body), [])
    with pytest.raises(PermanentError) as info:
        await read_all(connector, CUSTOMERS, None)
    for text in (str(info.value), describe(info.value)):
        assert basic not in text and OD_PASSWORD not in text
        assert "denied for Authorization" in text
