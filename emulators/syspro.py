"""SYSPRO 8 emulator: e.net Solutions REST (WCF REST binding) and the SYSPRO OData v4 service.

Shaped after the vendor facts in ``shared/reference/erp_apis.md`` section 1 and after real recorded
e.net responses (SYSPRO 7 e.net, same REST binding):

- e.net REST under ``rest_path``: every call is a GET with query-string parameters; path matching is
  case-insensitive (HTTP.sys/WCF), so ``/Logon`` and ``/logon`` both work. Every answer is HTTP 200
  with ``Content-Type: application/octet-stream``; failures are bodies starting ``ERROR``. Logon
  answers the session id as 32 upper-case hex digits, ``00`` and two trailing spaces (as recorded).
  Business-object XML declares ``Windows-1252`` and is encoded in it; numbers are right-aligned with
  leading spaces, dates are ``YYYY-MM-DD``.
- OData v4 under ``odata_path``: HTTP Basic auth, read-only, entity sets ``ArCustomer`` and
  ``ArInvoice`` named and typed like the SQL tables, server-driven paging with ``@odata.nextLink``.

Facts the reference marks UNVERIFIED are options of :func:`create_app`.

Control API (besides ``/_control/stats``, ``/_control/faults``, ``/_control/reset`` from common):

- ``POST   /_control/seed``                 ``{"customers": N, "invoices": M, "seed": 1}``
- ``GET    /_control/tables/{table}``       all rows (wire format: ISO dates, base64 TimeStamp)
- ``PUT    /_control/tables/{table}``       ``{"rows": [...]}`` insert or replace by key
- ``PATCH  /_control/tables/{table}/{key}`` changed columns; ArInvoice key is ``Cust|Inv|DocType``
- ``DELETE /_control/tables/{table}/{key}`` remove one row
- ``POST   /_control/change``               ``{"table": "ArCustomer", "count": 10, "seed": 3}``
- ``POST   /_control/expire_sessions``      expire every e.net session now
- ``POST   /_control/advance_clock``        ``{"seconds": 1300}`` move the session clock forward
- ``GET    /_control/sessions``             active e.net sessions
"""

from __future__ import annotations

import base64
import binascii
import gc
import json
import operator
import random
import re
import time
import unicodedata
import uuid
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from itertools import compress, repeat
from typing import Any
from xml.sax.saxutils import escape as xml_escape

from aiohttp import web

from emulators.kit import (
    CONTROL_PREFIX,
    CallStats,
    Faults,
    add_common_control_routes,
    fault_middleware,
    odata,
    serve_main,
)

DEFAULT_PORT = 8101
SERVER_HEADER = "Microsoft-HTTPAPI/2.0"
ODATA_NAMESPACE = "SYSPROOData"

# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------

Row = list[Any]
FrozenRow = tuple[Any, ...]
Key = tuple[str, ...]


@dataclass(frozen=True)
class Column:
    """One SQL column. kind: str | dec | dt | bin (rowversion)."""

    name: str
    kind: str
    length: int = 0
    precision: int = 0
    scale: int = 0
    nullable: bool = False

    @property
    def edm_type(self) -> str:
        return {
            "str": "Edm.String",
            "dec": "Edm.Decimal",
            "dt": "Edm.DateTimeOffset",
            "bin": "Edm.Binary",
        }[self.kind]


def _s(name: str, length: int) -> Column:
    return Column(name, "str", length=length)


def _d(name: str, precision: int, scale: int) -> Column:
    return Column(name, "dec", precision=precision, scale=scale)


def _dt(name: str) -> Column:
    return Column(name, "dt", nullable=True)


_TS = Column("TimeStamp", "bin", length=8)

AR_CUSTOMER_COLUMNS: tuple[Column, ...] = (
    _s("Customer", 15),
    _s("Name", 50),
    _s("ShortName", 20),
    _s("CustomerClass", 10),
    _s("Branch", 10),
    _s("Area", 10),
    _s("Salesperson", 20),
    _s("TermsCode", 2),
    _s("Currency", 3),
    _d("CreditLimit", 12, 0),
    _s("CreditStatus", 1),
    _s("CustomerOnHold", 1),
    _s("Telephone", 20),
    _s("Contact", 50),
    _s("Email", 255),
    _s("SoldToAddr1", 40),
    _s("SoldToAddr2", 40),
    _s("SoldToAddr3", 40),
    _s("SoldToAddr4", 40),
    _s("SoldToAddr5", 40),
    _s("SoldPostalCode", 10),
    _s("ShipToAddr1", 40),
    _s("ShipToAddr2", 40),
    _s("ShipToAddr3", 40),
    _s("ShipToAddr4", 40),
    _s("ShipToAddr5", 40),
    _s("ShipPostalCode", 10),
    _dt("DateLastSale"),
    _dt("DateLastPay"),
    _dt("DateCustAdded"),
    _s("TaxExemptNumber", 30),
    _s("PriceCode", 2),
    _TS,
)

AR_INVOICE_COLUMNS: tuple[Column, ...] = (
    _s("Customer", 15),
    _s("Invoice", 20),
    _s("DocumentType", 1),
    _dt("InvoiceDate"),
    _s("SalesOrder", 20),
    _s("CustomerPoNumber", 30),
    _s("Salesperson", 20),
    _s("Branch", 10),
    _s("TermsCode", 2),
    _d("InvoiceBal1", 14, 2),
    _d("InvoiceBal2", 14, 2),
    _d("InvoiceBal3", 14, 2),
    _d("CurrencyValue", 14, 2),
    _s("PostCurrency", 3),
    _d("ConvRate", 12, 6),
    _d("TaxPortion", 14, 2),
    _d("DiscBal", 14, 2),
    _d("InvoiceYear", 4, 0),
    _d("InvoiceMonth", 2, 0),
    _TS,
)

TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "ArCustomer": ("Customer",),
    "ArInvoice": ("Customer", "Invoice", "DocumentType"),
}
TABLE_COLUMNS: dict[str, tuple[Column, ...]] = {
    "ArCustomer": AR_CUSTOMER_COLUMNS,
    "ArInvoice": AR_INVOICE_COLUMNS,
}

# --------------------------------------------------------------------------------------------
# Value helpers
# --------------------------------------------------------------------------------------------

_MIN_DT = datetime(1, 1, 1)
_DT_TEXT: dict[datetime, str] = {}


def format_dt(value: datetime) -> str:
    """Wire form of a datetime column: ``YYYY-MM-DDTHH:MM:SSZ`` (memoised: few distinct values)."""
    text = _DT_TEXT.get(value)
    if text is None:
        text = value.strftime("%Y-%m-%dT%H:%M:%SZ")
        if len(_DT_TEXT) < 200_000:
            _DT_TEXT[value] = text
    return text


def ts_to_b64(ts: int) -> str:
    return base64.b64encode(ts.to_bytes(8, "big")).decode("ascii")


def b64_to_ts(text: str) -> int:
    raw = base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4))
    return int.from_bytes(raw, "big")


