"""Zoho CRM connector edge cases against scripted HTTP answers (aioresponses): answers that are
malformed, endless paging, secrets echoed back, and the token endpoint's failures."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aioresponses import CallbackResult, aioresponses
from aioresponses import core as aioresponses_core
from yarl import URL

from shared import metrics
from shared.connectors.base import SinkRecord, StreamSpec
from shared.connectors.paging import PagingError
from shared.connectors.zoho_crm import ZohoCrmConnector, escape_coql
from shared.failures import FailureClass, TransientError, describe
from shared.logs import JsonFormatter
from shared.retry import RetryPolicy

ACCOUNTS = "https://accounts.zoho.test"
API = "https://www.zohoapis.test"
TOKEN_URL = f"{ACCOUNTS}/oauth/v2/token"
CLIENT_SECRET = "zoho-client-S3cret+/="
REFRESH_TOKEN = "1000.refresh.0123456789abcdef"
ACCESS_TOKEN = "1000.access.fedcba9876543210"
FAST = RetryPolicy(attempts=3, base_delay_s=0.001, max_delay_s=0.005, throttle_delay_s=0.001)
ACCOUNTS_STREAM = StreamSpec("Accounts", ("ERP_Customer_No",), "Modified_Time", page_size=200)


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


def make(name: str = "zoho-test", **settings: Any) -> ZohoCrmConnector:
    return ZohoCrmConnector(
        name,
        {"client_id": "1000.CLIENT", "accounts_url": ACCOUNTS, **settings},
        {"client_secret": CLIENT_SECRET, "refresh_token": REFRESH_TOKEN},
        retry_policy=FAST,
    )


@pytest_asyncio.fixture
async def zoho() -> AsyncIterator[ZohoCrmConnector]:
    conn = make()
    yield conn
    await conn.close()


def token_ok(http: aioresponses, calls: list[str] | None = None) -> None:
    def answer(url: URL, **_: Any) -> CallbackResult:
        if calls is not None:
            calls.append("token")
        body = {"access_token": ACCESS_TOKEN, "api_domain": API, "expires_in": 3600}
        return CallbackResult(body=json.dumps(body), content_type="application/json")

    http.post(TOKEN_URL, callback=answer, repeat=True)


def api(
    http: aioresponses, method: str, path: str, answer: Any, calls: list[URL] | None = None
) -> None:
    def callback(url: URL, **_: Any) -> CallbackResult:
        if calls is not None:
            calls.append(url)
        return answer(url) if callable(answer) else answer

    pattern = re.compile(rf"^{re.escape(API)}/crm/v8{re.escape(path)}(\?.*)?$")
    getattr(http, method.lower())(pattern, callback=callback, repeat=True)


def body(payload: Any, status: int = 200) -> CallbackResult:
    return CallbackResult(status=status, body=json.dumps(payload), content_type="application/json")


def counter(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


# --------------------------------------------------------------------------------------------
# Endless paging (issue 17, item 7)
# --------------------------------------------------------------------------------------------


def rows(first: int, count: int) -> list[dict[str, Any]]:
    return [
        {"id": str(4_000_000 + n), "ERP_Customer_No": f"C{n:05d}", "Modified_Time": "2024-01-01"}
        for n in range(first, first + count)
    ]


class RunawayRead(Exception):
    """The read kept asking (today's code loops until killed, without ever yielding)."""


RUNAWAY = 500  # requests: far more than any test here needs


def paged(next_page: Any) -> Any:
    """Pages 1-10 by number (200 rows each, all new), then page_token pages from
    ``next_page(request number)``: (rows, next token)."""
    served = [0]

    def answer(url: URL) -> CallbackResult:
        served[0] += 1
        if served[0] > RUNAWAY:
            raise RunawayRead(f"{served[0]} requests and the read goes on")
        token = url.query.get("page_token")
        if token is None:
            page = int(url.query["page"])
            data = rows((page - 1) * 200, 200)
            info = {"more_records": True, "next_page_token": "tok-1" if page == 10 else None}
            return body({"data": data, "info": info})
        data, next_token = next_page(served[0])
        return body({"data": data, "info": {"more_records": True, "next_page_token": next_token}})

    return answer


async def read_bounded(zoho: ZohoCrmConnector, stream: StreamSpec) -> list[list[Any]]:
    """The read (bounded by ``RUNAWAY`` requests in the scripted answers)."""
    return [page async for page in zoho.changed_since(stream, None)]


async def test_a_page_token_that_repeats_forever_stops_with_a_clear_error(
    zoho: ZohoCrmConnector, http: aioresponses
) -> None:
    calls: list[URL] = []
    token_ok(http)
    # the same token again and again, each time with rows never seen before
    api(http, "GET", "/Accounts", paged(lambda n: (rows(10_000 + n * 200, 200), "tok-1")), calls)
    with pytest.raises(PagingError) as info:
        await read_bounded(zoho, ACCOUNTS_STREAM)
    message = str(info.value)
    assert "'zoho-test'" in message and "Accounts" in message
    assert "repeats" in message and "loop" in message
    assert info.value.code == "PAGING_LOOP"
    assert classify_of(info.value) is FailureClass.PERMANENT
    assert len(calls) == 11  # pages 1-10, then tok-1, which points to tok-1 again: stop


async def test_token_pages_that_add_nothing_new_stop(
    zoho: ZohoCrmConnector, http: aioresponses
) -> None:
    calls: list[URL] = []
    token_ok(http)
    # a fresh token every time, but the same rows as page 1
    api(http, "GET", "/Accounts", paged(lambda n: (rows(0, 200), f"tok-{n}")), calls)
    with pytest.raises(PagingError, match="all read already"):
        await read_bounded(zoho, ACCOUNTS_STREAM)
    assert len(calls) == 11


async def test_the_page_ceiling_is_a_setting_and_a_clear_error(http: aioresponses) -> None:
    zoho = make(max_pages_per_read=12)
    calls: list[URL] = []
    token_ok(http)
    api(http, "GET", "/Accounts", paged(lambda n: (rows(n * 1000, 200), f"tok-{n}")), calls)
    try:
        with pytest.raises(PagingError) as info:
            await read_bounded(zoho, ACCOUNTS_STREAM)
    finally:
        await zoho.close()
    assert info.value.code == "PAGE_LIMIT"
    assert "12 pages" in str(info.value) and "max_pages_per_read" in str(info.value)
    assert len(calls) == 12


async def test_a_read_that_ends_is_not_disturbed(
    zoho: ZohoCrmConnector, http: aioresponses
) -> None:
    token_ok(http)

    def answer(url: URL) -> CallbackResult:
        token = url.query.get("page_token")
        if token is None:
            page = int(url.query["page"])
            info = {"more_records": True, "next_page_token": "t11" if page == 10 else None}
            return body({"data": rows((page - 1) * 200, 200), "info": info})
        n = int(token[1:])
        more = n < 13
        info = {"more_records": more, "next_page_token": f"t{n + 1}" if more else None}
        return body({"data": rows((n - 1) * 200, 200), "info": info})

    api(http, "GET", "/Accounts", answer)
    pages = await read_bounded(zoho, ACCOUNTS_STREAM)
    assert len(pages) == 13
    assert len({r["id"] for page in pages for r in page}) == 13 * 200


def classify_of(exc: BaseException) -> FailureClass:
    from shared.failures import classify

    return classify(exc)


# --------------------------------------------------------------------------------------------
# Answers validated before they are trusted (item 9)
# --------------------------------------------------------------------------------------------


async def test_upsert_success_without_details_id_fails_that_record_only(
    zoho: ZohoCrmConnector, http: aioresponses
) -> None:
    token_ok(http)
    results = [
        {"code": "SUCCESS", "status": "success", "action": "update", "details": {}},
        {"code": "SUCCESS", "status": "success", "action": "insert", "details": {"id": None}},
        {"code": "SUCCESS", "status": "success", "action": "insert"},
        {"code": "SUCCESS", "status": "success", "action": "insert", "details": {"id": "None"}},
        {"code": "SUCCESS", "status": "success", "action": "insert", "details": {"id": "4001"}},
        {"code": "SUCCESS", "status": "success", "action": "update", "details": {"id": 4002}},
    ]
    api(http, "POST", "/Accounts/upsert", body({"data": results}))
    records = [{"Account_Name": f"A{n}", "ERP_Customer_No": f"C{n}"} for n in range(6)]
    outcomes = await zoho.upsert("Accounts", records, ["ERP_Customer_No"])
    for outcome in outcomes[:4]:
        assert not outcome.ok
        assert outcome.target_id is None
        assert outcome.failure is FailureClass.TRANSIENT  # the next upsert finds it again
        assert outcome.code == "MALFORMED_RESULT"
        assert "details.id" in (outcome.error or "") or "details" in (outcome.error or "")
        assert "None" not in (outcome.target_id or "")
    assert [(o.ok, o.target_id, o.action) for o in outcomes[4:]] == [
        (True, "4001", "insert"),
        (True, "4002", "update"),
    ]


async def test_malformed_result_items_fail_their_records_not_the_batch(
    zoho: ZohoCrmConnector, http: aioresponses
) -> None:
    token_ok(http)
    results = [
        "success",
        {"status": "error", "code": "INVALID_DATA", "message": "bad", "details": "x"},
        {"status": "error", "code": "MANDATORY_NOT_FOUND", "message": "missing", "details": {}},
    ]
    api(http, "POST", "/Accounts/upsert", body({"data": results}, status=207))
    outcomes = await zoho.upsert("Accounts", [{}, {}, {}], ["ERP_Customer_No"])
    assert [(o.ok, o.failure, o.code) for o in outcomes] == [
        (False, FailureClass.TRANSIENT, "MALFORMED_RESULT"),
        (False, FailureClass.TRANSIENT, "MALFORMED_RESULT"),
        (False, FailureClass.PERMANENT, "MANDATORY_NOT_FOUND"),
    ]


@pytest.mark.parametrize(
    "payload",
    [
        {"data": "unexpected", "value": 42, "info": []},
        {"data": [{"id": "1"}], "info": {"more_records": "maybe"}},
        [1, 2],
    ],
)
async def test_a_malformed_read_page_is_a_clear_transient_error(
    zoho: ZohoCrmConnector, http: aioresponses, payload: Any
) -> None:
    token_ok(http)
    api(http, "GET", "/Accounts", body(payload))
    with pytest.raises(TransientError) as info:
        await read_bounded(zoho, ACCOUNTS_STREAM)
    assert "Zoho CRM GET /crm/v8/Accounts: malformed response" in str(info.value)


async def test_find_id_refuses_a_match_without_a_valid_id(
    zoho: ZohoCrmConnector, http: aioresponses
) -> None:
    token_ok(http)
    api(http, "POST", "/coql", body({"data": [{"ERP_Customer_No": "C1", "id": None}]}))
    with pytest.raises(TransientError, match="without a valid id"):
        await zoho.find_ids("Accounts", "ERP_Customer_No", ["C1"])


@pytest.mark.parametrize(
    "payload",
    [
        {"access_token": "", "api_domain": API},
        {"access_token": ACCESS_TOKEN, "api_domain": API, "expires_in": "soon"},
        ["access_token"],
    ],
)
async def test_a_malformed_token_answer_is_not_trusted(
    zoho: ZohoCrmConnector, http: aioresponses, payload: Any
) -> None:
    http.post(TOKEN_URL, payload=payload, repeat=True)
    with pytest.raises(TransientError, match=r"token refresh .*malformed response"):
        await zoho.find_ids("Accounts", "ERP_Customer_No", ["C1"])


# --------------------------------------------------------------------------------------------
# Secrets echoed by the vendor (item 10)
# --------------------------------------------------------------------------------------------


async def test_secrets_echoed_in_an_error_body_are_masked_everywhere(
    zoho: ZohoCrmConnector, http: aioresponses, caplog: pytest.LogCaptureFixture
) -> None:
    token_ok(http)
    echo = {
        "code": "INTERNAL_ERROR",
        "message": f"failed for client_secret={CLIENT_SECRET} with Zoho-oauthtoken {ACCESS_TOKEN}"
        f" (form: client_secret={aiohttp.helpers.quote(CLIENT_SECRET, safe='')})",
        "status": "error",
    }
    api(http, "POST", "/coql", body(echo, status=500))
    caplog.set_level(logging.INFO)
    with pytest.raises(TransientError) as info:
        await zoho.find_ids("Accounts", "ERP_Customer_No", ["C1"])
    exc = info.value
    formatter = JsonFormatter("test")
    log = logging.getLogger("test.connector")
    record = log.makeRecord(log.name, logging.ERROR, __file__, 1, "write failed: %s", (exc,), None)
    texts = {
        "exception": str(exc),
        "describe": describe(exc),
        "retry log lines": "\n".join(r.getMessage() for r in caplog.records),
        "json log line": formatter.format(record),
    }
    assert "trying again" in texts["retry log lines"]
    for where, text in texts.items():
        for secret in (CLIENT_SECRET, ACCESS_TOKEN, "S3cret%2B%2F%3D"):
            assert secret not in text, f"{secret!r} in the {where}: {text}"
        assert "********" in text, where
    assert "INTERNAL_ERROR" in str(exc)  # the rest of the vendor's message is kept


async def test_a_secret_echoed_into_a_record_error_is_masked(
    zoho: ZohoCrmConnector, http: aioresponses
) -> None:
    token_ok(http)
    item = {
        "status": "error",
        "code": "INVALID_DATA",
        "message": f"token {ACCESS_TOKEN} may not write",
        "details": {"api_name": "Account_Name"},
    }
    api(http, "POST", "/Accounts/upsert", body({"data": [item]}, status=400))
    (outcome,) = await zoho.upsert("Accounts", [{"Account_Name": "x"}], ["Account_Name"])
    assert not outcome.ok and ACCESS_TOKEN not in (outcome.error or "")
    assert "********" in (outcome.error or "")


# --------------------------------------------------------------------------------------------
# The token endpoint: one retry layer, and its 200 errors (Low; issue 19)
# --------------------------------------------------------------------------------------------


async def test_an_html_token_endpoint_costs_one_token_call_per_attempt(
    zoho: ZohoCrmConnector, http: aioresponses
) -> None:
    token_calls: list[str] = []

    def html(url: URL, **_: Any) -> CallbackResult:
        token_calls.append("token")
        return CallbackResult(
            body="<html><body>Bad gateway</body></html>", content_type="text/html"
        )

    http.post(TOKEN_URL, callback=html, repeat=True)
    with pytest.raises(TransientError, match="HTML page"):
        await zoho.find_ids("Accounts", "ERP_Customer_No", ["C1"])
    assert len(token_calls) == FAST.attempts  # not attempts squared (retries nested in retries)


async def test_invalid_code_with_http_200_is_a_failed_refresh(http: aioresponses) -> None:
    zoho = make("zoho-invalid-code")
    token_calls: list[str] = []

    def refused(url: URL, **_: Any) -> CallbackResult:
        token_calls.append("token")
        return CallbackResult(body=json.dumps({"error": "invalid_code"}), content_type="text/json")

    http.post(TOKEN_URL, callback=refused, repeat=True)
    name = "zoho-invalid-code"
    failures_before = counter(metrics.TOKEN_REFRESH_FAILURES, name)
    ok_before = counter(metrics.API_CALLS, name, "oauth.token", "200")
    try:
        with pytest.raises(Exception) as info:
            await zoho.find_ids("Accounts", "ERP_Customer_No", ["C1"])
    finally:
        await zoho.close()
    assert "invalid_code" in str(info.value) and "refresh token" in str(info.value)
    assert len(token_calls) == 1  # our credentials are refused: asking again cannot help
    assert counter(metrics.TOKEN_REFRESH_FAILURES, name) == failures_before + 1
    assert counter(metrics.API_CALLS, name, "oauth.token", "200") == ok_before
    assert counter(metrics.API_CALLS, name, "oauth.token", "invalid_code") == 1
    assert counter(metrics.TOKEN_REFRESHES, name) == 0


# --------------------------------------------------------------------------------------------
# The sink renders neutral references and line items (issue 18 point 3)
# --------------------------------------------------------------------------------------------


async def test_upsert_renders_references_and_line_items(
    zoho: ZohoCrmConnector, http: aioresponses
) -> None:
    token_ok(http)
    sent: list[Any] = []

    def answer(url: URL, **kwargs: Any) -> CallbackResult:
        sent.append(kwargs["json"])
        ok = {"status": "success", "action": "insert", "details": {"id": "77"}}
        return body({"data": [ok] * len(kwargs["json"]["data"])})

    http.post(re.compile(rf"^{re.escape(API)}/crm/v8/Invoices/upsert"), callback=answer)
    account = SimpleNamespace(field="Account_Name", target_id="4100")
    unknown = SimpleNamespace(field="Contact_Name", target_id=None)
    product = SimpleNamespace(target_id="9100")
    line = SimpleNamespace(
        product=product, quantity=3.0, unit_price=10.5, description="bolts", fields={"Discount": 1}
    )
    record = SinkRecord({"Subject": "INV-1"}, refs=[account, unknown], lines=[line])  # type: ignore[list-item]
    (outcome,) = await zoho.upsert("Invoices", [record], ["Subject"])
    assert outcome.ok and outcome.target_id == "77"
    (row,) = sent[0]["data"]
    assert row == {
        "Subject": "INV-1",
        "Account_Name": {"id": "4100"},
        "Invoiced_Items": [
            {
                "Product_Name": {"id": "9100"},
                "Quantity": 3.0,
                "List_Price": 10.5,
                "Description": "bolts",
                "Discount": 1,
            }
        ],
    }
    assert record.payload == {"Subject": "INV-1"}  # the caller's record is not changed


def test_coql_literals_are_escaped() -> None:
    assert escape_coql("O'Brien") == "'O\\'Brien'"
    assert escape_coql("a\\b") == "'a\\\\b'"
