"""The emulator kit: OData $filter and query options, rate limits, the token server, control."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from emulators.kit import (
    Clock,
    ConcurrencyCap,
    GrantError,
    RollingBudget,
    RunningEmulator,
    TokenServer,
    TokenStore,
    add_clock_route,
    add_token_control_routes,
    json_body,
    odata,
)
from emulators.kit.tokens import bearer_response

Row = dict[str, Any]

TYPES = {
    "Customer": odata.STRING,
    "Name": odata.STRING,
    "CreditLimit": odata.DECIMAL,
    "Count": odata.INT32,
    "OnHold": odata.BOOLEAN,
    "Modified": odata.DATETIMEOFFSET,
}
ROWS: list[Row] = [
    {
        "Customer": "C1",
        "Name": "O'Brien Traders",
        "CreditLimit": 1000.0,
        "Count": 3,
        "OnHold": False,
        "Modified": datetime(2024, 5, 1, 8, 0),
    },
    {
        "Customer": "C2",
        "Name": "Acme Inc",
        "CreditLimit": 0.0,
        "Count": 12,
        "OnHold": True,
        "Modified": datetime(2015, 12, 31, 12, 0),
    },
    {
        "Customer": "c3",
        "Name": None,
        "CreditLimit": 250.5,
        "Count": 0,
        "OnHold": False,
        "Modified": None,
    },
]


def keys(
    text: str, dialect: odata.Dialect = odata.ODATA_4, case_insensitive: bool = False
) -> list[str]:
    predicate = odata.filter_predicate(
        text,
        odata.dict_properties(TYPES),
        dialect=dialect,
        type_name="Test.Customer",
        case_insensitive=case_insensitive,
    )
    return [row["Customer"] for row in ROWS if predicate(row)]


def refused(text: str, dialect: odata.Dialect = odata.ODATA_4) -> str:
    with pytest.raises(odata.ODataQueryError) as caught:
        keys(text, dialect)
    return caught.value.message


# --- OData $filter ---------------------------------------------------------------------------


def test_comparisons_logic_and_precedence() -> None:
    assert keys("CreditLimit gt 0") == ["C1", "c3"]
    assert keys("CreditLimit ge 250.5 and CreditLimit le 1000m") == ["C1", "c3"]
    assert keys("Count lt 10 or Count eq 12") == ["C1", "C2", "c3"]
    assert keys("100 lt CreditLimit") == ["C1", "c3"]  # a literal on the left is mirrored
    assert keys("Count eq 0 or Count eq 3 and OnHold eq true") == ["c3"]  # and binds tighter
    assert keys("(Count eq 0 or Count eq 3) and OnHold eq false") == ["C1", "c3"]
    assert keys("not (Customer eq 'C1') and not OnHold") == ["c3"]
    assert keys("OnHold") == ["C2"]
    assert keys("Count ne 3") == ["C2", "c3"]


def test_strings_quotes_null_and_case() -> None:
    assert keys("Name eq 'O''Brien Traders'") == ["C1"]
    assert keys("Name eq null") == ["c3"]
    assert keys("Name ne null") == ["C1", "C2"]
    assert keys("Name ne 'Acme Inc'") == ["C1", "c3"]  # null ne 'x' is true
    assert keys("Customer eq 'C3'") == []
    assert keys("Customer eq 'C3'", case_insensitive=True) == ["c3"]
    assert keys("contains(Name,'brien')", case_insensitive=True) == ["C1"]
    assert keys("startswith(Name,'Acme') or endswith(Name,'ers')") == ["C1", "C2"]


def test_iso_typed_datetime_literals_by_dialect() -> None:
    assert keys("Modified ge 2024-05-01T10:00:00+02:00") == ["C1"]  # 08:00 UTC
    assert keys("Modified gt 2024-05-01T08:00:00.0000001Z") == []
    # Sage 300: datetime'...' without offset or seconds; ISO with Z too; v3 functions
    sage = odata.SAGE300
    assert keys("Modified le datetime'2015-12-31T12:00'", sage) == ["C2"]
    assert keys("Modified gt 2016-12-31T12:00:00Z", sage) == ["C1"]
    assert keys("substringof('Inc', Name) and length(Name) eq 8", sage) == ["C2"]
    assert keys("substringof('Inc', Name) eq false", sage) == ["C1", "c3"]
    assert "Syntax error" in refused("Modified gt datetimeoffset'2015-01-01T00:00:00Z'", sage)
    assert "unknown function" in refused("contains(Name,'x')", sage)
    # Acumatica: datetimeoffset'...' with an offset (URL-decoded by the server)
    acu = odata.ACUMATICA
    assert keys("Modified gt datetimeoffset'2024-05-01T11:59:59.999+04:00'", acu) == ["C1"]
    assert "Unrecognized 'Edm.DateTimeOffset'" in refused(
        "Modified gt datetimeoffset'2024-05-01T11:59:59'", acu
    )
    # SYSPRO / plain v4: no typed datetimes, and an offset is required
    assert "Syntax error" in refused("Modified gt datetime'2015-12-31T12:00'")
    assert "time zone offset" in refused("Modified gt 2015-12-31T12:00:00")


def test_in_operator_only_where_the_dialect_speaks_4_01() -> None:
    assert keys("Customer in ('C1', 'c3')", odata.ODATA_401) == ["C1", "c3"]
    assert keys("Count in (0, 12) and not OnHold", odata.ODATA_401) == ["c3"]
    predicate = odata.filter_predicate(
        "Customer in ('c1','C2')",
        odata.dict_properties(TYPES),
        dialect=odata.ODATA_401,
        case_insensitive=True,
    )
    assert [r["Customer"] for r in ROWS if predicate(r)] == ["C1", "C2"]
    assert "Syntax error" in refused("Customer in ('C1')")
    assert "Syntax error" in refused("Customer in ('C1')", odata.SYSPRO)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Nmae eq 'x'", "Could not find a property named 'Nmae' on type 'Test.Customer'"),
        ("Name eq", "Expression expected"),
        ("Name eq 'open", "Syntax error"),
        ("CreditLimit eq 'x'", "'Edm.Decimal' and 'Edm.String'"),
        ("Name eq 5", "'Edm.String' and 'Edm.Int32'"),
        ("Modified gt 2024-01-01", "incompatible types"),
        ("Name gt null", "incompatible types"),
        ("Name EQ 'x'", "case-sensitive"),
        ("tolower(Name) eq 'x'", "unknown function"),
        ("Name eq Customer", "Comparing two properties"),
        ("", "must not be empty"),
        ("Name", "must evaluate to a boolean"),
        ("(Name eq 'x'", "')' expected"),
    ],
)
def test_filter_errors(text: str, message: str) -> None:
    assert message in refused(text)


def test_binary_literals_and_ranges() -> None:
    resolve = odata.properties_of(
        {"TimeStamp": odata.BINARY},
        lambda name: lambda row: row[name],
    )
    rows = [{"TimeStamp": 7}, {"TimeStamp": 9}]

    def coerce(value: Any) -> Any:
        return int.from_bytes(value, "big")

    def stamped(name: str) -> odata.Property | None:
        found = resolve(name)
        return odata.Property(found.name, found.edm, found.get, coerce) if found else None

    nine = base64.b64encode((9).to_bytes(8, "big")).decode()
    equal = odata.filter_predicate(f"TimeStamp eq binary'{nine}'", stamped, dialect=odata.SYSPRO)
    assert [equal(r) for r in rows] == [False, True]
    with pytest.raises(odata.ODataQueryError, match="GreaterThan is not defined"):
        odata.filter_predicate("TimeStamp gt X'0000000000000007'", stamped, dialect=odata.SYSPRO)
    above = odata.filter_predicate(
        "TimeStamp gt X'0000000000000007'", stamped, dialect=odata.SYSPRO, binary_ranges=True
    )
    assert [above(r) for r in rows] == [False, True]


def test_literal_text_round_trips() -> None:
    moment = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
    assert odata.literal_text("O'Brien") == "'O''Brien'"
    assert odata.literal_text(moment, odata.ACUMATICA) == "datetimeoffset'2024-05-01T08:00:00Z'"
    assert odata.literal_text(moment) == "2024-05-01T08:00:00Z"
    assert odata.literal_text(None) == "null" and odata.literal_text(True) == "true"
    obrien = odata.literal_text("O'Brien Traders")
    assert keys(f"Name eq {obrien}") == ["C1"]
    assert keys(f"Modified eq {odata.literal_text(moment, odata.ACUMATICA)}", odata.ACUMATICA) == [
        "C1"
    ]


def test_select_orderby_paging_helpers() -> None:
    known = TYPES.keys()
    assert odata.parse_select("Name, Customer,Name", known) == ("Name", "Customer")
    assert odata.parse_select("*", known) is None
    with pytest.raises(odata.ODataQueryError, match="property named 'Due'"):
        odata.parse_select("Name,Due", known, "T.C")
    order = odata.parse_orderby("Count desc,Customer", known)
    assert order == (("Count", True), ("Customer", False))
    with pytest.raises(odata.ODataQueryError, match="asc or desc"):
        odata.parse_orderby("Name sideways", known)
    rows = odata.order_rows(ROWS, order, lambda name: lambda r: r[name])
    assert [r["Customer"] for r in rows] == ["C2", "C1", "c3"]
    assert odata.int_option({"$top": "5"}, "$top") == 5
    assert odata.int_option({}, "$top") is None
    with pytest.raises(odata.ODataQueryError, match="Invalid value '-1' for \\$skip"):
        odata.int_option({"$skip": "-1"}, "$skip")
    with pytest.raises(odata.ODataQueryError, match="not supported by this service"):
        odata.check_options({"$expand": "Lines"}, {"$filter"})
    odata.check_options({"$filter": "x", "other": "y"}, {"$filter"})

    assert odata.plan_page(12, 0, None, 5) == odata.PagePlan(0, 5, 5, None)
    assert odata.plan_page(12, 10, None, 5) == odata.PagePlan(10, 2, None, None)
    assert odata.plan_page(12, 0, 7, 5) == odata.PagePlan(0, 5, 5, 2)
    assert not odata.plan_page(12, 5, 2, 5).more
    link = odata.next_link(
        "http://h/odata/Customer", [("$filter", "Name eq 'a b'"), ("$skip", "0")], 5, 2
    )
    assert link == "http://h/odata/Customer?$filter=Name%20eq%20'a%20b'&$top=2&$skip=5"


# --- rate limits -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t


def test_concurrency_cap() -> None:
    limit = {"n": 2}
    cap = ConcurrencyCap(lambda: limit["n"])
    assert cap.try_acquire() and cap.try_acquire()
    assert not cap.try_acquire()
    assert (cap.in_flight, cap.peak, cap.rejected) == (2, 2, 1)
    cap.release()
    with cap.slot() as ok:
        assert ok and cap.in_flight == 2
    assert cap.in_flight == 1
    limit["n"] = 1
    with cap.slot() as ok:
        assert not ok
    assert cap.in_flight == 1 and cap.rejected == 2


def test_rolling_budget() -> None:
    clock = FakeClock()
    budget = RollingBudget(clock, window_s=60, limit=10)
    assert budget.try_spend(4) and budget.try_spend(6)
    assert not budget.try_spend(1)
    assert budget.try_spend(1, slack=1)  # an allowed overrun
    assert (budget.used(), budget.remaining(), budget.rejected) == (11, 0, 1)
    clock.t += 30
    assert not budget.try_spend(1)
    clock.t += 30.001  # the first spends leave the window
    assert budget.used() == 0 and budget.try_spend(10)
    budget.set_used(9)
    assert budget.used() == 9 and not budget.would_exceed(1) and budget.would_exceed(2)
    assert budget.as_dict()["total"] == 21
    budget.reset()
    assert budget.used() == 0 and budget.total == 0


# --- tokens ----------------------------------------------------------------------------------


def token_server(clock: FakeClock) -> TokenServer:
    store = TokenStore(clock, ttl_s=3600, max_per_subject=2)
    return TokenServer(
        store,
        clients={"app": "s3cret"},
        refresh_tokens={"r1": "app"},
        users={"svc": "pw"},
        grant_codes={"code1": "app"},
    )


def test_grants_and_refusals() -> None:
    clock = FakeClock()
    server = token_server(clock)
    creds = {"client_id": "app", "client_secret": "s3cret"}
    grant = server.grant({"grant_type": "refresh_token", "refresh_token": "r1", **creds})
    assert grant.access.subject == "r1" and grant.refresh_token is None
    assert server.store.check(grant.access.token) is grant.access
    assert bearer_response(grant)["expires_in"] == 3600
    client = server.grant({"grant_type": "client_credentials", **creds})
    assert client.access.subject == "app"
    password = server.grant(
        {"grant_type": "password", "username": "svc", "password": "pw", **creds}
    )
    assert password.access.subject == "svc"
    code = server.grant({"grant_type": "authorization_code", "code": "code1", **creds})
    assert code.refresh_token and server.refresh_tokens[code.refresh_token] == "app"

    cases = [
        ({"grant_type": "implicit", **creds}, "unsupported_grant_type"),
        (
            {"grant_type": "refresh_token", "refresh_token": "r1", "client_id": "app"},
            "invalid_client",
        ),
        ({"grant_type": "refresh_token", "refresh_token": "nope", **creds}, "invalid_grant"),
        ({"grant_type": "refresh_token", **creds}, "invalid_request"),
        ({"grant_type": "password", "username": "svc", "password": "x", **creds}, "invalid_grant"),
        ({"grant_type": "authorization_code", "code": "code1", **creds}, "invalid_grant"),
    ]
    for params, error in cases:
        with pytest.raises(GrantError) as caught:
            server.grant(params)
        assert caught.value.error == error


def test_token_expiry_caps_and_revocation() -> None:
    clock = FakeClock()
    server = token_server(clock)
    params = {"grant_type": "refresh_token", "refresh_token": "r1"}
    params |= {"client_id": "app", "client_secret": "s3cret"}
    first, second, third = (server.grant(params).access.token for _ in range(3))
    store = server.store
    assert store.check(first) is None  # the third token of the subject evicted the first
    assert store.check(second) and store.check(third)
    clock.t += 3600
    assert store.check(third) is None and store.live_count() == 0
    fresh = server.grant(params).access.token
    other = server.grant({**params, "grant_type": "client_credentials"}).access.token
    assert store.expire(subject="r1") == 1
    assert store.check(fresh) is None and store.check(other)
    assert store.check(other, sliding_ttl_s=10) and store.get(other).expires_at == clock.t + 10
    assert store.expire() == 1
    again = server.grant(params).access.token
    assert server.revoke("r1") and store.check(again) is None
    with pytest.raises(GrantError):
        server.grant(params)
    assert not server.revoke("unknown")


# --- an emulator built from the kit, over real HTTP ------------------------------------------


@pytest.fixture
async def kit_app() -> AsyncIterator[tuple[str, aiohttp.ClientSession, Clock]]:
    clock = Clock()
    store = TokenStore(clock.now, ttl_s=60)
    server = TokenServer(store, clients={"app": "s3cret"}, grants=("client_credentials",))

    async def token(request: web.Request) -> web.Response:
        try:
            grant = server.grant(await TokenServer.read_params(request))
        except GrantError as exc:
            return web.json_response({"error": exc.error}, status=400)
        return web.json_response(bearer_response(grant))

    async def whoami(request: web.Request) -> web.Response:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        access = store.check(value) if scheme == "Bearer" else None
        if access is None:
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response({"client_id": access.client_id})

    async def echo(request: web.Request) -> web.Response:
        return web.json_response(await json_body(request, required=True))

    app = web.Application()
    app.router.add_post("/token", token)
    app.router.add_get("/whoami", whoami)
    app.router.add_post("/_control/echo", echo)
    add_token_control_routes(app, store)
    add_clock_route(app, clock)
    emulator = await RunningEmulator(app).start()
    async with aiohttp.ClientSession() as session:
        try:
            yield emulator.url, session, clock
        finally:
            await emulator.stop()


async def test_kit_token_endpoint_control_and_clock(
    kit_app: tuple[str, aiohttp.ClientSession, Clock],
) -> None:
    url, session, clock = kit_app
    basic = {"Authorization": "Basic " + base64.b64encode(b"app:s3cret").decode()}
    form = {"grant_type": "client_credentials"}
    async with session.post(f"{url}/token", data=form, headers=basic) as r:
        body = await r.json()
        assert (r.status, body["token_type"], body["expires_in"]) == (200, "Bearer", 60)
    headers = {"Authorization": f"Bearer {body['access_token']}"}
    async with session.get(f"{url}/whoami", headers=headers) as r:
        assert (r.status, await r.json()) == (200, {"client_id": "app"})
    async with session.post(f"{url}/_control/advance", json={"seconds": 61}) as r:
        assert await r.json() == {"skew_s": 61.0} and clock.skew == 61
    async with session.get(f"{url}/whoami", headers=headers) as r:
        assert r.status == 401
    async with session.post(f"{url}/token", data=form, headers=basic) as r:
        headers = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
    async with session.post(f"{url}/_control/expire_tokens") as r:
        assert await r.json() == {"expired": 1}
    async with session.get(f"{url}/whoami", headers=headers) as r:
        assert r.status == 401
    bad = {"Authorization": "Basic " + base64.b64encode(b"app:wrong").decode()}
    async with session.post(f"{url}/token", data=form, headers=bad) as r:
        assert (r.status, await r.json()) == (400, {"error": "invalid_client"})
    for payload, status in ((b"[1]", 400), (b"{not json", 400), (b"", 400), (b'{"a": 1}', 200)):
        async with session.post(f"{url}/_control/echo", data=payload) as r:
            assert r.status == status, payload