def parse_dt_input(value: Any) -> datetime | None:
    """Accepts what tests send: None, ``YYYY-MM-DD`` or ISO 8601 with Z/offset -> naive UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        return datetime(value.year, value.month, value.day)
    else:
        text = str(value).strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        dt = datetime.fromisoformat(text)
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    return dt


def normalise_value(col: Column, value: Any) -> Any:
    """Converts a JSON value sent to the control API into the stored Python value."""
    if col.kind == "str":
        text = "" if value is None else str(value)
        return text[: col.length] if col.length else text
    if col.kind == "dec":
        if value is None or value == "":
            return 0
        number = float(value)
        if col.scale == 0:
            return round(number)
        return round(number, col.scale)
    if col.kind == "dt":
        return parse_dt_input(value)
    raise ValueError(f"column {col.name} is maintained by the server")


# --------------------------------------------------------------------------------------------
# Table store
# --------------------------------------------------------------------------------------------


class Table:
    """Rows as lists (compact) addressed by key tuple; sorts and query results are cached."""

    QUERY_CACHE_SIZE = 16

    def __init__(self, name: str, columns: tuple[Column, ...], key: tuple[str, ...]) -> None:
        self.name = name
        self.columns = columns
        self.names: tuple[str, ...] = tuple(c.name for c in columns)
        self.index: dict[str, int] = {c.name: i for i, c in enumerate(columns)}
        self.by_name: dict[str, Column] = {c.name: c for c in columns}
        self.lower_names: dict[str, str] = {c.name.lower(): c.name for c in columns}
        self.key_names = key
        self.key_index: tuple[int, ...] = tuple(self.index[k] for k in key)
        self.ts_index = self.index["TimeStamp"]
        self.rows: dict[Key, Row] = {}
        self.version = 0
        self._key_order: list[Row] | None = None
        self._sort_cache: dict[tuple[Any, ...], list[Row]] = {}
        self._query_cache: OrderedDict[tuple[Any, ...], list[Row]] = OrderedDict()
        self._converters: list[tuple[str, Callable[[Any], Any]]] = []
        for c in columns:
            if c.kind == "dt":
                self._converters.append((c.name, format_dt))
            elif c.kind == "bin":
                self._converters.append((c.name, ts_to_b64))

    # -- identity -----------------------------------------------------------------------------

    def key_of(self, row: Row) -> Key:
        return tuple(row[i] for i in self.key_index)

    def parse_key_path(self, text: str) -> Key:
        parts = tuple(text.split("|"))
        if len(parts) != len(self.key_names):
            raise web.HTTPBadRequest(
                text=f"{self.name} key is {'|'.join(self.key_names)}, got {text!r}"
            )
        return parts

    def key_path(self, key: Key) -> str:
        return "|".join(key)

    # -- mutation -----------------------------------------------------------------------------

    def touched(self, keys_changed: bool) -> None:
        self.version += 1
        self._sort_cache.clear()
        self._query_cache.clear()
        if keys_changed:
            self._key_order = None

    def replace_all(self, rows: list[Row], presorted: bool = False) -> None:
        """Replaces every row; ``presorted`` promises ``rows`` are already in key order."""
        ki = self.key_index
        keys = (
            zip(map(operator.itemgetter(ki[0]), rows))
            if len(ki) == 1
            else map(operator.itemgetter(*ki), rows)
        )
        self.rows = dict(zip(keys, rows, strict=False))
        self.touched(keys_changed=True)
        if presorted and len(self.rows) == len(rows):
            self._key_order = rows

    def upsert(self, row: Row) -> bool:
        """Returns True when the key was new."""
        key = self.key_of(row)
        existing = self.rows.get(key)
        if existing is not None:
            existing[:] = row  # keep the list object: cached orders hold references to it
            return False
        self.rows[key] = row
        return True

    # -- reading ------------------------------------------------------------------------------

    def key_order(self) -> list[Row]:
        if self._key_order is None:
            self._key_order = sorted(self.rows.values(), key=operator.itemgetter(*self.key_index))
        return self._key_order

    def ordered(self, order: tuple[tuple[str, bool], ...], ci: bool) -> list[Row]:
        """Rows in the requested order; ties (and the default) fall back to key order."""
        if not order:
            return self.key_order()
        cache_key = (order, ci)
        cached = self._sort_cache.get(cache_key)
        if cached is not None:
            return cached
        rows = list(self.key_order())
        for name, desc in reversed(order):
            rows.sort(key=self.sort_key(name, ci), reverse=desc)
        self._sort_cache[cache_key] = rows
        return rows

    def sort_key(self, name: str, ci: bool) -> Callable[[Row], Any]:
        col = self.by_name[name]
        i = self.index[name]
        if col.kind == "str":
            if ci:
                return lambda r: r[i].lower()
            return operator.itemgetter(i)
        if col.kind == "dt":  # SQL Server sorts NULL lowest
            return lambda r: r[i] or _MIN_DT
        return operator.itemgetter(i)

    def query(
        self,
        cache_key: tuple[Any, ...],
        order: tuple[tuple[str, bool], ...],
        predicate: Callable[[Row], bool] | None,
        ci: bool,
    ) -> list[Row]:
        rows = self.ordered(order, ci)
        if predicate is None:
            return rows
        full_key = (cache_key, order, ci)
        cached = self._query_cache.get(full_key)
        if cached is not None:
            self._query_cache.move_to_end(full_key)
            return cached
        result = [r for r in rows if predicate(r)]
        self._query_cache[full_key] = result
        if len(self._query_cache) > self.QUERY_CACHE_SIZE:
            self._query_cache.popitem(last=False)
        return result

    def to_wire(self, row: Row, select: tuple[str, ...] | None = None) -> dict[str, Any]:
        """OData/control JSON: ISO ``...Z`` datetimes, base64 rowversion, numbers as numbers."""
        if select is None:
            out = dict(zip(self.names, row, strict=True))
            for name, conv in self._converters:
                value = out[name]
                if value is not None:
                    out[name] = conv(value)
            return out
        index = self.index
        out = {name: row[index[name]] for name in select}
        for name, conv in self._converters:
            if name in out and out[name] is not None:
                out[name] = conv(out[name])
        return out


# --------------------------------------------------------------------------------------------
# Data generator
# --------------------------------------------------------------------------------------------

_NAME_A = (
    "Acme", "Bayside", "Summit", "Northwind", "Redwood", "Blue Ridge", "Harbor", "Pinnacle",
    "Evergreen", "Granite", "Silverline", "Riverside", "Oakmont", "Lakeshore", "Ironwood",
    "Sunrise", "Keystone", "Frontier", "Cascade", "Meridian", "Highland", "Prairie", "Coastal",
    "Union", "Liberty", "Pioneer", "Atlas", "Crescent", "Falcon", "Sterling", "Müller",
    "Café Olé", "Señor", "Björk", "Dubois & Fils", "O'Brien", "Smith & Sons", "Delta", "Apex",
    "Vanguard",
)  # fmt: skip
_NAME_B = (
    "Cycles", "Outdoor", "Supplies", "Engineering", "Hardware", "Foods", "Logistics",
    "Electrical", "Plumbing", "Textiles", "Marine", "Farm Equipment", "Office Products",
    "Auto Parts", "Building Materials", "Sports", "Medical", "Packaging", "Chemicals", "Tools",
    "Trading", "Distributors", "Industries", "Wholesale", "Retail",
)  # fmt: skip
_NAME_QUALIFIER = (
    "", "", "", "", " North", " South", " Metro", " National", " Pacific", " Central",
)  # fmt: skip
_NAME_SUFFIX = ("Inc", "Ltd", "LLC", "Co", "Corp", "(Pty) Ltd", "GmbH", "Group", "", "")
_FIRST = (
    "James", "Mary", "John", "Patricia", "Robert", "Jennifer", "Michael", "Linda", "William",
    "Elizabeth", "David", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah",
    "Thabo", "Naledi", "José", "Zoë", "Chloé", "Sipho", "Priya", "Wei", "Fatima", "Lars",
)  # fmt: skip
_LAST = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez",
    "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor",
    "Moore", "Jackson", "Martin", "Nkosi", "Dlamini", "Naidoo", "van der Merwe", "Núñez",
    "O'Connor", "Müller", "Chen",
)  # fmt: skip
_STREETS = (
    "Main Street", "Oak Avenue", "Industrial Road", "Park Lane", "Church Street", "Market Street",
    "Commerce Drive", "Harbour Road", "Station Road", "Mill Lane", "Elm Street", "Kingsway",
)  # fmt: skip
_CITIES = (
    ("Springfield", "IL", "627"), ("Portland", "OR", "972"), ("Austin", "TX", "787"),
    ("Columbus", "OH", "432"), ("Denver", "CO", "802"), ("Madison", "WI", "537"),
    ("Richmond", "VA", "232"), ("Raleigh", "NC", "276"), ("Boise", "ID", "837"),
    ("Tucson", "AZ", "857"), ("Albany", "NY", "122"), ("Savannah", "GA", "314"),
)  # fmt: skip
_TERMS = ("30", "30", "30", "30", "60", "60", "CO", "EO", "EO")
_TERMS_DAYS = {"30": 30, "60": 60, "CO": 0, "EO": 45}
_CLASSES = ("", "RT", "RT", "WH", "WH", "DI", "KA")
_BRANCHES = ("10", "10", "10", "20", "20", "30")
_AREAS = ("NTH", "STH", "EST", "WST", "CEN")
_SALESPEOPLE = ("100", "110", "120", "200", "210", "300", "310", "400")
_PRICE_CODES = ("A", "A", "A", "B", "B", "C")
_FOREIGN = ("EUR", "GBP", "CAD", "ZAR")
_FX_RATE = {"EUR": 1.085, "GBP": 1.27, "CAD": 0.735, "ZAR": 0.0545}


def _slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "", ascii_text.lower()) or "mail"


class DataGenerator:
    """Deterministic, realistic ArCustomer/ArInvoice rows (given seed and reference date).

    Bulk generation draws whole "profiles" (address, credit terms, amounts...) from pools built
    once per process and lets ``choices``/``map``/``zip`` do the per-row work in C: the
    benchmark seeds 100,000 customers and 300,000 invoices, and per-row Python is what is slow.
    """

    def __init__(self, seed: int, today: date, local_currency: str) -> None:
        self.rng = random.Random(seed)
        self.today = datetime(today.year, today.month, today.day)
        self.local_currency = local_currency
        self._days = [self.today - timedelta(days=d) for d in range(0, 4000)]

    # -- single values (used by /_control/change) ---------------------------------------------

    def phone(self) -> str:
        n = int(self.rng.random() * 10_000_000_000)
        return f"({200 + n % 800:03d}) {n // 1000 % 900 + 100:03d}-{n // 1_000_000 % 10_000:04d}"

    def person(self) -> str:
        rng = self.rng
        return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"

    def email(self, contact: str, name: str, customer: str) -> str:
        first, _, last = contact.partition(" ")
        domain = _slug(name.split(" ")[0])
        return f"{_slug(first)}.{_slug(last)}.{int(customer or 0)}@{domain}.example.com"

    def address(self) -> tuple[str, str, str, str, str, str]:
        return _random_address(self.rng)

    # -- bulk ---------------------------------------------------------------------------------

    def _customer_columns(self, first_number: int, n: int, rowversion: int) -> list[Any]:
        pools = _pools(self.local_currency)
        rng = self.rng
        rand = rng.random
        ch = rng.choices
        add = operator.add
        numbers = range(first_number, first_number + n)
        name, short, a_index = zip(*ch(pools.names, k=n), strict=True)
        contact, mailbox = zip(*ch(pools.people, k=n), strict=True)
        emails = map(
            add,
            map(add, mailbox, map(".{}".format, numbers)),
            map(pools.domains.__getitem__, a_index),
        )
        email = [e if rand() < 0.92 else "" for e in emails]  # unique: CRMs match on e-mail
        sold = ch(pools.addresses, k=n)
        ship = [
            s if rand() < 0.8 else o for s, o in zip(sold, ch(pools.addresses, k=n), strict=True)
        ]
        return [
            list(map("{:07d}".format, numbers)),
            name,
            short,
            *zip(*ch(pools.profiles, k=n), strict=True),  # CustomerClass .. CustomerOnHold
            list(map(add, ch(pools.phone_prefixes, k=n), ch(pools.pad4, k=n))),
            contact,
            email,
            *zip(*sold, strict=True),
            *zip(*ship, strict=True),
            repeat(None, n),  # DateLastSale
            repeat(None, n),  # DateLastPay
            ch(self._days[180:3680], k=n),
            ch(pools.tax_exempt, k=n),
            ch(_PRICE_CODES, k=n),
            range(rowversion + 1, rowversion + 1 + n),
        ]

    def dataset(
        self, customers: int, invoices: int, rowversion: int
    ) -> tuple[list[FrozenRow], list[FrozenRow], bool]:
        """Customers and invoices as tuples, in key order (invoices only when the bool is True).

        TimeStamps count up from ``rowversion + 1``, customers first, invoices in date order.
        """
        if not customers or not invoices:
            return (
                list(zip(*self._customer_columns(1, customers, rowversion), strict=True)),
                [],
                True,
            )
        ccols = self._customer_columns(1, customers, rowversion)
        rowversion += customers
        n = invoices
        rn = range(n)
        rng = self.rng
        rand = rng.random
        days = self._days
        pools = _pools(self.local_currency)
        # oldest first, so invoice numbers rise with InvoiceDate like a real register
        ages = rng.choices(range(180), k=n)
        ages.sort(reverse=True)
        # a few customers buy much more often than the rest
        cidx = list(map(int, map(operator.mul, rng.choices(pools.skew, k=n), repeat(customers))))
        pick = cidx.__getitem__
        cust, salesperson, branch, terms, currency = (
            list(map(ccols[i].__getitem__, cidx)) for i in (0, 6, 4, 7, 8)
        )
        rate = list(map(_fx_rates(self.local_currency).__getitem__, currency))
        due = list(map(_TERMS_DAYS.__getitem__, terms))
        doc, gross, tax, gross_c = zip(*rng.choices(pools.amounts, k=n), strict=True)
        local_value = [
            g if fx == 1.0 else int(gc * fx + 0.5) / 100
            for g, gc, fx in zip(gross, gross_c, rate, strict=True)
        ]
        rs = [rand() for _ in rn]
        # credit notes: mostly allocated; invoices: cash terms and old ones mostly paid, some
        # part-paid, the rest open (overdue once older than their terms)
        balance = [
            (0.0 if r < 0.7 else lv)
            if d == "C"
            else 0.0
            if t == "CO"
            or (a > du + 30 and r < 0.85)
            or (a > du and r < 0.6)
            or (r < 0.25 and a > 3)
            else int(lv * (20 + 187.5 * r)) / 100
            if r < 0.32
            else lv
            for d, lv, r, t, a, du in zip(doc, local_value, rs, terms, ages, due, strict=True)
        ]
        day_parts = [(dd, dd.year, dd.month) for dd in days[:200]]
        when, year, month = zip(*map(day_parts.__getitem__, ages), strict=True)
        # ages fall along the register, so the last entry per customer is the latest one
        last_sale = dict(zip(cidx, when, strict=True))
        paid = compress(zip(cidx, ages, strict=True), map(operator.eq, balance, repeat(0.0)))
        last_paid = {ci: days[max(0, age - 3)] for ci, age in dict(paid).items()}
        ccols[27] = map(last_sale.get, range(customers))
        ccols[28] = map(last_paid.get, range(customers))
        cust_rows = list(zip(*ccols, strict=True))
        generated = list(
            zip(
                cust,
                map(str, range(100_001, 100_001 + n)),
                doc,
                when,
                map(str, range(400_001, 400_001 + n)),
                rng.choices(pools.po_numbers, k=n),
                salesperson,
                branch,
                terms,
                balance,
                balance,
                repeat(0.0, n),
                gross,
                currency,
                rate,
                tax,
                repeat(0.0, n),
                year,
                month,
                range(rowversion + 1, rowversion + 1 + n),
                strict=True,
            )
        )
        inv_rows = list(map(generated.__getitem__, sorted(rn, key=pick)))
        return cust_rows, inv_rows, 100_000 + n < 1_000_000


def _fx_rates(local_currency: str) -> dict[str, float]:
    return {**_FX_RATE, local_currency: 1.0}


def _random_address(rng: random.Random) -> tuple[str, str, str, str, str, str]:
    city, state, zip3 = rng.choice(_CITIES)
    line2 = f"Suite {rng.randint(100, 999)}" if rng.random() < 0.25 else ""
    return (
        f"{rng.randint(1, 9999)} {rng.choice(_STREETS)}",
        line2,
        city,
        state,
        "USA",
        f"{zip3}{rng.randint(0, 99):02d}",
    )


@dataclass
class _Pools:
    """Realistic value combinations, built once per process (fixed seed) and sampled per row."""

    names: list[tuple[str, str, int]]
    domains: list[str]
    people: list[tuple[str, str]]
    addresses: list[tuple[str, str, str, str, str, str]]
    profiles: list[tuple[Any, ...]]
    phone_prefixes: list[str]
    pad4: list[str]
    tax_exempt: list[str]
    amounts: list[tuple[str, float, float, int]]
    po_numbers: list[str]
    skew: list[float]


_POOLS: dict[str, _Pools] = {}
_POOL_SIZE = 1 << 16


def _pools(local_currency: str) -> _Pools:
    pools = _POOLS.get(local_currency)
    if pools is not None:
        return pools
    rng = random.Random(20240131)
    rand = rng.random
    names = [
        (n, n.upper()[:20], ai)
        for q in _NAME_QUALIFIER
        for ai, a in enumerate(_NAME_A)
        for b in _NAME_B
        for sfx in _NAME_SUFFIX
        if (n := f"{a}{q} {b} {sfx}".strip()[:50])
    ]
    n = _POOL_SIZE
    ch = rng.choices
    hold = ch(("Y", "N"), weights=(3, 97), k=n)
    profiles = list(
        zip(
            ch(_CLASSES, k=n),
            ch(_BRANCHES, k=n),
            ch(_AREAS, k=n),
            ch(_SALESPEOPLE, k=n),
            ch(_TERMS, k=n),
            ch((local_currency, *_FOREIGN), weights=(36, 1, 1, 1, 1), k=n),
            [int(rand() * 50) * (1000 if rand() < 0.9 else 10_000) for _ in range(n)],
            ["1" if h == "Y" else "0" for h in hold],
            hold,
            strict=True,
        )
    )
    docs = ch(("I", "C", "D"), weights=(92, 5, 3), k=n)
    cents = [2500 + int(997_500 * rand() ** 3) for _ in range(n)]
    cents = [-(c // 4) if d == "C" else c for c, d in zip(cents, docs, strict=True)]
    amounts = [
        (d, c / 100, int(c * 0.076212 + 0.5) / 100, c) for d, c in zip(docs, cents, strict=True)
    ]
    cities = ch(_CITIES, k=n)
    addresses = [
        (
            f"{int(rand() * 9999) + 1} {street}",
            f"Suite {int(rand() * 900) + 100}" if rand() < 0.25 else "",
            city,
            state,
            "USA",
            f"{zip3}{int(rand() * 100):02d}",
        )
        for street, (city, state, zip3) in zip(ch(_STREETS, k=n), cities, strict=True)
    ]
    pools = _Pools(
        names=names,
        domains=[f"@{_slug(a)}.example.com" for a in _NAME_A],
        people=[(f"{f} {la}", f"{_slug(f)}.{_slug(la)}") for f in _FIRST for la in _LAST],
        addresses=addresses,
        profiles=profiles,
        phone_prefixes=[
            f"({int(rand() * 800) + 200}) {int(rand() * 900) + 100}-" for _ in range(n)
        ],
        pad4=[f"{i:04d}" for i in range(10_000)],
        tax_exempt=[
            f"EX{rng.randint(0, 999_999):06d}" if rand() < 0.07 else "" for _ in range(4096)
        ],
        amounts=amounts,
        po_numbers=[
            f"PO-{rng.randint(10_000, 99_999)}" if rand() < 0.55 else "" for _ in range(4096)
        ],
        skew=[rand() ** 1.7 for _ in range(n)],
    )
    _POOLS[local_currency] = pools
    return pools


# --------------------------------------------------------------------------------------------
# OData $filter / $orderby / $select (the kit's parser, SYSPRO's dialect and error body)
# --------------------------------------------------------------------------------------------


class ODataError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _query_error(message: str) -> ODataError:
    return ODataError(400, "BadRequest", f"The query specified in the URI is not valid. {message}")


_COMPARE_OPS = odata.COMPARE_OPS


def _rowversion(value: Any) -> Any:
    return int.from_bytes(value, "big") if isinstance(value, bytes) else value


def _properties(table: Table) -> odata.Resolver:
    """The columns of a table as OData properties (rows are lists)."""
    cached: dict[str, odata.Property] = {}

    def resolve(name: str) -> odata.Property | None:
        found = cached.get(name)
        if found is None:
            col = table.by_name.get(name)
            if col is None:
                return None
            found = cached[name] = odata.Property(
                name,
                col.edm_type,
                operator.itemgetter(table.index[name]),
                _rowversion if col.kind == "bin" else None,
            )
        return found

    return resolve


def _type_name(table: Table) -> str:
    return f"{ODATA_NAMESPACE}.{table.name}"


def compile_filter(table: Table, text: str, ci: bool, binary_ranges: bool) -> Callable[[Row], bool]:
    """``$filter`` text -> a row predicate; raises ODataError (400) for a bad filter."""
    try:
        return odata.filter_predicate(
            text,
            _properties(table),
            dialect=odata.SYSPRO,
            type_name=_type_name(table),
            case_insensitive=ci,
            binary_ranges=binary_ranges,
        )
    except odata.ODataQueryError as exc:
        raise _query_error(exc.message) from None


def parse_orderby(table: Table, text: str) -> tuple[tuple[str, bool], ...]:
    try:
        return odata.parse_orderby(text, table.by_name, _type_name(table))
    except odata.ODataQueryError as exc:
        raise _query_error(exc.message) from None


def parse_select(table: Table, text: str) -> tuple[str, ...] | None:
    try:
        return odata.parse_select(text, table.by_name, _type_name(table))
    except odata.ODataQueryError as exc:
        raise _query_error(exc.message) from None


# --------------------------------------------------------------------------------------------
# e.net COMFND
# --------------------------------------------------------------------------------------------


class EnetError(Exception):
    """Answered as HTTP 200 with body ``ERROR: <message>``."""


_XML_DECL_RE = re.compile(r"^\s*<\?xml[^>]*\?>")
_COMFND_OPS = {"EQ": "eq", "NE": "ne", "GT": "gt", "GE": "ge", "LT": "lt", "LE": "le"}


def _enet_value(col: Column, text: str) -> Any:
    text = text.strip() if col.kind != "str" else text
    try:
        if col.kind == "str":
            return text
        if col.kind == "dec":
            return float(text)
        if col.kind == "dt":
            return parse_dt_input(text)
        if text.lower().startswith("0x"):
            return int(text[2:], 16)
        return b64_to_ts(text)
    except (ValueError, binascii.Error) as exc:
        raise EnetError(f"Invalid value '{text}' for column '{col.name}'") from exc


def _comfnd_predicate(
    table: Table, where: ET.Element | None, ci: bool
) -> Callable[[Row], bool] | None:
    if where is None:
        return None
    tokens: list[Any] = []
    for n, expr in enumerate(where.findall("Expression")):
        column = (expr.findtext("Column") or "").strip()
        condition = (expr.findtext("Condition") or "").strip().upper()
        value_text = expr.findtext("Value") or ""
        and_or = (expr.findtext("AndOr") or "And").strip().lower() or "and"
        if and_or not in ("and", "or"):
            raise EnetError(f"Invalid AndOr '{and_or}' in Where expression {n + 1}")
        name = table.lower_names.get(column.lower())
        if name is None:
            raise EnetError(f"Column '{column}' not found in table '{table.name}'")
        if condition not in _COMFND_OPS:
            raise EnetError(f"Invalid condition '{condition}' in Where expression {n + 1}")
        col = table.by_name[name]
        value = _enet_value(col, value_text)
        if n:
            tokens.append(and_or)
        tokens.extend("(" for ch in (expr.findtext("OpenBracket") or "") if ch == "(")
        tokens.append(_comfnd_compare(table, col, _COMFND_OPS[condition], value, ci))
        tokens.extend(")" for ch in (expr.findtext("CloseBracket") or "") if ch == ")")
    if not tokens:
        return None
    pos = 0

    def parse_or() -> Callable[[Row], bool]:
        nonlocal pos
        parts = [parse_and()]
        while pos < len(tokens) and tokens[pos] == "or":
            pos += 1
            parts.append(parse_and())
        return parts[0] if len(parts) == 1 else (lambda r: any(p(r) for p in parts))

    def parse_and() -> Callable[[Row], bool]:
        nonlocal pos
        parts = [parse_primary()]
        while pos < len(tokens) and tokens[pos] == "and":
            pos += 1
            parts.append(parse_primary())
        return parts[0] if len(parts) == 1 else (lambda r: all(p(r) for p in parts))

    def parse_primary() -> Callable[[Row], bool]:
        nonlocal pos
        if pos >= len(tokens):
            raise EnetError("Unbalanced brackets in Where clause")
        tok = tokens[pos]
        pos += 1
        if tok == "(":
            inner = parse_or()
            if pos >= len(tokens) or tokens[pos] != ")":
                raise EnetError("Unbalanced brackets in Where clause")
            pos += 1
            return inner
        if callable(tok):
            return tok  # type: ignore[no-any-return]
        raise EnetError("Unbalanced brackets in Where clause")

    pred = parse_or()
    if pos != len(tokens):
        raise EnetError("Unbalanced brackets in Where clause")
    return pred


def _comfnd_compare(
    table: Table, col: Column, op: str, value: Any, ci: bool
) -> Callable[[Row], bool]:
    i = table.index[col.name]
    fn = _COMPARE_OPS[op]
    if col.kind == "str":
        if ci:
            lowered = value.lower()
            return lambda r: fn(r[i].lower(), lowered)
        return lambda r: fn(r[i], value)
    if value is None:
        return (lambda r: r[i] is None) if op == "eq" else (lambda r: r[i] is not None)
    return lambda r: (x := r[i]) is not None and fn(x, value)


def _enet_text(col: Column, value: Any) -> str:
    """Business-object XML rendering: right-aligned numbers, ``YYYY-MM-DD`` dates."""
    if value is None:
        return ""
    if col.kind == "str":
        return xml_escape(value)
    if col.kind == "dec":
        if col.scale == 0:
            return f"{int(value):>{col.precision + 1}d}"
        return f"{value:>{col.precision + 2}.{col.scale}f}"
    if col.kind == "dt":
        return value.strftime("%Y-%m-%d")
    return ts_to_b64(value)


_FREEZE_ROWS = 50_000
_DATASET_CACHE: dict[tuple[Any, ...], tuple[list[FrozenRow], list[FrozenRow], bool]] = {}


def _generated(
    params: tuple[int, int, int, date, str], rowversion: int
) -> tuple[list[Row], list[Row], bool]:
    """Generated rows with TimeStamps after ``rowversion``: mutable copies of a cached dataset.

    Benchmarks and tests re-seed the same dataset many times; copying rows is several times
    cheaper than generating them. Only the most recent dataset is kept.
    """
    cached = _DATASET_CACHE.get(params)
    if cached is None:
        seed, customers, invoices, today, currency = params
        cached = DataGenerator(seed, today, currency).dataset(customers, invoices, 0)
        _DATASET_CACHE.clear()
        _DATASET_CACHE[params] = cached
    cust, inv, inv_sorted = cached
    copies = []
    for rows in (cust, inv):
        copy = list(map(list, rows))
        for row in copy:
            row[-1] += rowversion  # TimeStamp is the last column of both tables
        copies.append(copy)
    return copies[0], copies[1], inv_sorted


# --------------------------------------------------------------------------------------------
# The emulator
# --------------------------------------------------------------------------------------------


@dataclass
class Session:
    user_id: str
    operator: str
    company: str
    created: float
    last_used: float


_IIS_503 = (
    '<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.01//EN""http://www.w3.org/TR/html4/strict.dtd">\r\n'
    "<HTML><HEAD><TITLE>Service Unavailable</TITLE>\r\n"
    '<META HTTP-EQUIV="Content-Type" Content="text/html; charset=us-ascii"></HEAD>\r\n'
    "<BODY><h2>Service Unavailable</h2>\r\n"
    "<hr><p>HTTP Error 503. The service is unavailable.</p>\r\n"
    "</BODY></HTML>\r\n"
)
_IIS_500 = (
    '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN" '
    '"http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">\r\n'
    '<html xmlns="http://www.w3.org/1999/xhtml">\r\n<head>\r\n'
    "<title>500 - Internal server error.</title>\r\n</head>\r\n<body>\r\n"
    '<div id="header"><h1>Server Error</h1></div>\r\n<div id="content">\r\n'
    '<div class="content-container"><fieldset>\r\n'
    "<h2>500 - Internal server error.</h2>\r\n"
    "<h3>There is a problem with the resource you are looking for, and it cannot be displayed."
    "</h3>\r\n</fieldset></div>\r\n</div>\r\n</body>\r\n</html>\r\n"
)
_IIS_401 = (
    '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN" '
    '"http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">\r\n'
    '<html xmlns="http://www.w3.org/1999/xhtml">\r\n<head>\r\n'
    "<title>401 - Unauthorized: Access is denied due to invalid credentials.</title>\r\n"
    "</head>\r\n<body>\r\n"
    '<div id="header"><h1>Server Error</h1></div>\r\n<div id="content">\r\n'
    '<div class="content-container"><fieldset>\r\n'
    "<h2>401 - Unauthorized: Access is denied due to invalid credentials.</h2>\r\n"
    "<h3>You do not have permission to view this directory or page using the credentials "
    "that you supplied.</h3>\r\n</fieldset></div>\r\n</div>\r\n</body>\r\n</html>\r\n"
)
_IIS_404 = (
    "<HTML><HEAD><TITLE>Not Found</TITLE></HEAD><BODY><h2>Not Found</h2>"
    "<hr><p>HTTP Error 404. The requested resource is not found.</p></BODY></HTML>\r\n"
)

ODATA_JSON = "application/json; odata.metadata=minimal; odata.streaming=true; charset=utf-8"
INVALID_SESSION = "The UserId '{user_id}' is invalid or the session has expired"


class SysproEmulator:
    """State and handlers; :func:`create_app` wires it into an aiohttp application.

    Options (all keyword-only; UNVERIFIED vendor facts are marked *):

    - ``operators``: operator code -> password accepted by Logon (default ``{"ADMIN": "syspro"}``;
      codes compare case-insensitively, passwords exactly).
    - ``companies``: company id -> company password (default ``{"EDU1": ""}``); ``company_id`` /
      ``company_password`` add one more (or the only one when ``companies`` is not given).
    - ``company_name``: CompanyName in GetLogonProfile.
    - ``odata_users``: Basic-auth user -> password for OData (default ``{"ADMIN": "syspro"}``).
    - ``rest_path`` (``/SYSPROWCFService/Rest``), ``odata_path``* (``/SYSPRO8Odata/SYSPROOData``).
    - ``max_rows_per_request``* (5000): OData server-driven page size.
    - ``session_idle_timeout_s``* (1200): e.net sessions die after this much inactivity.
    - ``quote_guid``* (False): Logon answers the session id JSON-quoted.
    - ``one_session_per_operator``* (True): a second Logon of an operator kills the first.
    - ``max_sessions``* (None): e.net licence seats; Logon answers ERROR when all are taken.
    - ``odata_binary_range_filters``* (False): allow gt/ge/lt/le on Edm.Binary (TimeStamp);
      ASP.NET OData only defines eq/ne for byte arrays.
    - ``case_insensitive_collation``* (True): string compare/sort like SQL Server ``*_CI_AS``.
    - ``local_currency`` ("USD"), ``customers`` (200), ``invoices`` (1000), ``seed`` (1),
      ``today`` (None = the current UTC date): the initial generated data.
    - ``syspro_version`` / ``enet_version``: GetLogonProfile and GetVersion strings.
    - ``clock``: monotonic seconds for session idling (tests may also use advance_clock).
    """

    def __init__(
        self,
        *,
        operators: Mapping[str, str] | None = None,
        companies: Mapping[str, str] | None = None,
        company_id: str | None = None,
        company_password: str = "",
        company_name: str = "Outdoors Inc",
        odata_users: Mapping[str, str] | None = None,
        rest_path: str = "/SYSPROWCFService/Rest",
        odata_path: str = "/SYSPRO8Odata/SYSPROOData",
        max_rows_per_request: int = 5000,
        session_idle_timeout_s: float = 1200.0,
        quote_guid: bool = False,
        one_session_per_operator: bool = True,
        max_sessions: int | None = None,
        odata_binary_range_filters: bool = False,
        case_insensitive_collation: bool = True,
        local_currency: str = "USD",
        customers: int = 200,
        invoices: int = 1000,
        seed: int = 1,
        today: date | None = None,
        syspro_version: str = "8.0.043",
        enet_version: str = "8.0.0.0",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.operators = {k.upper(): v for k, v in (operators or {"ADMIN": "syspro"}).items()}
        if companies is None:
            companies = {company_id or "EDU1": company_password}
        elif company_id is not None:
            companies = {**companies, company_id: company_password}
        self.companies = {k.upper(): v for k, v in companies.items()}
        self.company_name = company_name
        self.odata_users = {k.upper(): v for k, v in (odata_users or {"ADMIN": "syspro"}).items()}
        self.rest_path = "/" + rest_path.strip("/")
        self.odata_path = "/" + odata_path.strip("/")
        self.max_rows = max_rows_per_request
        self.idle_timeout = session_idle_timeout_s
        self.quote_guid = quote_guid
        self.one_session_per_operator = one_session_per_operator
        self.max_sessions = max_sessions
        self.binary_ranges = odata_binary_range_filters
        self.ci = case_insensitive_collation
        self.local_currency = local_currency
        self.today = today
        self.syspro_version = syspro_version
        self.enet_version = enet_version
        self._clock = clock
        self._clock_offset = 0.0

        self.faults = Faults()
        self.call_stats = CallStats()
        self.tables: dict[str, Table] = {
            name: Table(name, TABLE_COLUMNS[name], TABLE_KEYS[name]) for name in TABLE_KEYS
        }
        self.sessions: dict[str, Session] = {}
        self._rowversion = 0x7D0
        self.counters: dict[str, int] = {}
        self._reset_counters()
        if customers or invoices:
            self.seed(customers, invoices, seed)

    # -- clock, counters, rowversion ----------------------------------------------------------

    def now(self) -> float:
        return self._clock() + self._clock_offset

    def _reset_counters(self) -> None:
        self.counters = dict.fromkeys(
            (
                "logons",
                "logon_failures",
                "logoffs",
                "sessions_replaced",
                "sessions_expired",
                "invalid_session_calls",
                "enet_queries",
                "enet_rows_served",
                "odata_requests",
                "odata_auth_failures",
                "odata_errors",
                "odata_rows_served",
            ),
            0,
        )

    def next_rowversion(self) -> int:
        self._rowversion += 1
        return self._rowversion

    def extra_stats(self) -> dict[str, Any]:
        self._purge_expired()
        c = self.counters
        return {
            **c,
            "active_sessions": len(self.sessions),
            "rows_served": c["enet_rows_served"] + c["odata_rows_served"],
            "rows": {name: len(t.rows) for name, t in self.tables.items()},
            "rowversion": self._rowversion,
        }

    def reset(self) -> None:
        """common /_control/reset: forget data, sessions and counters (rowversion keeps rising)."""
        for table in self.tables.values():
            table.replace_all([])
        self.sessions.clear()
        self._clock_offset = 0.0
        self._reset_counters()

    # -- data ---------------------------------------------------------------------------------

    def seed(self, customers: int, invoices: int, seed: int) -> dict[str, int]:
        """Replaces both tables with generated data (deterministic for seed, counts and date)."""
        if customers < 0 or invoices < 0:
            raise ValueError("counts must not be negative")
        today = self.today or datetime.now(UTC).date()
        gc_was_enabled = gc.isenabled()
        gc.disable()  # hundreds of thousands of new lists would trigger needless full collections
        try:
            for table in self.tables.values():  # free the old rows inside the no-GC window
                table.replace_all([])
            cust_rows, inv_rows, inv_sorted = _generated(
                (seed, customers, invoices, today, self.local_currency), self._rowversion
            )
            self._rowversion += len(cust_rows) + len(inv_rows)
            self.tables["ArCustomer"].replace_all(cust_rows, presorted=True)
            self.tables["ArInvoice"].replace_all(inv_rows, presorted=inv_sorted)
            if len(cust_rows) + len(inv_rows) >= _FREEZE_ROWS:
                # Long-lived, acyclic rows: keep the cyclic GC from walking them again and again
                # (a full collection over 400,000 rows stalls a request for most of a second).
                gc.freeze()
        finally:
            if gc_was_enabled:
                gc.enable()
        return {"ArCustomer": len(cust_rows), "ArInvoice": len(inv_rows)}

    def table(self, name: str) -> Table:
        table = self.tables.get(name)
        if table is None:
            raise web.HTTPNotFound(text=f"unknown table {name!r}; known: {sorted(self.tables)}")
        return table

    def row_from_json(self, table: Table, data: Mapping[str, Any], base: Row | None) -> Row:
        unknown = [k for k in data if k not in table.index]
        if unknown:
            raise web.HTTPBadRequest(text=f"unknown {table.name} columns: {unknown}")
        row: Row = list(base) if base is not None else [None] * len(table.columns)
        for i, col in enumerate(table.columns):
            if col.kind == "bin":
                continue
            if col.name in data:
                try:
                    row[i] = normalise_value(col, data[col.name])
                except (TypeError, ValueError) as exc:
                    raise web.HTTPBadRequest(text=f"bad value for {col.name}: {exc}") from exc
            elif base is None:
                row[i] = normalise_value(col, None)
        row[table.ts_index] = self.next_rowversion()
        return row

    def change(self, table: Table, count: int, seed: int) -> list[str]:
        """Realistic edits to ``count`` random rows; every edited row gets a new TimeStamp."""
        rng = random.Random(seed)
        gen = DataGenerator(seed, self.today or datetime.now(UTC).date(), self.local_currency)
        gen.rng = rng
        idx = table.index
        if table.name == "ArInvoice":
            bal = idx["InvoiceBal1"]
            candidates = [
                k for k, r in table.rows.items() if r[bal] > 0 and r[idx["DocumentType"]] != "C"
            ]
        else:
            candidates = list(table.rows)
        chosen = rng.sample(candidates, min(count, len(candidates)))
        for key in chosen:
            row = table.rows[key]
            if table.name == "ArInvoice":
                self._pay_invoice(table, row, rng)
            else:
                self._edit_customer(table, row, rng, gen)
            row[table.ts_index] = self.next_rowversion()
        if chosen:
            table.touched(keys_changed=False)
        return [table.key_path(k) for k in chosen]

    def _pay_invoice(self, table: Table, row: Row, rng: random.Random) -> None:
        idx = table.index
        balance = row[idx["InvoiceBal1"]]
        if rng.random() < 0.7:
            new_balance = 0.0
        else:
            new_balance = round(balance * rng.uniform(0.1, 0.9), 2)
        row[idx["InvoiceBal1"]] = new_balance
        row[idx["InvoiceBal2"]] = new_balance

    def _edit_customer(
        self, table: Table, row: Row, rng: random.Random, gen: DataGenerator
    ) -> None:
        idx = table.index
        kind = rng.choice(("phone", "credit", "hold", "contact", "address", "salesperson"))
        if kind == "phone":
            old = row[idx["Telephone"]]
            while (new := gen.phone()) == old:
                pass
            row[idx["Telephone"]] = new
        elif kind == "credit":
            old_limit = row[idx["CreditLimit"]]
            row[idx["CreditLimit"]] = max(0, old_limit + rng.choice((-5, -2, 2, 5, 10)) * 1000)
            if row[idx["CreditLimit"]] == old_limit:
                row[idx["CreditLimit"]] = old_limit + 1000
        elif kind == "hold":
            on_hold = row[idx["CustomerOnHold"]] != "Y"
            row[idx["CustomerOnHold"]] = "Y" if on_hold else "N"
            row[idx["CreditStatus"]] = "1" if on_hold else "0"
        elif kind == "contact":
            contact = gen.person()
            row[idx["Contact"]] = contact
            row[idx["Email"]] = gen.email(contact, row[idx["Name"]], row[idx["Customer"]])
        elif kind == "address":
            addr = gen.address()
            for n in range(5):
                row[idx[f"SoldToAddr{n + 1}"]] = addr[n]
            row[idx["SoldPostalCode"]] = addr[5]
        else:
            current = row[idx["Salesperson"]]
            row[idx["Salesperson"]] = rng.choice([s for s in _SALESPEOPLE if s != current])

    # -- sessions -----------------------------------------------------------------------------

    def _purge_expired(self) -> None:
        now = self.now()
        for user_id, session in list(self.sessions.items()):
            if now - session.last_used > self.idle_timeout:
                del self.sessions[user_id]
                self.counters["sessions_expired"] += 1

    def _session(self, user_id: str) -> Session:
        session = self.sessions.get(user_id.strip())
        if session is not None and self.now() - session.last_used > self.idle_timeout:
            del self.sessions[session.user_id]
            self.counters["sessions_expired"] += 1
            session = None
        if session is None:
            self.counters["invalid_session_calls"] += 1
            raise EnetError(INVALID_SESSION.format(user_id=user_id.strip()))
        session.last_used = self.now()
        return session

    def logon(self, params: Mapping[str, str]) -> str:
        operator_code = params.get("Operator", "").strip()
        password = params.get("OperatorPassword", "")
        company = params.get("CompanyId", "").strip()
        company_password = params.get("CompanyPassword", "")
        if not operator_code:
            raise EnetError("Operator code not supplied")
        expected = self.operators.get(operator_code.upper())
        if expected is None:
            raise EnetError(f"Invalid operator '{operator_code}'")
        if password != expected:
            raise EnetError("Invalid operator password")
        expected_company = self.companies.get(company.upper())
        if expected_company is None:
            raise EnetError(f"Invalid company '{company}'")
        if company_password != expected_company:
            raise EnetError("Invalid company password")
        self._purge_expired()
        op_upper = operator_code.upper()
        if self.one_session_per_operator:
            for user_id, session in list(self.sessions.items()):
                if session.operator == op_upper:
                    del self.sessions[user_id]
                    self.counters["sessions_replaced"] += 1
        if self.max_sessions is not None and len(self.sessions) >= self.max_sessions:
            raise EnetError(
                "Maximum number of e.net licensed users exceeded - "
                f"{len(self.sessions)} of {self.max_sessions} in use"
            )
        user_id = uuid.uuid4().hex.upper() + "00"
        now = self.now()
        self.sessions[user_id] = Session(user_id, op_upper, company.upper(), now, now)
        self.counters["logons"] += 1
        return user_id + "  "

    # -- HTTP plumbing ------------------------------------------------------------------------

    def fault_response(self, request: web.Request, kind: str) -> web.StreamResponse:
        if kind == "throttle":
            return web.Response(
                status=503,
                text=_IIS_503,
                content_type="text/html",
                charset="us-ascii",
            )
        return web.Response(
            status=500,
            text=_IIS_500,
            content_type="text/html",
        )

    async def server_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """e.net REST is self-hosted on HTTP.sys; the OData service runs in IIS/ASP.NET."""
        lower = request.path.lower()
        if lower.startswith(CONTROL_PREFIX):
            return
        if lower.startswith(self.odata_path.lower()):
            response.headers["Server"] = "Microsoft-IIS/10.0"
            response.headers["X-Powered-By"] = "ASP.NET"
        else:
            response.headers["Server"] = SERVER_HEADER

    def route_name(self, request: web.Request) -> str:
        path = request.path
        lower = path.lower()
        if lower.startswith(self.rest_path.lower() + "/"):
            return "REST " + lower[len(self.rest_path) + 1 :]
        if lower.startswith(self.odata_path.lower()):
            rest = path[len(self.odata_path) :].strip("/")
            entity = re.split(r"[(/]", rest, maxsplit=1)[0] if rest else "service"
            return f"ODATA {request.method} {entity}"
        return f"{request.method} {path}"

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        lower = request.path.lower()
        if lower.startswith(self.rest_path.lower() + "/"):
            return self.handle_rest(request, lower[len(self.rest_path) + 1 :].rstrip("/"))
        odata_lower = self.odata_path.lower()
        if lower == odata_lower or lower.startswith(odata_lower + "/"):
            return self.handle_odata(request, request.path[len(self.odata_path) :])
        return web.Response(status=404, text=_IIS_404, content_type="text/html")

    # -- e.net REST ---------------------------------------------------------------------------

    def _enet(self, body: str | bytes) -> web.Response:
        data = body if isinstance(body, bytes) else body.encode("cp1252", "xmlcharrefreplace")
        return web.Response(
            body=data,
            content_type="application/octet-stream",
        )

    def handle_rest(self, request: web.Request, op: str) -> web.Response:
        if request.method != "GET":
            return web.Response(
                status=405,
                text="Method not allowed.",
                content_type="text/html",
                headers={"Allow": "GET"},
            )
        params = request.query
        try:
            if op == "logon":
                try:
                    user_id = self.logon(params)
                except EnetError:
                    self.counters["logon_failures"] += 1
                    raise
                return self._enet(json.dumps(user_id) if self.quote_guid else user_id)
            if op == "getversion":
                return self._enet(self.enet_version)
            user_id = params.get("UserId", "")
            if op == "logoff":
                self._session(user_id)
                del self.sessions[user_id.strip()]
                self.counters["logoffs"] += 1
                return self._enet("0")
            if op == "getlogonprofile":
                return self._enet(self._logon_profile(self._session(user_id)))
            if op == "query/query":
                self._session(user_id)
                business_object = params.get("BusinessObject", "").strip().upper()
                if business_object != "COMFND":
                    raise EnetError(
                        f"Business object '{business_object}' is not available in this emulator"
                    )
                return self._enet(self._comfnd(params.get("XmlIn", "")))
            if op in (
                "query/browse",
                "query/fetch",
                "query/nextkey",
                "query/previouskey",
                "setup/add",
                "setup/update",
                "setup/delete",
                "transaction/build",
                "transaction/post",
            ):
                self._session(user_id)
                raise EnetError(f"Method '{op}' is not implemented by this emulator")
        except EnetError as exc:
            return self._enet(f"ERROR: {exc}")
        return web.Response(
            status=404,
            text=f"Endpoint not found. ({op})",
            content_type="text/html",
        )

    def _logon_profile(self, session: Session) -> str:
        today = self.today or datetime.now(UTC).date()
        fields = {
            "CompanyName": self.company_name,
            "CompanyId": session.company,
            "OperatorCode": session.operator,
            "OperatorGroup": "ADMIN" if session.operator == "ADMIN" else "USERS",
            "OperatorEmailAddress": f"{session.operator.lower()}@example.com",
            "OperatorLanguageCode": "EN",
            "SystemLanguage": "05",
            "AccountingDate": today.isoformat(),
            "CompanyDate": today.isoformat(),
            "DefaultArBranch": "10",
            "DefaultApBranch": "10",
            "DefaultBank": "FNB",
            "DefaultWarehouse": "FG",
            "DefaultCustomer": "",
            "SystemSiteId": "0",
            "SystemNationalityCode": "USA",
            "LocalCurrencyCode": self.local_currency,
            "CurrencyDescription": "US Dollar" if self.local_currency == "USD" else "",
            "DecimalFormat": "1",
            "DateFormat": "01",
            "FunctionalRole": "",
            "DatabaseType": "SQL",
            "SysproVersion": self.syspro_version,
            "EnetVersion": self.enet_version,
            "SysproServerBitWidth": "64",
        }
        body = "".join(
            f"<{k}>{xml_escape(v)}</{k}>\n" if v else f"<{k}/>\n" for k, v in fields.items()
        )
        return (
            '<?xml version="1.0" encoding="Windows-1252"?>\n'
            f"<LogonProfile>\n{body}</LogonProfile>\n"
        )

    def _comfnd(self, xml_in: str) -> str:
        self.counters["enet_queries"] += 1
        try:
            root = ET.fromstring(_XML_DECL_RE.sub("", xml_in, count=1))
        except ET.ParseError as exc:
            raise EnetError(f"XML parse error in XmlIn: {exc}") from exc
        table_name = (root.findtext("TableName") or "").strip()
        table_key = next((t for t in self.tables if t.lower() == table_name.lower()), None)
        if table_key is None:
            raise EnetError(f"Table '{table_name}' not found")
        table = self.tables[table_key]

        def column_names(parent: ET.Element | None) -> list[str]:
            names: list[str] = []
            if parent is None:
                return names
            for el in parent.findall("Column"):
                requested = (el.text or "").strip()
                if not requested:
                    continue
                name = table.lower_names.get(requested.lower())
                if name is None:
                    raise EnetError(f"Column '{requested}' not found in table '{table.name}'")
                names.append(name)
            return names

        columns = column_names(root.find("Columns")) or list(table.names)
        order_names = column_names(root.find("OrderBy"))
        return_rows_text = (root.findtext("ReturnRows") or "").strip()
        try:
            return_rows = int(return_rows_text) if return_rows_text else 0
        except ValueError as exc:
            raise EnetError(f"Invalid ReturnRows '{return_rows_text}'") from exc
        predicate = _comfnd_predicate(table, root.find("Where"), self.ci)
        order = tuple((name, False) for name in order_names)
        where_xml = ET.tostring(root.find("Where"), "unicode") if predicate else ""
        rows = table.query(("comfnd", where_xml), order, predicate, self.ci)
        if return_rows > 0:
            rows = rows[:return_rows]
        cols = [(table.by_name[c], table.index[c]) for c in columns]
        out = [
            '<?xml version="1.0" encoding="Windows-1252"?>\n',
            f"<{table.name} Language='05' Language2='EN' CssStyle='' DecFormat='1' "
            f"DateFormat='01' Role='01' Version='{self.syspro_version}' "
            "OperatorPrimaryRole='   '>\n",
            "<HeaderDetails>\n",
            f"<TableName>{table.name}</TableName>\n",
            "<Columns>\n",
            *(f"<Column>{c}</Column>\n" for c in columns),
            "</Columns>\n",
        ]
        if order_names:
            out += [
                "<OrderBy>\n",
                *(f"<Column>{c}</Column>\n" for c in order_names),
                "</OrderBy>\n",
            ]
        out.append("</HeaderDetails>\n")
        for row in rows:
            out.append("<Row>\n")
            for col, i in cols:
                text = _enet_text(col, row[i])
                out.append(f"<{col.name}>{text}</{col.name}>\n" if text else f"<{col.name}/>\n")
            out.append("</Row>\n")
        out.append(f"<RowsReturned>{len(rows):>8d}</RowsReturned>\n</{table.name}>\n ")
        self.counters["enet_rows_served"] += len(rows)
        return "".join(out)

    # -- OData --------------------------------------------------------------------------------

    def _odata_error(
        self, err: ODataError, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        self.counters["odata_errors"] += 1
        body = json.dumps({"error": {"code": err.code, "message": err.message}})
        return web.Response(
            status=err.status,
            text=body,
            content_type="application/json",
            headers={"OData-Version": "4.0", **(headers or {})},
        )

    def _odata_json(self, payload: Mapping[str, Any]) -> web.Response:
        return web.Response(
            body=json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode(),
            headers={"Content-Type": ODATA_JSON, "OData-Version": "4.0"},
        )

    def _authorised(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic" or not token:
            return False
        try:
            user, sep, password = base64.b64decode(token.strip()).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        if not sep:
            return False
        expected = self.odata_users.get(user.upper())
        return expected is not None and password == expected

    def handle_odata(self, request: web.Request, rest: str) -> web.Response:
        self.counters["odata_requests"] += 1
        if not self._authorised(request):
            self.counters["odata_auth_failures"] += 1
            return web.Response(
                status=401,
                text=_IIS_401,
                content_type="text/html",
                headers={
                    "WWW-Authenticate": f'Basic realm="{request.host.split(":")[0]}"',
                },
            )
        try:
            if request.method != "GET":
                raise ODataError(
                    405,
                    "MethodNotAllowed",
                    f"The requested resource does not support http method '{request.method}'.",
                )
            base = f"{request.scheme}://{request.host}{self.odata_path}"
            rest = rest.strip("/")
            if rest == "":
                return self._odata_json(
                    {
                        "@odata.context": f"{base}/$metadata",
                        "value": [{"name": n, "kind": "EntitySet", "url": n} for n in self.tables],
                    }
                )
            if rest == "$metadata":
                return web.Response(
                    text=self.metadata_xml(),
                    content_type="application/xml",
                    headers={"OData-Version": "4.0"},
                )
            m = re.fullmatch(r"([A-Za-z]+)(?:\((.*)\))?(/\$count)?", rest)
            if m is None or m.group(1) not in self.tables:
                raise ODataError(
                    404,
                    "NotFound",
                    f"No HTTP resource was found that matches the request URI '{request.url}'.",
                )
            table = self.tables[m.group(1)]
            if m.group(2) is not None:
                if m.group(3):
                    raise ODataError(404, "NotFound", "$count is not valid on a single entity.")
                return self._odata_entity(request, base, table, m.group(2))
            return self._odata_collection(request, base, table, count_only=bool(m.group(3)))
        except ODataError as err:
            return self._odata_error(err, {"Allow": "GET"} if err.status == 405 else None)

    def _check_options(self, request: web.Request, allowed: set[str]) -> None:
        try:
            odata.check_options(request.query, allowed)
        except odata.ODataQueryError as exc:
            raise _query_error(exc.message) from None

    def _odata_entity(
        self, request: web.Request, base: str, table: Table, key_text: str
    ) -> web.Response:
        self._check_options(request, {"$select", "$format"})
        key = self._parse_entity_key(table, key_text)
        row = table.rows.get(key)
        if row is None:
            raise ODataError(404, "NotFound", f"No {table.name} entity with key ({key_text}).")
        select = (
            parse_select(table, request.query["$select"]) if "$select" in request.query else None
        )
        entity = table.to_wire(row, select)
        self.counters["odata_rows_served"] += 1
        return self._odata_json(
            {"@odata.context": f"{base}/$metadata#{table.name}/$entity", **entity}
        )

    def _parse_entity_key(self, table: Table, text: str) -> Key:
        single = re.fullmatch(r"'((?:[^']|'')*)'", text.strip())
        if single and len(table.key_names) == 1:
            return (single.group(1).replace("''", "'"),)
        values: dict[str, str] = {}
        for m in re.finditer(r"\s*([A-Za-z]+)\s*=\s*'((?:[^']|'')*)'\s*(?:,|$)", text):
            values[m.group(1)] = m.group(2).replace("''", "'")
        if set(values) != set(table.key_names):
            raise _query_error(
                f"The key '({text})' does not match the key of {table.name} "
                f"({', '.join(table.key_names)})."
            )
        return tuple(values[k] for k in table.key_names)

    def _odata_collection(
        self, request: web.Request, base: str, table: Table, count_only: bool
    ) -> web.Response:
        q = request.query
        self._check_options(
            request, {"$filter", "$select", "$orderby", "$top", "$skip", "$count", "$format"}
        )
        top = self._int_option(q, "$top")
        skip = self._int_option(q, "$skip") or 0
        want_count = q.get("$count", "false").lower()
        if want_count not in ("true", "false"):
            raise _query_error(f"'{q['$count']}' is not a valid value for $count.")
        select = parse_select(table, q["$select"]) if "$select" in q else None
        order = parse_orderby(table, q["$orderby"]) if "$orderby" in q else ()
        filter_text = q.get("$filter")
        predicate = None
        if filter_text is not None:
            predicate = compile_filter(table, filter_text, self.ci, self.binary_ranges)
        matched = table.query(("odata", filter_text), order, predicate, self.ci)
        if count_only:
            return web.Response(
                text=str(len(matched)),
                content_type="text/plain",
                headers={"OData-Version": "4.0"},
            )
        plan = odata.plan_page(len(matched), skip, top, self.max_rows)
        page = matched[plan.start : plan.start + plan.size]
        context = f"{base}/$metadata#{table.name}"
        if select is not None:
            context += f"({','.join(select)})"
        payload: dict[str, Any] = {"@odata.context": context}
        if want_count == "true":
            payload["@odata.count"] = len(matched)
        payload["value"] = [table.to_wire(r, select) for r in page]
        if plan.next_skip is not None:
            payload["@odata.nextLink"] = self._next_link(
                request, base, table, plan.next_skip, plan.next_top
            )
        self.counters["odata_rows_served"] += len(page)
        return self._odata_json(payload)

    @staticmethod
    def _int_option(q: Mapping[str, str], name: str) -> int | None:
        try:
            return odata.int_option(q, name)
        except odata.ODataQueryError as exc:
            raise _query_error(exc.message) from None

    def _next_link(
        self, request: web.Request, base: str, table: Table, skip: int, top: int | None
    ) -> str:
        return odata.next_link(f"{base}/{table.name}", request.query.items(), skip, top)

    def metadata_xml(self) -> str:
        types: list[str] = []
        for table in self.tables.values():
            props = []
            for col in table.columns:
                attrs = [f'Name="{col.name}"', f'Type="{col.edm_type}"']
                if not col.nullable:
                    attrs.append('Nullable="false"')
                if col.kind == "str" and col.length:
                    attrs.append(f'MaxLength="{col.length}"')
                if col.kind == "bin":
                    attrs.append('MaxLength="8"')
                if col.kind == "dec":
                    attrs.append(f'Precision="{col.precision}" Scale="{col.scale}"')
                if col.kind == "dt":
                    attrs.append('Precision="3"')
                props.append(f"        <Property {' '.join(attrs)}/>")
            keys = "".join(f'<PropertyRef Name="{k}"/>' for k in table.key_names)
            types.append(
                f'      <EntityType Name="{table.name}">\n'
                f"        <Key>{keys}</Key>\n" + "\n".join(props) + "\n      </EntityType>"
            )
        sets = "\n".join(
            f'        <EntitySet Name="{n}" EntityType="{ODATA_NAMESPACE}.{n}"/>'
            for n in self.tables
        )
        return (
            '<?xml version="1.0" encoding="utf-8"?>\n'
            '<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx">\n'
            "  <edmx:DataServices>\n"
            f'    <Schema Namespace="{ODATA_NAMESPACE}" '
            'xmlns="http://docs.oasis-open.org/odata/ns/edm">\n'
            + "\n".join(types)
            + '\n      <EntityContainer Name="Container">\n'
            + sets
            + "\n      </EntityContainer>\n    </Schema>\n  </edmx:DataServices>\n</edmx:Edmx>\n"
        )

    # -- control API --------------------------------------------------------------------------

    def add_control_routes(self, app: web.Application) -> None:
        add_common_control_routes(app, self.faults, self.call_stats, self.extra_stats, self.reset)
        p = CONTROL_PREFIX

        async def seed(request: web.Request) -> web.Response:
            body = await _json_body(request)
            customers = _non_negative(body, "customers", 200)
            invoices = _non_negative(body, "invoices", 1000)
            return web.json_response(self.seed(customers, invoices, _integer(body, "seed", 1)))

        async def get_table(request: web.Request) -> web.Response:
            table = self.table(request.match_info["table"])
            rows = [table.to_wire(r) for r in table.key_order()]
            return web.json_response({"table": table.name, "count": len(rows), "rows": rows})

        async def put_table(request: web.Request) -> web.Response:
            table = self.table(request.match_info["table"])
            body = await _json_body(request)
            rows = body.get("rows")
            if not isinstance(rows, list):
                raise web.HTTPBadRequest(text='expected {"rows": [...]}')
            inserted = replaced = 0
            keys: list[str] = []
            new_keys = False
            for data in rows:
                if not isinstance(data, dict) or any(k not in data for k in table.key_names):
                    raise web.HTTPBadRequest(text=f"each row needs {table.key_names}")
                row = self.row_from_json(table, data, None)
                if table.upsert(row):
                    inserted += 1
                    new_keys = True
                else:
                    replaced += 1
                keys.append(table.key_path(table.key_of(row)))
            table.touched(keys_changed=new_keys)
            return web.json_response({"inserted": inserted, "replaced": replaced, "keys": keys})

        async def patch_row(request: web.Request) -> web.Response:
            table = self.table(request.match_info["table"])
            key = table.parse_key_path(request.match_info["key"])
            row = table.rows.get(key)
            if row is None:
                raise web.HTTPNotFound(text=f"no {table.name} row {request.match_info['key']!r}")
            changes = await _json_body(request)
            changes.pop("TimeStamp", None)
            unknown = [k for k in changes if k not in table.index]
            if unknown:
                raise web.HTTPBadRequest(text=f"unknown {table.name} columns: {unknown}")
            if any(k in table.key_names and changes[k] != row[table.index[k]] for k in changes):
                raise web.HTTPBadRequest(text="key columns cannot be changed")
            row[:] = self.row_from_json(table, changes, row)
            table.touched(keys_changed=False)
            return web.json_response(table.to_wire(row))

        async def delete_row(request: web.Request) -> web.Response:
            table = self.table(request.match_info["table"])
            key = table.parse_key_path(request.match_info["key"])
            if table.rows.pop(key, None) is None:
                raise web.HTTPNotFound(text=f"no {table.name} row {request.match_info['key']!r}")
            table.touched(keys_changed=True)
            return web.json_response({"deleted": request.match_info["key"]})

        async def change(request: web.Request) -> web.Response:
            body = await _json_body(request)
            table = self.table(str(body.get("table", "ArCustomer")))
            count = _non_negative(body, "count", 10)
            keys = self.change(table, count, _integer(body, "seed", 0))
            return web.json_response({"table": table.name, "count": len(keys), "keys": keys})

        async def expire_sessions(_: web.Request) -> web.Response:
            n = len(self.sessions)
            self.sessions.clear()
            self.counters["sessions_expired"] += n
            return web.json_response({"expired": n})

        async def advance_clock(request: web.Request) -> web.Response:
            body = await _json_body(request)
            try:
                self._clock_offset += float(body.get("seconds", 0))
            except (TypeError, ValueError) as exc:
                raise web.HTTPBadRequest(text="seconds must be a number") from exc
            return web.json_response({"offset_s": self._clock_offset})

        async def sessions(_: web.Request) -> web.Response:
            self._purge_expired()
            now = self.now()
            return web.json_response(
                [
                    {
                        "user_id": s.user_id,
                        "operator": s.operator,
                        "company": s.company,
                        "idle_s": round(now - s.last_used, 3),
                    }
                    for s in self.sessions.values()
                ]
            )

        app.router.add_post(f"{p}/seed", seed)
        app.router.add_get(f"{p}/tables/{{table}}", get_table)
        app.router.add_put(f"{p}/tables/{{table}}", put_table)
        app.router.add_patch(f"{p}/tables/{{table}}/{{key}}", patch_row)
        app.router.add_delete(f"{p}/tables/{{table}}/{{key}}", delete_row)
        app.router.add_post(f"{p}/change", change)
        app.router.add_post(f"{p}/expire_sessions", expire_sessions)
        app.router.add_post(f"{p}/advance_clock", advance_clock)
        app.router.add_get(f"{p}/sessions", sessions)


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except json.JSONDecodeError as exc:
        raise web.HTTPBadRequest(text=f"invalid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="expected a JSON object")
    return body


def _integer(body: Mapping[str, Any], name: str, default: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise web.HTTPBadRequest(text=f"{name} must be an integer")
    return value


def _non_negative(body: Mapping[str, Any], name: str, default: int) -> int:
    value = _integer(body, name, default)
    if value < 0:
        raise web.HTTPBadRequest(text=f"{name} must not be negative")
    return value


EMULATOR_KEY = web.AppKey("syspro_emulator", SysproEmulator)


def create_app(**options: Any) -> web.Application:
    """The SYSPRO 8 emulator as an aiohttp app; options are those of :class:`SysproEmulator`.

    The emulator object is available as ``app[EMULATOR_KEY]``.
    """
    emulator = SysproEmulator(**options)
    middleware = fault_middleware(
        emulator.faults, emulator.call_stats, emulator.fault_response, emulator.route_name
    )
    # HTTP.sys accepts request lines up to 16 KB; e.net puts whole XML documents in the URL.
    app = web.Application(middlewares=[middleware], handler_args={"max_line_size": 16384})
    app[EMULATOR_KEY] = emulator
    emulator.add_control_routes(app)
    app.router.add_route("*", "/{path:.*}", emulator.dispatch)
    app.on_response_prepare.append(emulator.server_headers)
    return app


def main() -> None:
    serve_main(create_app, DEFAULT_PORT)


if __name__ == "__main__":
    main()
