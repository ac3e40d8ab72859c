"""Zoho CRM emulator: the accounts server and REST API v8 of one datacenter, on the wire.

One aiohttp app serves the accounts server (``/oauth/v2/token``, ``/oauth/v2/token/revoke``) and
the CRM API (``/crm/v8/...``). It is shaped after the vendor facts in
``reference/zoho_crm.md``; facts marked UNVERIFIED there are options of :func:`create_app`.

API (``Authorization: Zoho-oauthtoken <token>``):

- ``GET  /crm/v8/org``, ``GET /crm/v8/users?type=CurrentUser``
- ``GET  /crm/v8/settings/modules``, ``GET /crm/v8/settings/fields?module=X``
- ``GET|POST|PUT|DELETE /crm/v8/{module}`` (list / insert / update / delete by ``ids``)
- ``GET|PUT|DELETE /crm/v8/{module}/{id}`` (``X-EXTERNAL: Module.Field`` for external values)
- ``POST /crm/v8/{module}/upsert``, ``GET /crm/v8/{module}/search``,
  ``GET /crm/v8/{module}/deleted``
- ``POST /crm/v8/coql``
- ``POST|GET|PUT|PATCH|DELETE /crm/v8/actions/watch``

Control API (never faulted, counted or charged), besides ``stats``, ``faults`` and ``reset``
from :mod:`emulators.common`:

- ``POST /_control/fields``            ``{"module", "fields": [{"api_name", "data_type", ...}]}``
- ``POST /_control/seed``              ``{"module", "records": [...]}`` or ``{"module", "count"}``
- ``GET  /_control/records/{module}``  full records (``?limit=&offset=``)
- ``GET|PATCH|DELETE /_control/records/{module}/{id}``  read / change / delete as a CRM user
- ``POST /_control/expire_tokens``     (alias ``/_control/token_expire``) expire access tokens
- ``POST /_control/refresh_tokens``    ``{"refresh_token", "client_id"}`` register one
- ``GET|POST|DELETE /_control/reject`` ``{"module", "field", "value"}``: such records fail
- ``GET|POST /_control/config``        read / change options at run time
- ``POST /_control/advance``           ``{"seconds": n}`` move the emulator clock forward
- ``GET  /_control/channels``, ``GET /_control/notifications``  channels and deliveries
- ``GET  /_control/counts``            records per module and write calls: what ``stats`` says
  without its duplicate count, which walks every record (for progress checks during a load)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from dataclasses import fields as dc_fields
from datetime import UTC, date, datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
from aiohttp import web

from emulators.common import (
    CONTROL_PREFIX,
    CallStats,
    Faults,
    add_common_control_routes,
    fault_middleware,
    serve_main,
)

DEFAULT_CLIENT_ID = "1000.EMULATORCLIENT0000000000000000"
DEFAULT_CLIENT_SECRET = "emulator-client-secret"
DEFAULT_REFRESH_TOKEN = "1000.emulatorrefresh.emulatortoken"
DEFAULT_SCOPE = (
    "ZohoCRM.modules.ALL,ZohoCRM.settings.ALL,ZohoCRM.notifications.ALL,"
    "ZohoCRM.coql.READ,ZohoCRM.org.READ,ZohoCRM.users.READ,ZohoSearch.securesearch.READ"
)
TOKEN_THROTTLE_MESSAGE = (
    "You have made too many requests continuously. Please try again after some time."
)
TOO_MANY_REQUESTS_MESSAGE = (
    "Number of API requests for the 24 hour period is exceeded or the concurrency limit of "
    "the user for the app is exceeded."
)

API_VERSION = "v8"
MAX_WRITE_RECORDS = 100
MAX_FIELDS_PARAM = 50
MAX_PER_PAGE = 200
DISCRETE_PAGE_LIMIT = 2000
TOKEN_PAGE_LIMIT = 100_000
PAGE_TOKEN_TTL_S = 24 * 3600
MAX_PAGE_TOKENS = 100_000
CREDIT_WINDOW_S = 24 * 3600
MAX_CHANNEL_EXPIRY_S = 7 * 24 * 3600
DEFAULT_CHANNEL_EXPIRY_S = 3600
MAX_WATCH_TOKEN = 50
MAX_SEARCH_CRITERIA = 10
SORTABLE = ("id", "Created_Time", "Modified_Time")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}

TEXT_TYPES = {"text", "textarea", "website", "autonumber"}
STRING_TYPES = TEXT_TYPES | {"email", "phone", "picklist"}
NUMBER_TYPES = {"integer", "bigint", "double", "currency"}
DATA_TYPES = (
    STRING_TYPES
    | NUMBER_TYPES
    | {
        "boolean",
        "date",
        "datetime",
        "lookup",
        "ownerlookup",
        "subform",
        "multiselectpicklist",
    }
)
JSON_TYPES = {
    "integer": "integer",
    "bigint": "string",
    "double": "double",
    "currency": "double",
    "boolean": "boolean",
    "lookup": "jsonobject",
    "ownerlookup": "jsonobject",
    "subform": "jsonarray",
    "multiselectpicklist": "jsonarray",
}
DEFAULT_LENGTHS = {
    "text": 255,
    "textarea": 32000,
    "website": 255,
    "email": 100,
    "phone": 30,
    "picklist": 120,
    "integer": 9,
    "bigint": 18,
    "double": 16,
    "currency": 16,
}

EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
PHONE_RE = re.compile(r"^\+?[0-9(][0-9\s().\-/]*((\s*(x|ext\.?)\s*)[0-9]+)?$", re.IGNORECASE)
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
ID_SEGMENT_RE = re.compile(r"^\d{6,}$")

Json = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# options


@dataclass
class ZohoOptions:
    """Everything :func:`create_app` accepts. UNVERIFIED vendor facts are options here."""

    clients: dict[str, str] = field(
        default_factory=lambda: {DEFAULT_CLIENT_ID: DEFAULT_CLIENT_SECRET}
    )
    """client_id -> client_secret registered with this datacenter's accounts server."""
    refresh_tokens: dict[str, str] = field(
        default_factory=lambda: {DEFAULT_REFRESH_TOKEN: DEFAULT_CLIENT_ID}
    )
    """refresh token -> client_id."""
    grant_codes: dict[str, str] = field(default_factory=dict)
    """one-time grant code -> client_id (authorization_code grant)."""
    datacenter: str = "US"
    api_domain: str | None = None
    """None: the URL the token request came in on (scheme://host:port)."""
    scope: str = DEFAULT_SCOPE
    token_ttl_s: float = 3600
    token_rate_limit: int = 10
    token_rate_window_s: float = 600
    max_active_tokens: int = 15
    token_throttle_message: str = TOKEN_THROTTLE_MESSAGE
    accept_bearer: bool = False
    """UNVERIFIED: whether ``Authorization: Bearer`` works. Docs only show Zoho-oauthtoken."""

    max_concurrency: int = 20
    """Enterprise edition: simultaneous calls per org per app."""
    sub_concurrency: int = 10
    """Heavy calls: writes of >10 records, search, COQL, GET records with sort_by/cvid."""
    service_time_ms: float = 0.0
    """How long each API call holds its concurrency slot (simulated server work)."""
    credits_per_day: int = 250_000
    """Enterprise 50,000 + 1,000 per user licence (here 200 users), rolling 24 h."""
    write_records_per_credit: int | None = 10
    """UNVERIFIED: insert/update/upsert cost ceil(n / this) credits; None = 1 per call."""
    credits_header_threshold: float = 0.5
    """UNVERIFIED: X-API-CREDITS-REMAINING is sent once this share of credits is used."""

    line_items_required: bool = True
    """UNVERIFIED: Invoices/Sales_Orders/Purchase_Orders need at least one line item."""
    subform_update_mode: str = "merge"
    """Subform/line-item arrays on update: 'merge' (reference: items with id update, items
    without id are appended, [] clears, {"id", "_delete": null} removes one) or 'replace'
    (UNVERIFIED alternative: the array given replaces all items)."""
    line_item_casing: str = "pascal"
    """UNVERIFIED: 'pascal' (Quantity, List_Price) or 'lower' (quantity, list_price)."""
    purchase_order_items_name: str = "Purchased_Items"
    """UNVERIFIED: 'Purchased_Items' (SDK) or 'Purchase_Items' (OAS example)."""
    deals_closing_date_required: bool = True
    """UNVERIFIED: whether the API enforces Deals.Closing_Date."""
    strict_picklists: bool = True
    strict_fields_param: bool = True
    """UNVERIFIED: unknown api names in ``fields`` give 400 INVALID_DATA (else ignored)."""
    noop_update_bumps_modified_time: bool = True
    """UNVERIFIED: an update that changes nothing still bumps Modified_Time and notifies."""
    unique_case_insensitive: bool = True
    """UNVERIFIED: unique / duplicate-check text values compare case-insensitively."""
    search_equals_contains: bool = True
    search_max_results: int = 2000
    coql_max_limit: int = 2000
    """UNVERIFIED: 2,000 (v7 limitations page) vs 200 (older COQL page)."""
    reject_fractional_channel_expiry: bool = True
    """UNVERIFIED (third-party note): channel_expiry with fractional seconds -> INVALID_DATA."""
    missing_record_status: int = 204
    """UNVERIFIED: GET /{module}/{id} of an unknown id: 204 (empty) or 400 (INVALID_DATA)."""
    notify_timeout_s: float = 10.0
    utc_offset_minutes: int = 0
    """The org's time zone, used to format datetimes (ISO-8601 with offset)."""
    org_id: str = "4876876"
    clock: Callable[[], float] = time.time


RUNTIME_OPTIONS = {
    f.name for f in dc_fields(ZohoOptions) if f.name not in {"clock", "clients", "refresh_tokens"}
}


# ---------------------------------------------------------------------------------------------
# metadata


@dataclass
class FieldDef:
    api_name: str
    data_type: str
    label: str = ""
    length: int | None = None
    system_mandatory: bool = False
    unique: bool = False
    external: bool = False
    read_only: bool = False
    lookup_module: str | None = None
    pick_list_values: tuple[str, ...] = ()
    subform: str | None = None
    custom: bool = False
    id: str = ""

    @property
    def tracked(self) -> bool:
        return self.unique or self.external

    def metadata(self, modules: dict[str, ModuleDef]) -> Json:
        lookup: Json = {}
        if self.lookup_module:
            target = modules.get(self.lookup_module)
            lookup = {
                "display_label": self.label,
                "api_name": self.api_name,
                "module": {
                    "api_name": self.lookup_module,
                    "id": target.id if target else None,
                },
                "id": self.id,
            }
        meta: Json = {
            "api_name": self.api_name,
            "field_label": self.label or self.api_name.replace("_", " "),
            "display_label": self.label or self.api_name.replace("_", " "),
            "id": self.id,
            "data_type": self.data_type,
            "json_type": JSON_TYPES.get(self.data_type, "string"),
            "length": self.length,
            "system_mandatory": self.system_mandatory,
            "read_only": self.read_only,
            "field_read_only": self.read_only,
            "custom_field": self.custom,
            "unique": {"casesensitive": "false"} if self.unique or self.external else {},
            "external": (
                {"show": True, "type": "org", "allow_multiple_config": False}
                if self.external
                else None
            ),
            "lookup": lookup,
            "pick_list_values": [
                {
                    "display_value": value,
                    "actual_value": value,
                    "sequence_number": number,
                    "id": f"{self.id}{number:03d}",
                }
                for number, value in enumerate(self.pick_list_values, start=1)
            ],
            "visible": True,
        }
        if self.subform:
            meta["associated_module"] = {"api_name": self.subform, "module": self.subform}
            meta["subform"] = {"module": self.subform}
        return meta


@dataclass
class ModuleDef:
    api_name: str
    singular: str
    id: str
    display_field: str
    dup_field: str | None
    fields: dict[str, FieldDef]
    line_items: str | None = None
    mandatory: list[str] = field(default_factory=list)
    """System-mandatory api names (derived; call :meth:`refresh` after changing fields)."""
    unique: list[str] = field(default_factory=list)
    """Unique or external api names (derived)."""
    external: list[str] = field(default_factory=list)
    """External api names (derived)."""

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        values = self.fields.values()
        self.mandatory = [f.api_name for f in values if f.system_mandatory]
        self.unique = [f.api_name for f in values if f.tracked]
        self.external = [f.api_name for f in values if f.external]

    def tracked_fields(self) -> list[str]:
        names = list(self.unique)
        if self.dup_field and self.dup_field not in names:
            names.insert(0, self.dup_field)
        return names

    def unique_fields(self) -> list[str]:
        return self.unique


class _Ids:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"{self.prefix}000{self.n:09d}"


LEAD_SOURCES = (
    "Advertisement",
    "Cold Call",
    "Employee Referral",
    "External Referral",
    "Online Store",
    "Partner",
    "Public Relations",
    "Sales Email Alias",
    "Seminar Partner",
    "Internal Seminar",
    "Trade Show",
    "Web Download",
    "Web Research",
    "Chat",
)
INDUSTRIES = (
    "ASP (Application Service Provider)",
    "Data/Telecom OEM",
    "ERP (Enterprise Resource Planning)",
    "Government/Military",
    "Large Enterprise",
    "ManagementISV",
    "MSP (Management Service Provider)",
    "Network Equipment Enterprise",
    "Non-management ISV",
    "Optical Networking",
    "Service Provider",
    "Small/Medium Enterprise",
    "Storage Equipment",
    "Storage Service Provider",
    "Systems Integrator",
    "Wireless Industry",
)
DEAL_STAGES = (
    "Qualification",
    "Needs Analysis",
    "Value Proposition",
    "Id. Decision Makers",
    "Perception Analysis",
    "Proposal/Price Quote",
    "Negotiation/Review",
    "Closed Won",
    "Closed Lost",
    "Closed Lost to Competition",
)
ORDER_STATUS = ("Created", "Approved", "Delivered", "Cancelled")
CARRIERS = ("FedEX", "UPS", "USPS", "DHL", "BlueDart")
USAGE_UNITS = (
    "Box",
    "Carton",
    "Dozen",
    "Each",
    "Hours",
    "Impressions",
    "Lb",
    "M",
    "Pack",
    "Pages",
    "Pieces",
    "Quantity",
    "Reams",
    "Sheet",
    "Spiral Binder",
    "Sq Ft",
)


def _f(api_name: str, data_type: str, length: int | None = None, **kw: Any) -> FieldDef:
    if length is None:
        length = DEFAULT_LENGTHS.get(data_type)
    return FieldDef(api_name=api_name, data_type=data_type, length=length, **kw)


def _address(prefix: str, code: str = "Code") -> list[FieldDef]:
    return [
        _f(f"{prefix}_Street", "text", 250),
        _f(f"{prefix}_City", "text", 30),
        _f(f"{prefix}_State", "text", 30),
        _f(f"{prefix}_{code}", "text", 30),
        _f(f"{prefix}_Country", "text", 30),
    ]


def _system_fields() -> list[FieldDef]:
    return [
        _f("Created_By", "ownerlookup", read_only=True),
        _f("Modified_By", "ownerlookup", read_only=True),
        _f("Created_Time", "datetime", read_only=True),
        _f("Modified_Time", "datetime", read_only=True),
    ]


def _inventory_totals() -> list[FieldDef]:
    return [
        _f("Sub_Total", "currency", read_only=True),
        _f("Discount", "currency"),
        _f("Tax", "currency", read_only=True),
        _f("Adjustment", "currency"),
        _f("Grand_Total", "currency", read_only=True),
    ]


def line_item_names(casing: str) -> dict[str, str]:
    """Logical line-item keys -> api names for the chosen casing."""
    if casing == "lower":
        return {
            "quantity": "quantity",
            "list_price": "list_price",
            "discount": "discount",
            "tax": "tax",
            "total": "total",
            "net_total": "net_total",
            "description": "description",
        }
    return {
        "quantity": "Quantity",
        "list_price": "List_Price",
        "discount": "Discount",
        "tax": "Tax",
        "total": "Total",
        "net_total": "Net_Total",
        "description": "Description",
    }


def build_schema(opts: ZohoOptions) -> tuple[dict[str, ModuleDef], dict[str, dict[str, FieldDef]]]:
    """The standard modules of a fresh Enterprise org, and the line-item subforms."""
    field_ids = _Ids(opts.org_id + "00")
    names = line_item_names(opts.line_item_casing)

    def line_items() -> dict[str, FieldDef]:
        items = [
            _f("Product_Name", "lookup", lookup_module="Products", system_mandatory=True),
            _f(names["quantity"], "double", system_mandatory=True),
            _f(names["list_price"], "currency"),
            _f(names["discount"], "currency"),
            _f(names["tax"], "currency"),
            _f(names["total"], "currency", read_only=True),
            _f(names["net_total"], "currency", read_only=True),
            _f(names["description"], "textarea", 2000),
        ]
        for item in items:
            item.id = field_ids()
        return {item.api_name: item for item in items}

    po_items = opts.purchase_order_items_name
    subforms = {
        "Invoiced_Items": line_items(),
        "Ordered_Items": line_items(),
        po_items: line_items(),
    }
    owner = _f("Owner", "ownerlookup")
    specs: list[tuple[str, str, str, str | None, str | None, list[FieldDef]]] = [
        (
            "Accounts",
            "Account",
            "Account_Name",
            "Account_Name",
            None,
            [
                owner,
                _f("Account_Name", "text", 200, system_mandatory=True),
                _f("Account_Number", "text", 40),
                _f("Account_Site", "text", 80),
                _f("Parent_Account", "lookup", lookup_module="Accounts"),
                _f(
                    "Account_Type",
                    "picklist",
                    pick_list_values=(
                        "Analyst",
                        "Competitor",
                        "Customer",
                        "Distributor",
                        "Integrator",
                        "Investor",
                        "Partner",
                        "Press",
                        "Prospect",
                        "Reseller",
                        "Other",
                    ),
                ),
                _f("Industry", "picklist", pick_list_values=INDUSTRIES),
                _f("Annual_Revenue", "currency"),
                _f("Employees", "integer"),
                _f(
                    "Ownership",
                    "picklist",
                    pick_list_values=(
                        "Other",
                        "Private",
                        "Public",
                        "Subsidiary",
                        "Partnership",
                        "Government",
                        "Privately Held",
                        "Public Company",
                    ),
                ),
                _f(
                    "Rating",
                    "picklist",
                    pick_list_values=(
                        "Acquired",
                        "Active",
                        "Market Failed",
                        "Project Cancelled",
                        "Shut Down",
                    ),
                ),
                _f("Phone", "phone"),
                _f("Fax", "phone"),
                _f("Website", "website"),
                _f("Ticker_Symbol", "text", 30),
                _f("SIC_Code", "integer"),
                *_address("Billing"),
                *_address("Shipping"),
                _f("Description", "textarea"),
            ],
        ),
        (
            "Contacts",
            "Contact",
            "Full_Name",
            "Email",
            None,
            [
                owner,
                _f(
                    "Salutation",
                    "picklist",
                    pick_list_values=("Mr.", "Mrs.", "Ms.", "Dr.", "Prof."),
                ),
                _f("First_Name", "text", 40),
                _f("Last_Name", "text", 80, system_mandatory=True),
                _f("Full_Name", "text", 120, read_only=True),
                _f("Email", "email"),
                _f("Secondary_Email", "email"),
                _f("Phone", "phone"),
                _f("Other_Phone", "phone"),
                _f("Home_Phone", "phone"),
                _f("Mobile", "phone"),
                _f("Fax", "phone"),
                _f("Title", "text", 100),
                _f("Department", "text", 100),
                _f("Account_Name", "lookup", lookup_module="Accounts"),
                _f("Vendor_Name", "lookup", lookup_module="Vendors"),
                _f("Reports_To", "lookup", lookup_module="Contacts"),
                _f("Lead_Source", "picklist", pick_list_values=LEAD_SOURCES),
                _f("Date_of_Birth", "date"),
                _f("Email_Opt_Out", "boolean"),
                *_address("Mailing", "Zip"),
                *_address("Other", "Zip"),
                _f("Description", "textarea"),
            ],
        ),
        (
            "Deals",
            "Deal",
            "Deal_Name",
            "Deal_Name",
            None,
            [
                owner,
                _f("Deal_Name", "text", 120, system_mandatory=True),
                _f("Account_Name", "lookup", lookup_module="Accounts"),
                _f("Contact_Name", "lookup", lookup_module="Contacts"),
                _f(
                    "Type",
                    "picklist",
                    pick_list_values=("Existing Business", "New Business"),
                ),
                _f("Lead_Source", "picklist", pick_list_values=LEAD_SOURCES),
                _f("Stage", "picklist", system_mandatory=True, pick_list_values=DEAL_STAGES),
                _f("Amount", "currency"),
                _f("Probability", "integer", 3),
                _f("Expected_Revenue", "currency", read_only=True),
                _f(
                    "Closing_Date",
                    "date",
                    system_mandatory=opts.deals_closing_date_required,
                ),
                _f("Next_Step", "text", 100),
                _f("Description", "textarea"),
            ],
        ),
        (
            "Products",
            "Product",
            "Product_Name",
            "Product_Name",
            None,
            [
                owner,
                _f("Product_Name", "text", 200, system_mandatory=True),
                _f("Product_Code", "text", 40),
                _f("Product_Active", "boolean"),
                _f(
                    "Product_Category",
                    "picklist",
                    pick_list_values=("Hardware", "Software", "CRM Applications"),
                ),
                _f("Vendor_Name", "lookup", lookup_module="Vendors"),
                _f("Unit_Price", "currency"),
                _f("Commission_Rate", "currency"),
                _f("Usage_Unit", "picklist", pick_list_values=USAGE_UNITS),
                _f("Qty_Ordered", "double"),
                _f("Qty_in_Stock", "double"),
                _f("Reorder_Level", "double"),
                _f("Qty_in_Demand", "double"),
                _f("Taxable", "boolean"),
                _f("Sales_Start_Date", "date"),
                _f("Sales_End_Date", "date"),
                _f("Description", "textarea"),
            ],
        ),
        (
            "Vendors",
            "Vendor",
            "Vendor_Name",
            "Vendor_Name",
            None,
            [
                owner,
                _f("Vendor_Name", "text", 120, system_mandatory=True),
                _f("Email", "email"),
                _f("Phone", "phone"),
                _f("Website", "website"),
                _f("Category", "text", 40),
                _f("Street", "text", 250),
                _f("City", "text", 30),
                _f("State", "text", 30),
                _f("Zip_Code", "text", 30),
                _f("Country", "text", 30),
                _f("Description", "textarea"),
            ],
        ),
        (
            "Sales_Orders",
            "Sales Order",
            "Subject",
            "Subject",
            "Ordered_Items",
            [
                owner,
                _f("Subject", "text", 255, system_mandatory=True),
                _f("Customer_No", "text", 40),
                _f("Purchase_Order", "text", 100),
                _f("Account_Name", "lookup", lookup_module="Accounts"),
                _f("Contact_Name", "lookup", lookup_module="Contacts"),
                _f("Deal_Name", "lookup", lookup_module="Deals"),
                _f("Due_Date", "date"),
                _f("Status", "picklist", pick_list_values=ORDER_STATUS),
                _f("Carrier", "picklist", pick_list_values=CARRIERS),
                _f("Excise_Duty", "currency"),
                _f("Sales_Commission", "currency"),
                _f("Ordered_Items", "subform", subform="Ordered_Items"),
                *_inventory_totals(),
                *_address("Billing"),
                *_address("Shipping"),
                _f("Terms_and_Conditions", "textarea"),
                _f("Description", "textarea"),
            ],
        ),
        (
            "Invoices",
            "Invoice",
            "Subject",
            "Subject",
            "Invoiced_Items",
            [
                owner,
                _f("Subject", "text", 255, system_mandatory=True),
                _f("Invoice_Date", "date"),
                _f("Due_Date", "date"),
                _f("Status", "picklist", pick_list_values=ORDER_STATUS),
                _f("Account_Name", "lookup", lookup_module="Accounts"),
                _f("Contact_Name", "lookup", lookup_module="Contacts"),
                _f("Sales_Order", "lookup", lookup_module="Sales_Orders"),
                _f("Deal_Name", "lookup", lookup_module="Deals"),
                _f("Purchase_Order", "text", 100),
                _f("Excise_Duty", "currency"),
                _f("Sales_Commission", "currency"),
                _f("Invoiced_Items", "subform", subform="Invoiced_Items"),
                *_inventory_totals(),
                *_address("Billing"),
                *_address("Shipping"),
                _f("Terms_and_Conditions", "textarea"),
                _f("Description", "textarea"),
            ],
        ),
        (
            "Purchase_Orders",
            "Purchase Order",
            "Subject",
            "Subject",
            po_items,
            [
                owner,
                _f("Subject", "text", 255, system_mandatory=True),
                _f("PO_Number", "text", 100),
                _f("PO_Date", "date"),
                _f("Due_Date", "date"),
                _f("Vendor_Name", "lookup", lookup_module="Vendors", system_mandatory=True),
                _f("Contact_Name", "lookup", lookup_module="Contacts"),
                _f("Requisition_No", "text", 100),
                _f("Tracking_Number", "text", 100),
                _f("Carrier", "picklist", pick_list_values=CARRIERS),
                _f("Status", "picklist", pick_list_values=ORDER_STATUS),
                _f("Excise_Duty", "currency"),
                _f("Sales_Commission", "currency"),
                _f(po_items, "subform", subform=po_items),
                *_inventory_totals(),
                *_address("Billing"),
                *_address("Shipping"),
                _f("Terms_and_Conditions", "textarea"),
                _f("Description", "textarea"),
            ],
        ),
    ]
    module_ids = _Ids(opts.org_id + "01")
    modules: dict[str, ModuleDef] = {}
    for api_name, singular, display, dup, items_name, field_list in specs:
        defs: dict[str, FieldDef] = {}
        for fdef in [*field_list, *_system_fields()]:
            copy = FieldDef(**{f.name: getattr(fdef, f.name) for f in dc_fields(FieldDef)})
            copy.id = field_ids()
            copy.label = copy.label or copy.api_name.replace("_", " ")
            defs[copy.api_name] = copy
        modules[api_name] = ModuleDef(
            api_name=api_name,
            singular=singular,
            id=module_ids(),
            display_field=display,
            dup_field=dup,
            fields=defs,
            line_items=items_name,
        )
    return modules, subforms


# ---------------------------------------------------------------------------------------------
# errors


class ZohoError(Exception):
    """A per-record (or per-item) error in Zoho's shape."""

    def __init__(self, code: str, message: str, details: Json | None = None) -> None:
        super().__init__(message)
        self.body: Json = {
            "code": code,
            "details": details if details is not None else {},
            "message": message,
            "status": "error",
        }


class RequestError(Exception):
    """A request-level error: flat ``{"code","details","message","status"}`` body."""

    def __init__(self, status: int, code: str, message: str, details: Json | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body: Json = {
            "code": code,
            "details": details if details is not None else {},
            "message": message,
            "status": "error",
        }

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status)


def flat_error(status: int, code: str, message: str, details: Json | None = None) -> web.Response:
    return RequestError(status, code, message, details).response()


def wrapped_error(status: int, code: str, message: str, details: Json) -> web.Response:
    return web.json_response({"data": [ZohoError(code, message, details).body]}, status=status)


def invalid_type(fdef: FieldDef, path: str, expected: str | None = None) -> ZohoError:
    return ZohoError(
        "INVALID_DATA",
        "invalid data",
        {
            "expected_data_type": expected or fdef.data_type,
            "api_name": fdef.api_name,
            "json_path": path,
        },
    )


def invalid_value(api_name: str, path: str, **extra: Any) -> ZohoError:
    return ZohoError(
        "INVALID_DATA", "invalid data", {"api_name": api_name, "json_path": path, **extra}
    )


def mandatory_missing(api_name: str, path: str, **extra: Any) -> ZohoError:
    return ZohoError(
        "MANDATORY_NOT_FOUND",
        "required field not found",
        {"api_name": api_name, "json_path": path, **extra},
    )


# ---------------------------------------------------------------------------------------------
# store


def _sort_n(record: Json) -> int:
    return int(record["_n"])


class ModuleStore:
    """Records of one module, indexed by id and by every tracked (unique/duplicate) value."""

    def __init__(self, mdef: ModuleDef, case_insensitive: bool) -> None:
        self.mdef = mdef
        self.case_insensitive = case_insensitive
        self.records: dict[str, Json] = {}
        self.index: dict[str, dict[Any, str | set[str]]] = {}
        self.multi: dict[str, dict[Any, set[str]]] = {}
        self.deleted: list[Json] = []
        self.version = 0
        self.cache: OrderedDict[tuple[Any, ...], list[str]] = OrderedDict()
        self.rebuild_indexes()

    def key(self, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            return value.casefold() if self.case_insensitive else value
        if isinstance(value, list):
            return json.dumps(value, sort_keys=True, default=str)
        return value

    def rebuild_indexes(self) -> None:
        self.index = {name: {} for name in self.mdef.tracked_fields()}
        self.multi = {name: {} for name in self.index}
        for record in self.records.values():
            self._index_record(record)

    def _index_record(self, record: Json) -> None:
        for name in self.index:
            value = record.get(name)
            if value is not None and value != "":
                self._index_add(name, self.key(value), record["id"])

    def _unindex_record(self, record: Json) -> None:
        for name in self.index:
            value = record.get(name)
            if value is not None and value != "":
                self._index_remove(name, self.key(value), record["id"])

    def _index_add(self, name: str, key: Any, rid: str) -> None:
        index = self.index[name]
        current = index.get(key)
        if current is None:
            index[key] = rid
        elif isinstance(current, str):
            if current != rid:
                group = {current, rid}
                index[key] = group
                self.multi[name][key] = group
        else:
            current.add(rid)

    def _index_remove(self, name: str, key: Any, rid: str) -> None:
        index = self.index[name]
        current = index.get(key)
        if current is None:
            return
        if isinstance(current, str):
            if current == rid:
                del index[key]
            return
        current.discard(rid)
        if len(current) <= 1:
            self.multi[name].pop(key, None)
            if current:
                index[key] = next(iter(current))
            else:
                del index[key]

    def find(self, name: str, value: Any) -> list[str]:
        """Ids holding ``value`` in tracked field ``name``, oldest first."""
        index = self.index.get(name)
        if index is None or value is None or value == "":
            return []
        current = index.get(self.key(value))
        if current is None:
            return []
        if isinstance(current, str):
            return [current]
        return sorted(current, key=lambda rid: _sort_n(self.records[rid]))

    def add(self, record: Json) -> None:
        self.records[record["id"]] = record
        self._index_record(record)
        self.changed()

    def replace_values(self, record: Json, changes: dict[str, Any]) -> None:
        tracked = [name for name in changes if name in self.index]
        for name in tracked:
            old = record.get(name)
            if old is not None and old != "":
                self._index_remove(name, self.key(old), record["id"])
        for name, value in changes.items():
            if value is None:
                record.pop(name, None)
            else:
                record[name] = value
        for name in tracked:
            new = record.get(name)
            if new is not None and new != "":
                self._index_add(name, self.key(new), record["id"])

    def remove(self, rid: str) -> Json | None:
        record = self.records.pop(rid, None)
        if record is not None:
            self._unindex_record(record)
            self.changed()
        return record

    def changed(self) -> None:
        self.version += 1
        self.cache.clear()

    def duplicates(self) -> int:
        """Records sharing a tracked value with an earlier record."""
        dup_ids: set[str] = set()
        for groups in self.multi.values():
            for ids in groups.values():
                ordered = sorted(ids, key=lambda rid: _sort_n(self.records[rid]))
                dup_ids.update(ordered[1:])
        return len(dup_ids)

    def duplicates_by_field(self) -> dict[str, int]:
        """Per tracked field: records sharing its value with an earlier record. A shared system
        duplicate field (two customers named alike) is normal; a shared unique match field is
        a duplicate the integration created."""
        out: dict[str, int] = {}
        for name, groups in self.multi.items():
            out[str(name)] = sum(len(ids) - 1 for ids in groups.values() if len(ids) > 1)
        return out

    def query(
        self,
        sort_by: str,
        sort_order: str,
        since: float | None,
        ids: tuple[str, ...] | None,
    ) -> list[str]:
        cache_key = (sort_by, sort_order, since, ids)
        cached = self.cache.get(cache_key)
        if cached is not None:
            self.cache.move_to_end(cache_key)
            return cached
        if ids is not None:
            records = [self.records[rid] for rid in dict.fromkeys(ids) if rid in self.records]
        else:
            records = list(self.records.values())
        if since is not None:
            records = [r for r in records if r["_m"] > since]
        if sort_by == "Modified_Time":
            records.sort(key=lambda r: (r["_m"], r["_n"]))
        elif sort_by == "Created_Time":
            records.sort(key=lambda r: (r["_c"], r["_n"]))
        else:
            records.sort(key=_sort_n)
        if sort_order == "desc":
            records.reverse()
        result = [r["id"] for r in records]
        self.cache[cache_key] = result
        while len(self.cache) > 8:
            self.cache.popitem(last=False)
        return result


@dataclass
class AccessToken:
    token: str
    refresh_token: str
    client_id: str
    expires_at: float


@dataclass
class PageToken:
    signature: tuple[Any, ...]
    offset: int
    expires_at: float


@dataclass
class Watch:
    channel_id: str
    module: str
    events: set[str]
    notify_url: str
    token: str | None
    expires_at: float
    return_affected_field_values: bool
    notify_on_related_action: bool
    api_domain: str


@dataclass
class Change:
    module: str
    operation: str
    rid: str
    fields: list[str]


class _BadBody:
    """Marker for a request body that is not JSON."""


_BAD_BODY = _BadBody()


@dataclass
class CallInfo:
    """What the middlewares learnt about one API call."""

    body: Any = None
    body_read: bool = False
    nrecords: int | None = None
    coql_limit: int | None = None
    reject: bool = False


_REQUEST_KEY_TYPE = getattr(web, "RequestKey", None)
CALL_INFO_KEY: Any = (
    _REQUEST_KEY_TYPE("zoho_call_info", CallInfo) if _REQUEST_KEY_TYPE else "zoho_call_info"
)


def call_info(request: web.Request) -> CallInfo:
    info: CallInfo | None = request.get(CALL_INFO_KEY)
    if info is None:
        info = CallInfo()
        request[CALL_INFO_KEY] = info
    return info


# ---------------------------------------------------------------------------------------------
# time helpers


def parse_datetime(text: str) -> float | None:
    """ISO-8601 with an offset -> epoch seconds; None when not valid."""
    try:
        parsed = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()


def parse_http_time(text: str) -> float | None:
    """If-Modified-Since: ISO-8601 with offset (Zoho's documented form) or RFC 1123."""
    value = parse_datetime(text.strip())
    if value is not None:
        return value
    try:
        parsed = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            return None
        return result if math.isfinite(result) else None
    return None


# ---------------------------------------------------------------------------------------------
# search criteria


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _split_unescaped(text: str, sep: str = ",") -> list[str]:
    parts: list[str] = []
    buf: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            buf.append(text[i : i + 2])
            i += 2
            continue
        if char == sep:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(char)
        i += 1
    parts.append("".join(buf))
    return [_unescape(part) for part in parts]


class CriteriaError(Exception):
    def __init__(self, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.details = {"reason": reason, **details}


def parse_criteria(text: str) -> tuple[Any, int]:
    """``((A:equals:x)and(B:starts_with:y))`` -> (tree, number of conditions)."""
    count = 0
    n = len(text)

    def skip(i: int) -> int:
        while i < n and text[i].isspace():
            i += 1
        return i

    def group(i: int) -> tuple[Any, int]:
        nonlocal count
        i = skip(i)
        if i >= n or text[i] != "(":
            raise CriteriaError("invalid criteria: '(' expected", position=i)
        i = skip(i + 1)
        if i < n and text[i] == "(":
            node, i = expr(i)
            i = skip(i)
            if i >= n or text[i] != ")":
                raise CriteriaError("invalid criteria: ')' expected", position=i)
            return node, i + 1
        buf: list[str] = []
        while i < n:
            char = text[i]
            if char == "\\" and i + 1 < n:
                buf.append(text[i : i + 2])
                i += 2
                continue
            if char == ")":
                break
            buf.append(char)
            i += 1
        if i >= n:
            raise CriteriaError("invalid criteria: ')' expected", position=i)
        body = "".join(buf)
        parts = body.split(":", 2)
        if len(parts) != 3:
            raise CriteriaError("invalid criteria", criteria=body)
        count += 1
        return ("cond", parts[0].strip(), parts[1].strip().lower(), parts[2]), i + 1

    def expr(i: int) -> tuple[Any, int]:
        node, i = group(i)
        operands = [node]
        operators: list[str] = []
        while True:
            j = skip(i)
            match = re.match(r"(and|or)\s*\(", text[j:], re.IGNORECASE)
            if not match:
                break
            operators.append(match.group(1).lower())
            node, i = group(j + len(match.group(1)))
            operands.append(node)
        # "and" binds tighter than "or"
        ors: list[Any] = [operands[0]]
        for operator, operand in zip(operators, operands[1:], strict=True):
            if operator == "and":
                ors[-1] = ("and", ors[-1], operand)
            else:
                ors.append(operand)
        tree = ors[0]
        for operand in ors[1:]:
            tree = ("or", tree, operand)
        return tree, i

    tree, end = expr(0)
    if skip(end) != n:
        raise CriteriaError("invalid criteria: unexpected text", position=end)
    return tree, count


# ---------------------------------------------------------------------------------------------
# COQL

_COQL_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^'\\]|\\.|'')*')"
    r"|(?P<num>-?\d+(?:\.\d+)?)(?![\w.])"
    r"|(?P<op><=|>=|!=|<>|=|<|>)"
    r"|(?P<punct>[(),*])"
    r"|(?P<word>[A-Za-z_$][\w$]*(?:\.[A-Za-z_$][\w$]*)*))"
)


class CoqlError(Exception):
    def __init__(self, code: str, message: str, details: Json) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


@dataclass
class CoqlQuery:
    fields: list[str]
    module: str
    where: Any
    order: list[tuple[str, bool]]
    offset: int
    limit: int


class CoqlParser:
    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, Any]] = []
        pos = 0
        text = text.strip().rstrip(";")
        while pos < len(text):
            match = _COQL_TOKEN.match(text, pos)
            if not match or match.end() == pos:
                if text[pos:].strip() == "":
                    break
                raise CoqlError(
                    "SYNTAX_ERROR",
                    f"error occured near {text[pos : pos + 20]!r}",
                    {"near": text[pos : pos + 20]},
                )
            kind = match.lastgroup or ""
            raw = match.group(kind)
            if kind == "str":
                value: Any = raw[1:-1].replace("''", "'")
                value = re.sub(r"\\(.)", r"\1", value)
            elif kind == "num":
                value = float(raw) if "." in raw else int(raw)
            else:
                value = raw
            self.tokens.append((kind, value))
            pos = match.end()
        self.i = 0

    def _peek(self) -> tuple[str, Any] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _kw(self, *words: str) -> str | None:
        token = self._peek()
        if token and token[0] == "word" and str(token[1]).lower() in words:
            self.i += 1
            return str(token[1]).lower()
        return None

    def _expect_kw(self, word: str, clause: str) -> None:
        if not self._kw(word):
            raise CoqlError("SYNTAX_ERROR", f"error occured in {clause} clause", {"clause": clause})

    def _punct(self, char: str) -> bool:
        token = self._peek()
        if token and token[0] == "punct" and token[1] == char:
            self.i += 1
            return True
        return False

    def _ident(self, clause: str) -> str:
        token = self._peek()
        if not token or token[0] != "word":
            raise CoqlError("SYNTAX_ERROR", f"error occured in {clause} clause", {"clause": clause})
        self.i += 1
        return str(token[1])

    def _int(self, clause: str) -> int:
        token = self._peek()
        if not token or token[0] != "num" or not isinstance(token[1], int) or token[1] < 0:
            raise CoqlError("SYNTAX_ERROR", f"error occured in {clause} clause", {"clause": clause})
        self.i += 1
        return int(token[1])

    def _literal(self) -> Any:
        token = self._peek()
        if token is None:
            raise CoqlError("SYNTAX_ERROR", "error occured in where clause", {"clause": "where"})
        self.i += 1
        kind, value = token
        if kind in ("str", "num"):
            return value
        if kind == "word" and str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
        if kind == "word" and str(value).lower() == "null":
            return None
        raise CoqlError("SYNTAX_ERROR", "error occured in where clause", {"clause": "where"})

    def parse(self) -> CoqlQuery:
        self._expect_kw("select", "select")
        if self._punct("*"):
            raise CoqlError("SYNTAX_ERROR", "error occured in select clause", {"clause": "select"})
        names = [self._ident("select")]
        while self._punct(","):
            names.append(self._ident("select"))
        self._expect_kw("from", "from")
        module = self._ident("from")
        where = None
        if self._kw("where"):
            where = self._cond()
        order: list[tuple[str, bool]] = []
        if self._kw("order"):
            self._expect_kw("by", "order by")
            while True:
                name = self._ident("order by")
                direction = self._kw("asc", "desc")
                order.append((name, direction == "desc"))
                if not self._punct(","):
                    break
        offset, limit = 0, 200
        if self._kw("limit"):
            first = self._int("limit")
            if self._punct(","):
                offset, limit = first, self._int("limit")
            else:
                limit = first
        if self._kw("offset"):
            offset = self._int("offset")
        trailing = self._peek()
        if trailing is not None:
            raise CoqlError(
                "SYNTAX_ERROR", f"error occured near {trailing[1]!r}", {"near": str(trailing[1])}
            )
        return CoqlQuery(names, module, where, order, offset, limit)

    def _cond(self) -> Any:
        left = self._factor()
        connective = self._kw("and", "or")
        if connective is None:
            return left
        right = self._factor()
        if self._kw("and", "or"):
            raise CoqlError(
                "SYNTAX_ERROR",
                "more than two criteria must be grouped with brackets",
                {"clause": "where"},
            )
        return (connective, left, right)

    def _factor(self) -> Any:
        if self._punct("("):
            node = self._cond()
            if not self._punct(")"):
                raise CoqlError(
                    "SYNTAX_ERROR", "error occured in where clause", {"clause": "where"}
                )
            return node
        name = self._ident("where")
        if self._kw("is"):
            negate = bool(self._kw("not"))
            self._expect_kw("null", "where")
            return ("isnull", name, negate)
        negate = bool(self._kw("not"))
        if self._kw("like"):
            return ("like", name, self._literal(), negate)
        if self._kw("in"):
            if not self._punct("("):
                raise CoqlError(
                    "SYNTAX_ERROR", "error occured in where clause", {"clause": "where"}
                )
            values = [self._literal()]
            while self._punct(","):
                values.append(self._literal())
            if not self._punct(")"):
                raise CoqlError(
                    "SYNTAX_ERROR", "error occured in where clause", {"clause": "where"}
                )
            return ("in", name, values, negate)
        if self._kw("between"):
            low = self._literal()
            self._expect_kw("and", "where")
            return ("between", name, low, self._literal(), negate)
        if negate:
            raise CoqlError("SYNTAX_ERROR", "error occured in where clause", {"clause": "where"})
        token = self._peek()
        if not token or token[0] != "op":
            raise CoqlError("SYNTAX_ERROR", "error occured in where clause", {"clause": "where"})
        self.i += 1
        return ("cmp", name, "!=" if token[1] == "<>" else token[1], self._literal())


# ---------------------------------------------------------------------------------------------
# the emulator


class ZohoCrmEmulator:
    """State and handlers of one Zoho CRM datacenter."""

    def __init__(self, options: ZohoOptions) -> None:
        self.opts = options
        self.faults = Faults()
        self.call_stats = CallStats()
        self.user: Json = {
            "name": "Emulator Admin",
            "id": f"{options.org_id}000000411001",
            "email": "admin@emulator.example",
        }
        self.users: dict[str, Json] = {self.user["id"]: self.user}
        self.clients = dict(options.clients)
        self.refresh_tokens = dict(options.refresh_tokens)
        self.grant_codes = dict(options.grant_codes)
        self.access_tokens: dict[str, AccessToken] = {}
        self.active_tokens: dict[str, deque[str]] = {}
        self.token_issue_times: dict[str, deque[float]] = {}
        self.in_flight = 0
        self.in_flight_sub = 0
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._skew = 0.0
        self._time_cache: dict[tuple[int, int], str] = {}
        self._reset_state()

    # -- state ------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self.modules, self.subforms = build_schema(self.opts)
        self.stores = {
            name: ModuleStore(mdef, self.opts.unique_case_insensitive)
            for name, mdef in self.modules.items()
        }
        self.ids = _Ids(self.opts.org_id)
        self.ids.n = 1_000_000
        self.seq = 0
        self.field_ids = _Ids(self.opts.org_id + "09")
        self.page_tokens: OrderedDict[str, PageToken] = OrderedDict()
        self.watches: dict[tuple[str, str], Watch] = {}
        self.reject_rules: list[tuple[str, str, str]] = []
        self.credit_log: deque[tuple[float, int]] = deque()
        self.credit_window_sum = 0
        self.notification_log: deque[Json] = deque(maxlen=1000)
        self.token_issue_times = {}
        self.counters: Counter[str] = Counter()
        self.record_errors: Counter[str] = Counter()
        self.peak_concurrency = 0
        self.peak_sub_concurrency = 0
        self._skew = 0.0

    def reset(self) -> None:
        """Forget records, schema changes, channels, credits and counters. Tokens stay valid."""
        self._reset_state()

    def now(self) -> float:
        return self.opts.clock() + self._skew

    def fmt_time(self, ts: float) -> str:
        key = (math.floor(ts), self.opts.utc_offset_minutes)
        text = self._time_cache.get(key)
        if text is None:
            if len(self._time_cache) > 4096:
                self._time_cache.clear()
            tz = timezone(timedelta(minutes=key[1]))
            text = datetime.fromtimestamp(key[0], tz).isoformat()
            self._time_cache[key] = text
        return text

    def api_domain(self, request: web.Request) -> str:
        return self.opts.api_domain or f"{request.scheme}://{request.host}"

    def extra_stats(self) -> Json:
        used = self._credits_used(self.now())
        return {
            "datacenter": self.opts.datacenter,
            "credits_used": self.counters["credits_used"],
            "credits_used_24h": used,
            "credits_remaining": max(0, self.opts.credits_per_day - used),
            "tokens_issued": self.counters["tokens_issued"],
            "token_requests": self.counters["token_requests"],
            "token_throttled": self.counters["token_throttled"],
            "token_errors": self.counters["token_errors"],
            "write_calls": self.counters["write_calls"],
            "records_inserted": self.counters["records_inserted"],
            "records_updated": self.counters["records_updated"],
            "records_deleted": self.counters["records_deleted"],
            "record_errors": dict(self.record_errors),
            "duplicates": {name: store.duplicates() for name, store in self.stores.items()},
            "duplicates_by_field": {
                name: store.duplicates_by_field() for name, store in self.stores.items()
            },
            "records": {name: len(store.records) for name, store in self.stores.items()},
            "peak_concurrency": self.peak_concurrency,
            "peak_sub_concurrency": self.peak_sub_concurrency,
            "concurrency_rejections": self.counters["concurrency_rejections"],
            "credit_rejections": self.counters["credit_rejections"],
            "auth_failures": self.counters["auth_failures"],
            "notifications_sent": self.counters["notifications_sent"],
            "notifications_failed": self.counters["notifications_failed"],
            "notifications_skipped": self.counters["notifications_skipped"],
        }

    # -- credits ----------------------------------------------------------------------------

    def _credits_used(self, now: float) -> int:
        log = self.credit_log
        while log and log[0][0] <= now - CREDIT_WINDOW_S:
            self.credit_window_sum -= log.popleft()[1]
        return self.credit_window_sum

    def _charge(self, now: float, cost: int) -> None:
        self.credit_log.append((now, cost))
        self.credit_window_sum += cost
        self.counters["credits_used"] += cost

    def _cost(self, request: web.Request) -> int:
        records = call_info(request).nrecords
        if records is not None:
            per = self.opts.write_records_per_credit
            return max(1, math.ceil(records / per)) if per else 1
        coql_limit = call_info(request).coql_limit
        if coql_limit is not None:
            return 1 if coql_limit <= 200 else 2 if coql_limit <= 1000 else 3
        if request.method == "GET" and request.path.endswith("/deleted"):
            return 2
        return 1

    # -- OAuth -------------------------------------------------------------------------------

    async def oauth_token(self, request: web.Request) -> web.Response:
        params: dict[str, str] = dict(request.query)
        if request.can_read_body:
            with contextlib.suppress(Exception):
                form = await request.post()
                params.update({k: str(v) for k, v in form.items()})
        self.counters["token_requests"] += 1
        grant_type = params.get("grant_type", "")
        client_id = params.get("client_id", "")
        secret = params.get("client_secret", "")
        if grant_type not in ("refresh_token", "authorization_code"):
            self.counters["token_errors"] += 1
            return web.json_response({"error": "unsupported_grant_type"})
        if client_id not in self.clients or self.clients[client_id] != secret:
            self.counters["token_errors"] += 1
            return web.json_response({"error": "invalid_client"})
        new_refresh: str | None = None
        if grant_type == "authorization_code":
            code = params.get("code", "")
            if self.grant_codes.get(code) != client_id:
                self.counters["token_errors"] += 1
                return web.json_response({"error": "invalid_code"})
            del self.grant_codes[code]
            new_refresh = f"1000.{secrets.token_hex(16)}.{secrets.token_hex(16)}"
            self.refresh_tokens[new_refresh] = client_id
            refresh = new_refresh
        else:
            refresh = params.get("refresh_token", "")
            if self.refresh_tokens.get(refresh) != client_id:
                self.counters["token_errors"] += 1
                return web.json_response({"error": "invalid_code"})
        now = self.now()
        issued = self.token_issue_times.setdefault(refresh, deque())
        while issued and issued[0] <= now - self.opts.token_rate_window_s:
            issued.popleft()
        if len(issued) >= self.opts.token_rate_limit:
            self.counters["token_throttled"] += 1
            return web.json_response(
                {
                    "error_description": self.opts.token_throttle_message,
                    "error": "Access Denied",
                    "status": "failure",
                }
            )
        issued.append(now)
        token = f"1000.{secrets.token_hex(16)}.{secrets.token_hex(16)}"
        self.access_tokens[token] = AccessToken(
            token, refresh, client_id, now + self.opts.token_ttl_s
        )
        active = self.active_tokens.setdefault(refresh, deque())
        active.append(token)
        while len(active) > self.opts.max_active_tokens:
            self.access_tokens.pop(active.popleft(), None)
        self.counters["tokens_issued"] += 1
        body: Json = {
            "access_token": token,
            "scope": self.opts.scope,
            "api_domain": self.api_domain(request),
            "token_type": "Bearer",
            "expires_in": int(self.opts.token_ttl_s),
        }
        if new_refresh:
            body["refresh_token"] = new_refresh
        return web.json_response(body)

    async def oauth_revoke(self, request: web.Request) -> web.Response:
        params: dict[str, str] = dict(request.query)
        if request.can_read_body:
            with contextlib.suppress(Exception):
                form = await request.post()
                params.update({k: str(v) for k, v in form.items()})
        token = params.get("token", "")
        if token in self.refresh_tokens:
            del self.refresh_tokens[token]
            for access in self.active_tokens.pop(token, deque()):
                self.access_tokens.pop(access, None)
            return web.json_response({"status": "success"})
        if token in self.access_tokens:
            del self.access_tokens[token]
            return web.json_response({"status": "success"})
        return web.json_response({"error": "invalid_code"})

    def _authenticate(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "").strip()
        scheme, _, token = header.partition(" ")
        token = token.strip()
        schemes = {"zoho-oauthtoken"} | ({"bearer"} if self.opts.accept_bearer else set())
        if not token or scheme.lower() not in schemes:
            self.counters["auth_failures"] += 1
            return flat_error(401, "AUTHENTICATION_FAILURE", "Authentication failed")
        access = self.access_tokens.get(token)
        if access is None or access.expires_at <= self.now():
            self.counters["auth_failures"] += 1
            return flat_error(401, "INVALID_TOKEN", "invalid oauth token")
        return None

    # -- middleware ---------------------------------------------------------------------------

    async def _classify(self, request: web.Request) -> bool:
        """True for calls Zoho counts against the sub-concurrency limit."""
        parts = [p for p in request.path.split("/") if p][2:]
        if not parts:
            return False
        method = request.method
        if parts[0] == "coql" and method == "POST":
            body = await self._read_json(request)
            query = body.get("select_query") if isinstance(body, dict) else None
            if isinstance(query, str):
                match = re.search(r"\blimit\s+(\d+)(?:\s*,\s*(\d+))?", query, re.IGNORECASE)
                limit = 200
                if match:
                    limit = int(match.group(2) or match.group(1))
                call_info(request).coql_limit = limit
            return True
        if parts[0] in ("settings", "actions", "org", "users"):
            return False
        if len(parts) == 2 and parts[1] == "search":
            return True
        if len(parts) == 1 and method == "GET":
            return "sort_by" in request.query or "cvid" in request.query
        if method in ("POST", "PUT") and (
            len(parts) == 1 or parts[1] == "upsert" or method == "PUT"
        ):
            body = await self._read_json(request)
            data = body.get("data") if isinstance(body, dict) else None
            count = len(data) if isinstance(data, list) else 1
            call_info(request).nrecords = count
            return count > 10
        return False

    async def _read_json(self, request: web.Request) -> Any:
        info = call_info(request)
        if info.body_read:
            return info.body
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = _BAD_BODY
        info.body, info.body_read = body, True
        return body

    def gate_middleware(self) -> Any:
        @web.middleware
        async def gate(request: web.Request, handler: Any) -> web.StreamResponse:
            if not request.path.startswith("/crm/"):
                return await handler(request)
            heavy = await self._classify(request)
            self.in_flight += 1
            if heavy:
                self.in_flight_sub += 1
            over = self.in_flight > self.opts.max_concurrency or (
                heavy and self.in_flight_sub > self.opts.sub_concurrency
            )
            if over:
                self.in_flight -= 1
                if heavy:
                    self.in_flight_sub -= 1
                call_info(request).reject = True
                return await handler(request)
            self.peak_concurrency = max(self.peak_concurrency, self.in_flight)
            if heavy:
                self.peak_sub_concurrency = max(self.peak_sub_concurrency, self.in_flight_sub)
            try:
                return await handler(request)
            finally:
                self.in_flight -= 1
                if heavy:
                    self.in_flight_sub -= 1

        return gate

    def api_middleware(self) -> Any:
        @web.middleware
        async def api(request: web.Request, handler: Any) -> web.StreamResponse:
            if not request.path.startswith("/crm/"):
                return await handler(request)
            denied = self._authenticate(request)
            if denied is not None:
                return denied
            if call_info(request).reject:
                self.counters["concurrency_rejections"] += 1
                return flat_error(429, "TOO_MANY_REQUESTS", TOO_MANY_REQUESTS_MESSAGE)
            now = self.now()
            cost = self._cost(request)
            used = self._credits_used(now)
            if used + cost > self.opts.credits_per_day:
                self.counters["credit_rejections"] += 1
                return flat_error(429, "TOO_MANY_REQUESTS", TOO_MANY_REQUESTS_MESSAGE)
            self._charge(now, cost)
            used += cost
            if self.opts.service_time_ms > 0:
                await asyncio.sleep(self.opts.service_time_ms / 1000)
            response = await handler(request)
            if used >= self.opts.credits_per_day * self.opts.credits_header_threshold:
                response.headers["X-API-CREDITS-REMAINING"] = str(
                    max(0, self.opts.credits_per_day - used)
                )
            return response

        return api

    def fault_response(self, request: web.Request, kind: str) -> web.StreamResponse:
        if request.path.startswith("/oauth/"):
            if kind == "throttle":
                return web.json_response(
                    {
                        "error_description": self.opts.token_throttle_message,
                        "error": "Access Denied",
                        "status": "failure",
                    }
                )
            return web.json_response({"error": "internal_error"}, status=500)
        if kind == "throttle":
            return flat_error(429, "TOO_MANY_REQUESTS", TOO_MANY_REQUESTS_MESSAGE)
        return flat_error(500, "INTERNAL_ERROR", "Internal Server Error")

    @staticmethod
    def route_name(request: web.Request) -> str:
        parts = ["{id}" if ID_SEGMENT_RE.match(p) else p for p in request.path.split("/")]
        return f"{request.method} {'/'.join(parts)}"

    # -- dispatch -----------------------------------------------------------------------------

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._dispatch(request)
        except RequestError as exc:
            return exc.response()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        version = request.match_info["version"]
        parts = [p for p in request.match_info["tail"].split("/") if p]
        method = request.method
        if version != API_VERSION or not parts:
            return self._url_pattern_error()
        head = parts[0]
        if head == "org" and len(parts) == 1:
            return self._method(method, {"GET": self.get_org}, request)
        if head == "users" and len(parts) == 1:
            return self._method(method, {"GET": self.get_users}, request)
        if head == "settings":
            if parts[1:] == ["modules"]:
                return self._method(method, {"GET": self.get_modules}, request)
            if parts[1:] == ["fields"]:
                return self._method(method, {"GET": self.get_fields}, request)
            return self._url_pattern_error()
        if head == "coql" and len(parts) == 1:
            if method != "POST":
                return self._bad_method()
            return await self.coql(request)
        if head == "actions" and parts[1:] == ["watch"]:
            handlers = {
                "POST": self.watch_enable,
                "GET": self.watch_list,
                "PUT": self.watch_replace,
                "PATCH": self.watch_patch,
                "DELETE": self.watch_disable,
            }
            if method not in handlers:
                return self._bad_method()
            return await handlers[method](request)
        store = self.stores.get(head)
        if store is None:
            return flat_error(
                400,
                "INVALID_MODULE",
                "the module name given seems to be invalid",
                {"resource_path_index": 0},
            )
        if len(parts) == 1:
            if method == "GET":
                return self.get_records(request, store)
            if method == "POST":
                return await self.write(request, store, "insert")
            if method == "PUT":
                return await self.write(request, store, "update")
            if method == "DELETE":
                return self.delete_records(request, store)
            return self._bad_method()
        if len(parts) == 2:
            action = parts[1]
            if action == "upsert":
                if method != "POST":
                    return self._bad_method()
                return await self.write(request, store, "upsert")
            if action == "search":
                if method != "GET":
                    return self._bad_method()
                return self.search(request, store)
            if action == "deleted":
                if method != "GET":
                    return self._bad_method()
                return self.get_deleted(request, store)
            if method == "GET":
                return self.get_record(request, store, action)
            if method == "PUT":
                return await self.write(request, store, "update", path_id=action)
            if method == "DELETE":
                return self.delete_one(request, store, action)
            return self._bad_method()
        return self._url_pattern_error()

    @staticmethod
    def _method(method: str, handlers: dict[str, Any], request: web.Request) -> web.Response:
        handler = handlers.get(method)
        if handler is None:
            return ZohoCrmEmulator._bad_method()
        result: web.Response = handler(request)
        return result

    @staticmethod
    def _url_pattern_error() -> web.Response:
        return flat_error(
            404, "INVALID_URL_PATTERN", "Please check if the URL trying to access is a correct one"
        )

    @staticmethod
    def _bad_method() -> web.Response:
        return flat_error(
            405,
            "INVALID_REQUEST_METHOD",
            "The http request method type is not a valid one",
            {},
        )

    # -- settings / org -----------------------------------------------------------------------

    def get_org(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "org": [
                    {
                        "id": f"{self.opts.org_id}000000000001",
                        "company_name": "ml-connector emulator",
                        "domain_name": f"org{self.opts.org_id}",
                        "primary_email": self.user["email"],
                        "primary_zuid": "700000001",
                        "zgid": f"{self.opts.org_id}01",
                        "country_code": self.opts.datacenter,
                        "currency": "US Dollar - USD",
                        "iso_code": "USD",
                        "currency_symbol": "$",
                        "time_zone": "UTC" if not self.opts.utc_offset_minutes else "Custom",
                        "type": "production",
                        "license_details": {
                            "paid": True,
                            "paid_type": "enterprise",
                            "users_license_purchased": 200,
                            "trial_expiry": None,
                        },
                    }
                ]
            }
        )

    def get_users(self, request: web.Request) -> web.Response:
        user = dict(self.user)
        user.update(
            {
                "full_name": user["name"],
                "status": "active",
                "role": {"name": "CEO", "id": f"{self.opts.org_id}000000026005"},
                "profile": {"name": "Administrator", "id": f"{self.opts.org_id}000000026011"},
            }
        )
        return web.json_response({"users": [user], "info": {"count": 1, "more_records": False}})

    def get_modules(self, request: web.Request) -> web.Response:
        modules = [
            {
                "api_name": m.api_name,
                "module_name": m.api_name,
                "singular_label": m.singular,
                "plural_label": m.api_name.replace("_", " "),
                "id": m.id,
                "api_supported": True,
                "creatable": True,
                "editable": True,
                "deletable": True,
                "viewable": True,
                "generated_type": "default",
                "visible": True,
            }
            for m in self.modules.values()
        ]
        return web.json_response({"modules": modules})

    def get_fields(self, request: web.Request) -> web.Response:
        module = request.query.get("module")
        if not module:
            raise RequestError(
                400, "REQUIRED_PARAM_MISSING", "required param is missing", {"param_name": "module"}
            )
        if module in self.modules:
            defs = self.modules[module].fields
        elif module in self.subforms:
            defs = self.subforms[module]
        else:
            raise RequestError(
                400,
                "INVALID_MODULE",
                "the module name given seems to be invalid",
                {"param_name": "module"},
            )
        return web.json_response({"fields": [f.metadata(self.modules) for f in defs.values()]})

    # -- rendering ----------------------------------------------------------------------------

    def raw_value(self, record: Json, api_name: str) -> Any:
        if api_name == "Created_Time":
            return record["_c"]
        if api_name == "Modified_Time":
            return record["_m"]
        if api_name in ("Created_By", "Modified_By"):
            return record.get(api_name, self.user["id"])
        if api_name == "id":
            return record["id"]
        return record.get(api_name)

    def display_name(self, module: str, rid: str) -> str | None:
        store = self.stores.get(module)
        if store is None:
            return None
        record = store.records.get(rid)
        if record is None:
            return None
        value = record.get(store.mdef.display_field)
        return value if isinstance(value, str) else None

    def _user(self, uid: str) -> Json:
        return self.users.get(uid) or {"name": None, "id": uid, "email": None}

    def render_value(self, fdef: FieldDef, value: Any) -> Any:
        if value is None:
            return None
        dtype = fdef.data_type
        if dtype == "datetime":
            return self.fmt_time(value) if isinstance(value, (int, float)) else value
        if dtype == "lookup":
            return {"name": self.display_name(fdef.lookup_module or "", value), "id": value}
        if dtype == "ownerlookup":
            return self._user(value)
        if dtype == "subform":
            items_defs = self.subforms.get(fdef.subform or "", {})
            rendered = []
            for item in value:
                out: Json = {"id": item["id"]}
                for name, sub in items_defs.items():
                    out[name] = self.render_value(sub, item.get(name))
                rendered.append(out)
            return rendered
        return value

    def render(
        self, store: ModuleStore, record: Json, names: Iterable[str] | None, subforms: bool
    ) -> Json:
        defs = store.mdef.fields
        out: Json = {"id": record["id"]}
        selected = names if names is not None else defs.keys()
        for name in selected:
            if name == "id":
                continue
            fdef = defs.get(name)
            if fdef is None:
                continue
            if fdef.data_type == "subform" and not subforms:
                continue
            out[name] = self.render_value(fdef, self.raw_value(record, name))
        return out

    def write_details(self, record: Json) -> Json:
        return {
            "Modified_Time": self.fmt_time(record["_m"]),
            "Modified_By": {"name": self.user["name"], "id": self.user["id"]},
            "Created_Time": self.fmt_time(record["_c"]),
            "id": record["id"],
            "Created_By": {"name": self.user["name"], "id": self.user["id"]},
        }

    # -- reading ------------------------------------------------------------------------------

    def _since(self, request: web.Request) -> float | None:
        header = request.headers.get("If-Modified-Since")
        if not header:
            return None
        since = parse_http_time(header)
        if since is None:
            raise RequestError(
                400,
                "INVALID_DATA",
                "invalid data",
                {"header_name": "If-Modified-Since", "expected_data_type": "datetime"},
            )
        return since

    def _fields_param(
        self, store: ModuleStore, raw: str | None, required: bool
    ) -> list[str] | None:
        if raw is None or not raw.strip():
            if required:
                raise RequestError(
                    400,
                    "REQUIRED_PARAM_MISSING",
                    "required param is missing",
                    {"param_name": "fields"},
                )
            return None
        names = list(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
        if len(names) > MAX_FIELDS_PARAM:
            raise RequestError(
                400,
                "LIMIT_EXCEEDED",
                "limit exceeded",
                {"limit": MAX_FIELDS_PARAM, "param_name": "fields"},
            )
        if self.opts.strict_fields_param:
            for name in names:
                if name != "id" and name not in store.mdef.fields:
                    raise RequestError(
                        400,
                        "INVALID_DATA",
                        "the field api name given seems to be invalid",
                        {"api_name": name, "param_name": "fields"},
                    )
        return names

    @staticmethod
    def _int_param(request: web.Request, name: str, default: int) -> int:
        raw = request.query.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise RequestError(
                400,
                "INVALID_DATA",
                "invalid data",
                {"param_name": name, "expected_data_type": "integer"},
            )
        return value

    def _new_page_token(self, signature: tuple[Any, ...], offset: int, now: float) -> str:
        token = secrets.token_hex(16)
        self.page_tokens[token] = PageToken(signature, offset, now + PAGE_TOKEN_TTL_S)
        while len(self.page_tokens) > MAX_PAGE_TOKENS:
            self.page_tokens.popitem(last=False)
        return token

    def get_records(self, request: web.Request, store: ModuleStore) -> web.Response:
        query = request.query
        names = self._fields_param(store, query.get("fields"), required=True)
        sort_by = query.get("sort_by", "id")
        if sort_by not in SORTABLE:
            raise RequestError(
                400,
                "INVALID_DATA",
                "invalid data",
                {"param_name": "sort_by", "supported_values": list(SORTABLE)},
            )
        sort_order = query.get("sort_order", "desc")
        if sort_order not in ("asc", "desc"):
            raise RequestError(
                400,
                "INVALID_DATA",
                "invalid data",
                {"param_name": "sort_order", "supported_values": ["asc", "desc"]},
            )
        per_page = min(self._int_param(request, "per_page", MAX_PER_PAGE), MAX_PER_PAGE)
        since = self._since(request)
        ids: tuple[str, ...] | None = None
        if query.get("ids"):
            ids = tuple(i.strip() for i in query["ids"].split(",") if i.strip())
            if len(ids) > 100:
                raise RequestError(
                    400, "LIMIT_EXCEEDED", "limit exceeded", {"limit": 100, "param_name": "ids"}
                )
        signature = (
            tuple(sorted((k, v) for k, v in query.items() if k not in ("page", "page_token"))),
            request.headers.get("If-Modified-Since"),
        )
        now = self.now()
        page_token = query.get("page_token")
        if page_token:
            if "page" in query:
                raise RequestError(
                    400,
                    "AMBIGUITY_DURING_PROCESSING",
                    "ambiguity while processing the request",
                    {"ambiguity_due_to": ["page", "page_token"]},
                )
            token = self.page_tokens.get(page_token)
            if token is None or token.signature != signature:
                raise RequestError(
                    400,
                    "TOKEN_BOUND_DATA_MISMATCH",
                    "The page_token given seems to be invalid or input param is added or "
                    "altered or deleted",
                    {"param_name": "page_token"},
                )
            if token.expires_at <= now:
                raise RequestError(
                    400,
                    "EXPIRED_VALUE",
                    "Page token expired",
                    {"api_name": "page_token", "json_path": "$.query.page_token"},
                )
            start = token.offset
            if start >= TOKEN_PAGE_LIMIT:
                raise RequestError(
                    400,
                    "PAGINATION_LIMIT_EXCEEDED",
                    f"You can only get upto {TOKEN_PAGE_LIMIT} records using page_token param",
                    {"param_name": "page_token"},
                )
        else:
            page = self._int_param(request, "page", 1)
            if page * per_page > DISCRETE_PAGE_LIMIT:
                raise RequestError(
                    400,
                    "DISCRETE_PAGINATION_LIMIT_EXCEEDED",
                    f"You can only get the first {DISCRETE_PAGE_LIMIT} records without using "
                    "page_token param",
                    {"limit": DISCRETE_PAGE_LIMIT},
                )
            start = (page - 1) * per_page
        ordered = store.query(sort_by, sort_order, since, ids)
        if not ordered and since is not None:
            return web.Response(status=304)
        window = ordered[start : start + per_page]
        if not window:
            return web.Response(status=204)
        end = start + len(window)
        more = end < len(ordered)
        next_token = self._new_page_token(signature, end, now) if more else None
        previous_token = (
            self._new_page_token(signature, max(0, start - per_page), now) if start > 0 else None
        )
        data = [self.render(store, store.records[rid], names, subforms=False) for rid in window]
        info = {
            "call": False,
            "per_page": per_page,
            "next_page_token": next_token,
            "count": len(data),
            "sort_by": sort_by,
            "page": start // per_page + 1,
            "previous_page_token": previous_token,
            "page_token_expiry": self.fmt_time(now + PAGE_TOKEN_TTL_S) if next_token else None,
            "sort_order": sort_order,
            "email": False,
            "more_records": more,
        }
        return web.json_response({"data": data, "info": info})

    def _resolve_path_id(self, request: web.Request, store: ModuleStore, value: str) -> str | None:
        """A record id from the path, or an external value with ``X-EXTERNAL: Module.Field``."""
        external = request.headers.get("X-EXTERNAL", "")
        for entry in (e.strip() for e in external.split(",") if e.strip()):
            parts = entry.split(".")
            if len(parts) == 2 and parts[0] == store.mdef.api_name:
                fdef = store.mdef.fields.get(parts[1])
                if fdef is None or not fdef.external:
                    raise RequestError(
                        400,
                        "INVALID_DATA",
                        "invalid data",
                        {"header_name": "X-EXTERNAL", "api_name": parts[1]},
                    )
                found = store.find(parts[1], value)
                return found[0] if found else None
        return value if value in store.records else None

    def get_record(self, request: web.Request, store: ModuleStore, raw_id: str) -> web.Response:
        names = self._fields_param(store, request.query.get("fields"), required=False)
        rid = self._resolve_path_id(request, store, raw_id)
        if rid is None:
            if self.opts.missing_record_status == 204:
                return web.Response(status=204)
            raise RequestError(
                400, "INVALID_DATA", "the id given seems to be invalid", {"resource_path_index": 1}
            )
        return web.json_response(
            {"data": [self.render(store, store.records[rid], names, subforms=True)]}
        )

    def get_deleted(self, request: web.Request, store: ModuleStore) -> web.Response:
        kind = request.query.get("type", "all")
        if kind not in ("all", "recycle", "permanent"):
            raise RequestError(
                400,
                "INVALID_DATA",
                "invalid data",
                {"param_name": "type", "supported_values": ["all", "recycle", "permanent"]},
            )
        per_page = min(self._int_param(request, "per_page", MAX_PER_PAGE), MAX_PER_PAGE)
        page = self._int_param(request, "page", 1)
        since = self._since(request)
        rows = [
            row
            for row in reversed(store.deleted)
            if (kind in ("all", "recycle")) and (since is None or row["_t"] > since)
        ]
        window = rows[(page - 1) * per_page : page * per_page]
        if not window:
            return web.Response(status=304 if since is not None and not rows else 204)
        data = [
            {
                "deleted_by": {"name": self.user["name"], "id": self.user["id"]},
                "id": row["id"],
                "display_name": row["display_name"],
                "type": "recycle",
                "created_by": {"name": self.user["name"], "id": self.user["id"]},
                "deleted_time": self.fmt_time(row["_t"]),
            }
            for row in window
        ]
        return web.json_response(
            {
                "data": data,
                "info": {
                    "per_page": per_page,
                    "count": len(data),
                    "page": page,
                    "more_records": page * per_page < len(rows),
                },
            }
        )

    # -- search -------------------------------------------------------------------------------

    def _criterion(self, store: ModuleStore, field_name: str, operator: str, raw: str) -> Any:
        operators = {
            "equals",
            "not_equal",
            "starts_with",
            "in",
            "greater_than",
            "greater_equal",
            "less_than",
            "less_equal",
            "between",
        }
        if operator not in operators:
            raise CriteriaError("invalid operator found", operator=operator, api_name=field_name)
        if field_name == "id":
            fdef = FieldDef("id", "bigint")
        else:
            found = store.mdef.fields.get(field_name)
            if found is None or found.data_type in ("subform", "multiselectpicklist"):
                raise CriteriaError("the api name given seems to be invalid", api_name=field_name)
            fdef = found
        values = (
            _split_unescaped(raw) if operator in ("in", "between") else [_unescape(raw.strip())]
        )
        if operator == "between" and len(values) != 2:
            raise CriteriaError("between needs two values", api_name=field_name)
        return fdef, operator, values

    def _compare_key(self, fdef: FieldDef, value: Any) -> Any:
        dtype = fdef.data_type
        if dtype in NUMBER_TYPES and fdef.api_name != "id":
            return _number(value)
        if dtype == "datetime":
            if isinstance(value, (int, float)):
                return float(value)
            return parse_datetime(str(value))
        if dtype == "boolean":
            return value if isinstance(value, bool) else str(value).lower() == "true"
        return str(value).casefold()

    def _match(self, store: ModuleStore, record: Json, node: Any) -> bool:
        kind = node[0]
        if kind == "and":
            return self._match(store, record, node[1]) and self._match(store, record, node[2])
        if kind == "or":
            return self._match(store, record, node[1]) or self._match(store, record, node[2])
        fdef, operator, values = node[1]
        value = self.raw_value(record, fdef.api_name)
        if value is None:
            return operator == "not_equal"
        dtype = fdef.data_type
        if dtype in ("lookup", "ownerlookup"):
            if dtype == "lookup":
                name = self.display_name(fdef.lookup_module or "", value) or ""
            else:
                name = str(self._user(value).get("name") or "")
            candidates = [value.casefold(), name.casefold()]
            wanted = [v.casefold() for v in values]
            if operator == "equals":
                return wanted[0] == candidates[0] or wanted[0] in candidates[1]
            if operator == "not_equal":
                return wanted[0] not in candidates
            if operator == "starts_with":
                return candidates[1].startswith(wanted[0])
            if operator == "in":
                return any(w in candidates for w in wanted)
            return False
        have = self._compare_key(fdef, value)
        wanted_keys = [self._compare_key(fdef, v) for v in values]
        if any(w is None for w in wanted_keys) or have is None:
            return False
        want = wanted_keys[0]
        text_like = dtype in TEXT_TYPES and fdef.api_name != "id"
        if operator == "equals":
            if text_like and self.opts.search_equals_contains:
                return want in have
            return bool(have == want)
        if operator == "not_equal":
            return bool(have != want)
        if operator == "starts_with":
            return isinstance(have, str) and have.startswith(str(want))
        if operator == "in":
            return have in wanted_keys
        try:
            if operator == "greater_than":
                return bool(have > want)
            if operator == "greater_equal":
                return bool(have >= want)
            if operator == "less_than":
                return bool(have < want)
            if operator == "less_equal":
                return bool(have <= want)
            if operator == "between":
                return bool(wanted_keys[0] <= have <= wanted_keys[1])
        except TypeError:
            return False
        return False

    def search(self, request: web.Request, store: ModuleStore) -> web.Response:
        query = request.query
        names = self._fields_param(store, query.get("fields"), required=False)
        per_page = min(self._int_param(request, "per_page", MAX_PER_PAGE), MAX_PER_PAGE)
        page = self._int_param(request, "page", 1)
        defs = store.mdef.fields
        predicate: Callable[[Json], bool]
        if query.get("criteria"):
            try:
                tree, count = parse_criteria(query["criteria"])
                if count > MAX_SEARCH_CRITERIA:
                    raise CriteriaError(
                        f"more than {MAX_SEARCH_CRITERIA} criteria", limit=MAX_SEARCH_CRITERIA
                    )
                tree = self._bind_criteria(store, tree)
            except CriteriaError as exc:
                raise RequestError(
                    400, "INVALID_QUERY", "Invalid query formed", exc.details
                ) from exc

            def predicate(record: Json) -> bool:
                return self._match(store, record, tree)

        elif query.get("email"):
            email = query["email"].strip().casefold()
            email_fields = [f.api_name for f in defs.values() if f.data_type == "email"]

            def predicate(record: Json) -> bool:
                return any(str(record.get(f, "")).casefold() == email for f in email_fields)

        elif query.get("phone"):
            digits = re.sub(r"\D", "", query["phone"])
            phone_fields = [f.api_name for f in defs.values() if f.data_type == "phone"]

            def predicate(record: Json) -> bool:
                return bool(digits) and any(
                    digits in re.sub(r"\D", "", str(record.get(f, ""))) for f in phone_fields
                )

        elif query.get("word"):
            word = query["word"].strip().casefold()
            text_fields = [f.api_name for f in defs.values() if f.data_type in STRING_TYPES]

            def predicate(record: Json) -> bool:
                return any(word in str(record.get(f, "")).casefold() for f in text_fields)

        else:
            raise RequestError(
                400,
                "REQUIRED_PARAM_MISSING",
                "One of the expected parameter is missing",
                {"param_name": "criteria"},
            )
        cap = self.opts.search_max_results
        start = (page - 1) * per_page
        if start >= cap:
            raise RequestError(
                400,
                "LIMIT_REACHED",
                f"search results are limited to {cap} records",
                {"limit": cap},
            )
        matches = [r for r in store.records.values() if predicate(r)][:cap]
        window = matches[start : start + per_page]
        if not window:
            return web.Response(status=204)
        data = [self.render(store, record, names, subforms=False) for record in window]
        return web.json_response(
            {
                "data": data,
                "info": {
                    "per_page": per_page,
                    "count": len(data),
                    "page": page,
                    "more_records": start + len(window) < len(matches),
                },
            }
        )

    def _bind_criteria(self, store: ModuleStore, node: Any) -> Any:
        if node[0] in ("and", "or"):
            return (
                node[0],
                self._bind_criteria(store, node[1]),
                self._bind_criteria(store, node[2]),
            )
        _, field_name, operator, raw = node
        return ("cond", self._criterion(store, field_name, operator, raw))

    # -- COQL ---------------------------------------------------------------------------------

    def _coql_field(
        self, store: ModuleStore, path: str
    ) -> tuple[ModuleStore, FieldDef, str | None]:
        """``Field`` or ``Lookup.Field`` -> (store of the final field, its def, lookup hop)."""
        head, _, tail = path.partition(".")
        if head == "id" and not tail:
            return store, FieldDef("id", "bigint"), None
        fdef = store.mdef.fields.get(head)
        if fdef is None or fdef.data_type == "subform":
            raise CoqlError(
                "INVALID_QUERY", "column given seems to be invalid", {"column_name": path}
            )
        if not tail:
            return store, fdef, None
        if fdef.data_type != "lookup" or not fdef.lookup_module:
            raise CoqlError(
                "INVALID_QUERY", "column given seems to be invalid", {"column_name": path}
            )
        target = self.stores[fdef.lookup_module]
        if tail == "id":
            return target, FieldDef("id", "bigint"), head
        sub = target.mdef.fields.get(tail)
        if sub is None or sub.data_type == "subform":
            raise CoqlError(
                "INVALID_QUERY", "column given seems to be invalid", {"column_name": path}
            )
        return target, sub, head

    def _coql_raw(self, record: Json, bound: tuple[ModuleStore, FieldDef, str | None]) -> Any:
        target, fdef, hop = bound
        if hop is not None:
            linked = record.get(hop)
            if linked is None:
                return None
            record = target.records.get(linked) or {}
            if not record:
                return None
        return self.raw_value(record, fdef.api_name)

    def _coql_key(self, fdef: FieldDef, value: Any) -> Any:
        if value is None:
            return None
        dtype = fdef.data_type
        if fdef.api_name == "id" or dtype in ("lookup", "ownerlookup"):
            return str(value)
        if dtype in NUMBER_TYPES:
            return _number(value)
        if dtype == "datetime":
            if isinstance(value, (int, float)):
                return float(value)
            return parse_datetime(str(value))
        if dtype == "boolean":
            return bool(value)
        return str(value).casefold()

    def _coql_bind(self, store: ModuleStore, node: Any) -> Any:
        kind = node[0]
        if kind in ("and", "or"):
            return (kind, self._coql_bind(store, node[1]), self._coql_bind(store, node[2]))
        bound = self._coql_field(store, node[1])
        return (kind, bound, *node[2:])

    def _coql_match(self, record: Json, node: Any) -> bool:
        kind = node[0]
        if kind == "and":
            return self._coql_match(record, node[1]) and self._coql_match(record, node[2])
        if kind == "or":
            return self._coql_match(record, node[1]) or self._coql_match(record, node[2])
        bound = node[1]
        fdef = bound[1]
        raw = self._coql_raw(record, bound)
        if kind == "isnull":
            is_null = raw is None or raw == ""
            return is_null != node[2]
        have = self._coql_key(fdef, raw)
        if kind == "like":
            if have is None:
                return False
            pattern = "".join(
                ".*" if ch == "%" else "." if ch == "_" else re.escape(ch)
                for ch in str(node[2]).casefold()
            )
            return bool(re.fullmatch(pattern, str(have), re.DOTALL)) != node[3]
        if kind == "in":
            if have is None:
                return False
            return (have in [self._coql_key(fdef, v) for v in node[2]]) != node[3]
        if kind == "between":
            low, high = self._coql_key(fdef, node[2]), self._coql_key(fdef, node[3])
            if have is None or low is None or high is None:
                return False
            try:
                return bool(low <= have <= high) != node[4]
            except TypeError:
                return False
        operator, literal = node[2], node[3]
        want = self._coql_key(fdef, literal)
        if have is None or want is None:
            return operator == "!=" and (have is None) != (want is None)
        try:
            return {
                "=": have == want,
                "!=": have != want,
                "<": have < want,
                "<=": have <= want,
                ">": have > want,
                ">=": have >= want,
            }[operator]
        except TypeError:
            return False

    async def coql(self, request: web.Request) -> web.Response:
        body = await self._read_json(request)
        query = body.get("select_query") if isinstance(body, dict) else None
        if not isinstance(query, str) or not query.strip():
            raise RequestError(
                400,
                "MANDATORY_NOT_FOUND",
                "required field not found",
                {"api_name": "select_query", "json_path": "$.select_query"},
            )
        try:
            parsed = CoqlParser(query).parse()
            store = self.stores.get(parsed.module)
            if store is None:
                raise CoqlError(
                    "INVALID_QUERY", "module given seems to be invalid", {"module": parsed.module}
                )
            if parsed.limit > self.opts.coql_max_limit or parsed.limit < 1:
                raise CoqlError(
                    "LIMIT_EXCEEDED",
                    f"limit can be at most {self.opts.coql_max_limit}",
                    {"limit": self.opts.coql_max_limit},
                )
            if parsed.offset + parsed.limit > TOKEN_PAGE_LIMIT:
                raise CoqlError(
                    "LIMIT_EXCEEDED",
                    f"offset and limit exceed {TOKEN_PAGE_LIMIT}",
                    {"limit": TOKEN_PAGE_LIMIT},
                )
            selected = [(name, self._coql_field(store, name)) for name in parsed.fields]
            where = self._coql_bind(store, parsed.where) if parsed.where is not None else None
            order = [(self._coql_field(store, name), desc) for name, desc in parsed.order]
        except CoqlError as exc:
            raise RequestError(400, exc.code, str(exc), exc.details) from exc
        records = [r for r in store.records.values() if where is None or self._coql_match(r, where)]
        records.sort(key=_sort_n)
        for bound, desc in reversed(order):
            fdef = bound[1]
            present = [
                r for r in records if self._coql_key(fdef, self._coql_raw(r, bound)) is not None
            ]
            missing = [r for r in records if self._coql_key(fdef, self._coql_raw(r, bound)) is None]
            present.sort(
                key=lambda r, b=bound, f=fdef: self._coql_key(f, self._coql_raw(r, b)),
                reverse=desc,
            )
            records = present + missing if not desc else missing + present
        window = records[parsed.offset : parsed.offset + parsed.limit]
        if not window:
            return web.Response(status=204)
        data = []
        for record in window:
            row: Json = {"id": record["id"]}
            for name, bound in selected:
                fdef = bound[1]
                raw = self._coql_raw(record, bound)
                if raw is None:
                    row[name] = None
                elif fdef.data_type in ("lookup", "ownerlookup"):
                    row[name] = {"id": raw}
                elif fdef.data_type == "datetime":
                    row[name] = self.fmt_time(raw)
                else:
                    row[name] = raw
            data.append(row)
        return web.json_response(
            {
                "data": data,
                "info": {
                    "count": len(data),
                    "more_records": parsed.offset + len(window) < len(records),
                },
            }
        )

    # -- validation ---------------------------------------------------------------------------

    @staticmethod
    def parse_external_header(request: web.Request, module: str) -> dict[tuple[str, ...], str]:
        """``X-EXTERNAL: Contacts.Account_Name.Ext_Id,Invoices.Invoiced_Items.Product_Name.X``."""
        mapping: dict[tuple[str, ...], str] = {}
        for entry in request.headers.get("X-EXTERNAL", "").split(","):
            parts = [p for p in entry.strip().split(".") if p]
            if len(parts) >= 3 and parts[0] == module:
                mapping[tuple(parts[1:-1])] = parts[-1]
        return mapping

    def convert(
        self,
        fdef: FieldDef,
        value: Any,
        path: str,
        external: dict[tuple[str, ...], str],
        chain: tuple[str, ...],
    ) -> Any:
        """Validate one input value and turn it into its stored form. Raises ZohoError."""
        if value is None:
            return None
        dtype = fdef.data_type
        if dtype in TEXT_TYPES or dtype in ("email", "phone"):
            if not isinstance(value, str):
                raise invalid_type(fdef, path)
            if fdef.length is not None and len(value) > fdef.length:
                raise invalid_value(fdef.api_name, path, maximum_length=fdef.length)
            if value == "":
                return None
            if dtype == "email" and not EMAIL_RE.match(value):
                raise invalid_type(fdef, path)
            if dtype == "phone" and not PHONE_RE.match(value.strip()):
                raise invalid_type(fdef, path)
            return value
        if dtype == "picklist":
            if not isinstance(value, str):
                raise invalid_type(fdef, path)
            if value in ("", "-None-"):
                return None
            if (
                self.opts.strict_picklists
                and fdef.pick_list_values
                and value not in fdef.pick_list_values
            ):
                raise invalid_value(
                    fdef.api_name, path, supported_values=["-None-", *fdef.pick_list_values]
                )
            return value
        if dtype == "multiselectpicklist":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise invalid_type(fdef, path, "jsonarray")
            if self.opts.strict_picklists and fdef.pick_list_values:
                for item in value:
                    if item not in fdef.pick_list_values:
                        raise invalid_value(
                            fdef.api_name, path, supported_values=list(fdef.pick_list_values)
                        )
            return list(value)
        if dtype in ("integer", "bigint"):
            if isinstance(value, bool):
                raise invalid_type(fdef, path)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
                value = int(value.strip())
            if not isinstance(value, int):
                raise invalid_type(fdef, path)
            if fdef.length is not None and len(str(abs(value))) > fdef.length:
                raise invalid_value(fdef.api_name, path, maximum_length=fdef.length)
            return value
        if dtype in ("double", "currency"):
            number = _number(value)
            if number is None:
                raise invalid_type(fdef, path)
            digits = len(str(int(abs(number))))
            if fdef.length is not None and digits > fdef.length:
                raise invalid_value(fdef.api_name, path, maximum_length=fdef.length)
            return round(number, 9) if dtype == "double" else round(number, 2)
        if dtype == "boolean":
            if not isinstance(value, bool):
                raise invalid_type(fdef, path)
            return value
        if dtype == "date":
            if not isinstance(value, str) or not DATE_RE.match(value):
                raise invalid_type(fdef, path)
            try:
                date.fromisoformat(value)
            except ValueError:
                raise invalid_type(fdef, path) from None
            return value
        if dtype == "datetime":
            parsed = parse_datetime(value) if isinstance(value, str) else None
            if parsed is None:
                raise invalid_type(fdef, path)
            return parsed
        if dtype == "ownerlookup":
            uid = value.get("id") if isinstance(value, dict) else None
            if uid is None:
                raise invalid_type(fdef, path, "jsonobject")
            if str(uid) not in self.users:
                raise invalid_value(fdef.api_name, path)
            return str(uid)
        if dtype == "lookup":
            return self._convert_lookup(fdef, value, path, external, chain)
        if dtype == "subform":
            raise invalid_type(fdef, path, "jsonarray")  # handled by convert_subform
        raise invalid_type(fdef, path)

    def _convert_lookup(
        self,
        fdef: FieldDef,
        value: Any,
        path: str,
        external: dict[tuple[str, ...], str],
        chain: tuple[str, ...],
    ) -> str:
        if not isinstance(value, dict):
            raise invalid_type(fdef, path, "jsonobject")
        target = self.stores[fdef.lookup_module or ""]
        ext_field = external.get((*chain, fdef.api_name))
        if ext_field is not None:
            ext_def = target.mdef.fields.get(ext_field)
            if ext_def is None or not ext_def.external:
                raise invalid_value(fdef.api_name, path)
            if ext_field in value:
                found = target.find(ext_field, value[ext_field])
                if not found:
                    raise invalid_value(fdef.api_name, f"{path}.{ext_field}")
                return found[0]
        rid = value.get("id")
        if rid is not None:
            rid = str(rid)
            if rid not in target.records:
                raise invalid_value(fdef.api_name, f"{path}.id")
            return rid
        name = value.get("name")
        if isinstance(name, str) and name:
            display = target.mdef.display_field
            if display in target.index:
                found = target.find(display, name)
            else:
                wanted = name.strip().casefold()
                found = [
                    r["id"]
                    for r in target.records.values()
                    if str(r.get(display, "")).strip().casefold() == wanted
                ]
            if len(found) == 1:
                return found[0]
        raise invalid_value(fdef.api_name, path)

    def convert_subform(
        self,
        fdef: FieldDef,
        value: Any,
        path: str,
        external: dict[tuple[str, ...], str],
        existing: list[Json] | None,
    ) -> list[Json]:
        """Validate a subform array; items keep their ``id`` / ``_delete`` markers."""
        if not isinstance(value, list):
            raise invalid_type(fdef, path, "jsonarray")
        defs = self.subforms.get(fdef.subform or "", {})
        known_ids = {item["id"] for item in existing or []}
        items: list[Json] = []
        for index, item in enumerate(value):
            item_path = f"{path}[{index}]"
            if not isinstance(item, dict):
                raise invalid_type(fdef, item_path, "jsonobject")
            out: Json = {}
            item_id = item.get("id")
            if item_id is not None:
                item_id = str(item_id)
                if item_id not in known_ids:
                    raise invalid_value("id", f"{item_path}.id")
                out["id"] = item_id
                if "_delete" in item:
                    out["_delete"] = True
                    items.append(out)
                    continue
            for key, raw in item.items():
                if key in ("id", "_delete") or key.startswith("$"):
                    continue
                sub = defs.get(key)
                if sub is None:
                    raise ZohoError(
                        "INVALID_DATA",
                        "the field api name given seems to be invalid",
                        {"api_name": key, "json_path": f"{item_path}.{key}"},
                    )
                if sub.read_only:
                    continue
                out[key] = self.convert(sub, raw, f"{item_path}.{key}", external, (fdef.api_name,))
            if item_id is None:
                for sub in defs.values():
                    if sub.system_mandatory and out.get(sub.api_name) is None:
                        raise mandatory_missing(sub.api_name, f"{item_path}.{sub.api_name}")
            items.append(out)
        return items

    def prepare(
        self,
        store: ModuleStore,
        item: Json,
        index: int,
        external: dict[tuple[str, ...], str],
        existing: Json | None,
        allow_read_only: bool = False,
    ) -> dict[str, Any]:
        """Validate the keys given for one record and convert them. Raises ZohoError."""
        defs = store.mdef.fields
        values: dict[str, Any] = {}
        for key, raw in item.items():
            if key == "id" or key.startswith("$"):
                continue
            fdef = defs.get(key)
            path = f"$.data[{index}].{key}"
            if fdef is None:
                raise ZohoError(
                    "INVALID_DATA",
                    "the field api name given seems to be invalid",
                    {"api_name": key, "json_path": path},
                )
            if fdef.read_only and not allow_read_only:
                continue
            if fdef.data_type == "subform":
                if raw is None:
                    values[fdef.api_name] = []
                    continue
                current = existing.get(fdef.api_name) if existing else None
                values[fdef.api_name] = self.convert_subform(fdef, raw, path, external, current)
            elif allow_read_only and fdef.api_name in ("Created_Time", "Modified_Time"):
                converted = self.convert(fdef, raw, path, external, ())
                values["_c" if fdef.api_name == "Created_Time" else "_m"] = converted
            else:
                values[fdef.api_name] = self.convert(fdef, raw, path, external, ())
        for module, field_name, bad in self.reject_rules:
            if (
                module == store.mdef.api_name
                and field_name in item
                and str(item[field_name]) == bad
            ):
                raise invalid_value(field_name, f"$.data[{index}].{field_name}")
        return values

    def _check_mandatory(
        self, store: ModuleStore, values: dict[str, Any], index: int, creating: bool
    ) -> None:
        for name in store.mdef.mandatory:
            if (creating or name in values) and values.get(name) is None:
                raise mandatory_missing(name, f"$.data[{index}].{name}")
        line_items = store.mdef.line_items
        if line_items and self.opts.line_items_required:
            if creating and not values.get(line_items):
                raise mandatory_missing(line_items, f"$.data[{index}].{line_items}")
            if not creating and line_items in values and not values[line_items]:
                raise mandatory_missing(line_items, f"$.data[{index}].{line_items}")

    def _check_unique(
        self, store: ModuleStore, values: dict[str, Any], index: int, own_id: str | None
    ) -> None:
        errors: list[Json] = []
        for name in store.mdef.unique_fields():
            value = values.get(name)
            if value is None:
                continue
            others = [rid for rid in store.find(name, value) if rid != own_id]
            if others:
                errors.append(
                    ZohoError(
                        "DUPLICATE_DATA",
                        "duplicate data",
                        {
                            "api_name": name,
                            "json_path": f"$.data[{index}].{name}",
                            "duplicate_record": {
                                "id": others[0],
                                "Owner": {
                                    "name": self.user["name"],
                                    "id": self.user["id"],
                                    "zuid": "700000001",
                                },
                                "module": {
                                    "api_name": store.mdef.api_name,
                                    "id": store.mdef.id,
                                },
                            },
                            "id": others[0],
                            "more_records": len(others) > 1,
                        },
                    ).body
                )
        if len(errors) == 1:
            error = ZohoError("DUPLICATE_DATA", "duplicate data")
            error.body = errors[0]
            raise error
        if errors:
            raise ZohoError(
                "MULTIPLE_OR_MULTI_ERRORS", "Multiple errors in the request", {"errors": errors}
            )

    # -- applying changes ---------------------------------------------------------------------

    def _derive(self, store: ModuleStore, record: Json) -> None:
        """Read-only values Zoho computes: Full_Name, line-item and order totals."""
        module = store.mdef.api_name
        if module == "Contacts":
            full = " ".join(
                str(v) for v in (record.get("First_Name"), record.get("Last_Name")) if v
            )
            store.replace_values(record, {"Full_Name": full or None})
        line_items = store.mdef.line_items
        if line_items and line_items in record:
            names = line_item_names(self.opts.line_item_casing)
            products = self.stores["Products"].records
            sub_total = 0.0
            for item in record[line_items]:
                quantity = float(item.get(names["quantity"]) or 0)
                price = item.get(names["list_price"])
                if price is None:
                    product = products.get(item.get("Product_Name") or "")
                    price = product.get("Unit_Price") if product else None
                    if price is not None:
                        item[names["list_price"]] = price
                total = round(quantity * float(price or 0), 2)
                net = round(
                    total
                    - float(item.get(names["discount"]) or 0)
                    + float(item.get(names["tax"]) or 0),
                    2,
                )
                item[names["total"]] = total
                item[names["net_total"]] = net
                sub_total += net
            sub_total = round(sub_total, 2)
            grand = round(
                sub_total
                - float(record.get("Discount") or 0)
                + float(record.get("Tax") or 0)
                + float(record.get("Adjustment") or 0),
                2,
            )
            record["Sub_Total"] = sub_total
            record["Grand_Total"] = grand
        if module == "Deals":
            amount = record.get("Amount")
            probability = record.get("Probability")
            if amount is not None and probability is not None:
                record["Expected_Revenue"] = round(float(amount) * float(probability) / 100, 2)

    def _subform_items(self, new_items: list[Json]) -> list[Json]:
        out = []
        for item in new_items:
            item = dict(item)
            item.pop("_delete", None)
            item["id"] = item.get("id") or self.ids()
            out.append(item)
        return out

    def create_record(
        self, store: ModuleStore, values: dict[str, Any], rid: str | None = None
    ) -> Json:
        now = self.now()
        self.seq += 1
        modified = values.pop("_m", None)
        created = values.pop("_c", None)
        if created is None:
            created = min(now, modified) if modified is not None else now
        record: Json = {
            "id": rid or self.ids(),
            "_n": self.seq,
            "_c": created,
            "_m": modified if modified is not None else max(now, created),
            "Owner": self.user["id"],
        }
        for name, value in values.items():
            if value is None:
                continue
            fdef = store.mdef.fields[name]
            record[name] = self._subform_items(value) if fdef.data_type == "subform" else value
        self._derive(store, record)
        store.add(record)
        return record

    def update_record(self, store: ModuleStore, record: Json, values: dict[str, Any]) -> list[str]:
        """Apply values; returns the api names that changed (Modified_Time bumps per options)."""
        changes: dict[str, Any] = {}
        for name, value in values.items():
            if name in ("_c", "_m"):
                continue
            fdef = store.mdef.fields[name]
            if fdef.data_type == "subform":
                current = {item["id"]: item for item in record.get(name, [])}
                replace = self.opts.subform_update_mode == "replace"
                merged = {} if replace or not value else dict(current)
                for item in value:
                    item_id = item.get("id")
                    if item_id is None:
                        new_item = dict(item)
                        new_item["id"] = self.ids()
                        merged[new_item["id"]] = new_item
                    elif item.get("_delete"):
                        merged.pop(item_id, None)
                    else:
                        merged[item_id] = {**current[item_id], **item}
                new_list = list(merged.values())
                if new_list != record.get(name, []):
                    changes[name] = new_list
            elif record.get(name) != value:
                changes[name] = value
        if changes:
            store.replace_values(record, changes)
            self._derive(store, record)
        explicit_m = values.get("_m")
        if changes or self.opts.noop_update_bumps_modified_time:
            record["_m"] = explicit_m if explicit_m is not None else max(self.now(), record["_m"])
            store.changed()
        return list(changes)

    # -- writing ------------------------------------------------------------------------------

    async def write(
        self, request: web.Request, store: ModuleStore, mode: str, path_id: str | None = None
    ) -> web.Response:
        body = await self._read_json(request)
        if body is _BAD_BODY or not isinstance(body, dict):
            raise RequestError(
                400, "INVALID_DATA", "invalid data", {"expected_data_type": "jsonobject"}
            )
        data = body.get("data")
        if not isinstance(data, list) or not data:
            raise RequestError(
                400,
                "MANDATORY_NOT_FOUND",
                "required field not found",
                {"api_name": "data", "json_path": "$.data"},
            )
        limit = 1 if path_id is not None else MAX_WRITE_RECORDS
        if len(data) > limit:
            return wrapped_error(
                400,
                "LIMIT_EXCEEDED",
                "count of records in your request exceeds the limit",
                {"maximum_length": limit, "api_name": "data"},
            )
        dup_fields: list[str] = []
        if mode == "upsert":
            dup_fields_or_error = self._duplicate_check_fields(store, body)
            if isinstance(dup_fields_or_error, web.Response):
                return dup_fields_or_error
            dup_fields = dup_fields_or_error
        unmodified_since: float | None = None
        if mode in ("update", "upsert") and request.headers.get("If-Unmodified-Since"):
            unmodified_since = parse_http_time(request.headers["If-Unmodified-Since"])
        if path_id is not None:
            resolved = self._resolve_path_id(request, store, path_id)
            if resolved is None:
                return wrapped_error(
                    400, "INVALID_DATA", "invalid record id", {"resource_path_index": 1}
                )
            path_id = resolved
        external = self.parse_external_header(request, store.mdef.api_name)
        self.counters["write_calls"] += 1
        results: list[Json] = []
        changes: list[Change] = []
        for index, item in enumerate(data):
            try:
                if not isinstance(item, dict):
                    raise ZohoError(
                        "INVALID_DATA",
                        "invalid data",
                        {
                            "expected_data_type": "jsonobject",
                            "api_name": "data",
                            "json_path": f"$.data[{index}]",
                        },
                    )
                if path_id is not None:
                    item = {**item, "id": path_id}
                result = self._write_one(
                    request,
                    store,
                    mode,
                    item,
                    index,
                    dup_fields,
                    external,
                    unmodified_since,
                    changes,
                )
            except ZohoError as exc:
                result = exc.body
                self.record_errors[result["code"]] += 1
            results.append(result)
        self._notify(changes)
        successes = sum(1 for r in results if r["status"] == "success")
        if successes == len(results):
            status = 201 if mode == "insert" else 200
        elif successes:
            status = 207
        elif all(r["code"] == "ALREADY_MODIFIED" for r in results):
            status = 412
        else:
            status = 400
        return web.json_response({"data": results}, status=status)

    def _duplicate_check_fields(self, store: ModuleStore, body: Json) -> list[str] | web.Response:
        mdef = store.mdef
        allowed = mdef.unique_fields()
        if mdef.dup_field:
            allowed = [mdef.dup_field, *[f for f in allowed if f != mdef.dup_field]]
        given = body.get("duplicate_check_fields")
        if given is None:
            return allowed
        if not isinstance(given, list) or not given:
            return wrapped_error(
                400,
                "INVALID_DATA",
                "invalid data",
                {
                    "expected_data_type": "jsonarray",
                    "api_name": "duplicate_check_fields",
                    "json_path": "$.duplicate_check_fields",
                },
            )
        for index, name in enumerate(given):
            if not isinstance(name, str) or name not in allowed:
                return wrapped_error(
                    400,
                    "INVALID_DATA",
                    "invalid data",
                    {
                        "api_name": str(name),
                        "json_path": f"$.duplicate_check_fields[{index}]",
                        "supported_values": allowed,
                    },
                )
        return list(dict.fromkeys(given))

    def _write_one(
        self,
        request: web.Request,
        store: ModuleStore,
        mode: str,
        item: Json,
        index: int,
        dup_fields: list[str],
        external: dict[tuple[str, ...], str],
        unmodified_since: float | None,
        changes: list[Change],
    ) -> Json:
        target: Json | None = None
        duplicate_field: str | None = None
        raw_id = item.get("id")
        if mode == "update" or (mode == "upsert" and raw_id):
            if raw_id is None or raw_id == "":
                raise mandatory_missing("id", f"$.data[{index}].id")
            target = store.records.get(str(raw_id))
            if target is None:
                raise invalid_value("id", f"$.data[{index}].id")
        values = self.prepare(store, item, index, external, target)
        if mode == "upsert" and target is None:
            for name in dup_fields:
                found = store.find(name, values.get(name))
                if found:
                    target = store.records[found[0]]
                    duplicate_field = name
                    break
        if target is not None and unmodified_since is not None and target["_m"] > unmodified_since:
            error = ZohoError(
                "ALREADY_MODIFIED",
                "record updated time has already passed if-unmodified-since time",
                self.write_details(target),
            )
            raise error
        creating = target is None
        self._check_mandatory(store, values, index, creating)
        self._check_unique(store, values, index, None if target is None else target["id"])
        if target is None:
            record = self.create_record(store, values)
            self.counters["records_inserted"] += 1
            changes.append(Change(store.mdef.api_name, "insert", record["id"], list(values)))
            details = self.write_details(record)
            if mode == "upsert":
                self._echo_external(store, record, details)
                return {
                    "code": "SUCCESS",
                    "duplicate_field": None,
                    "action": "insert",
                    "details": details,
                    "message": "record added",
                    "status": "success",
                }
            details["$approval_state"] = "approved"
            return {
                "code": "SUCCESS",
                "details": details,
                "message": "record added",
                "status": "success",
            }
        changed = self.update_record(store, target, values)
        self.counters["records_updated"] += 1
        if changed or self.opts.noop_update_bumps_modified_time:
            changes.append(Change(store.mdef.api_name, "update", target["id"], changed))
        details = self.write_details(target)
        if mode == "upsert":
            self._echo_external(store, target, details)
            return {
                "code": "SUCCESS",
                "duplicate_field": duplicate_field,
                "action": "update",
                "details": details,
                "message": "record updated",
                "status": "success",
            }
        details["$approval_state"] = "approved"
        return {
            "code": "SUCCESS",
            "details": details,
            "message": "record updated",
            "status": "success",
        }

    @staticmethod
    def _echo_external(store: ModuleStore, record: Json, details: Json) -> None:
        for name in store.mdef.external:
            if record.get(name) is not None:
                details[name] = record[name]

    def _delete(self, store: ModuleStore, rid: str) -> bool:
        record = store.remove(rid)
        if record is None:
            return False
        store.deleted.append(
            {
                "id": rid,
                "display_name": record.get(store.mdef.display_field),
                "_t": max(self.now(), record["_m"]),
            }
        )
        self.counters["records_deleted"] += 1
        return True

    def delete_records(self, request: web.Request, store: ModuleStore) -> web.Response:
        raw = request.query.get("ids", "")
        ids = [i.strip() for i in raw.split(",") if i.strip()]
        if not ids:
            raise RequestError(
                400, "REQUIRED_PARAM_MISSING", "required param is missing", {"param_name": "ids"}
            )
        if len(ids) > MAX_WRITE_RECORDS:
            raise RequestError(
                400,
                "LIMIT_EXCEEDED",
                "limit exceeded",
                {"limit": MAX_WRITE_RECORDS, "param_name": "ids"},
            )
        results, changes = [], []
        for rid in ids:
            if self._delete(store, rid):
                results.append(
                    {
                        "code": "SUCCESS",
                        "details": {"id": rid},
                        "message": "record deleted",
                        "status": "success",
                    }
                )
                changes.append(Change(store.mdef.api_name, "delete", rid, []))
            else:
                results.append(
                    ZohoError(
                        "INVALID_DATA", "the related id given seems to be invalid", {"id": rid}
                    ).body
                )
        self._notify(changes)
        successes = sum(1 for r in results if r["status"] == "success")
        status = 200 if successes == len(results) else 207 if successes else 400
        return web.json_response({"data": results}, status=status)

    def delete_one(self, request: web.Request, store: ModuleStore, raw_id: str) -> web.Response:
        rid = self._resolve_path_id(request, store, raw_id)
        if rid is None or not self._delete(store, rid):
            return wrapped_error(
                400, "INVALID_DATA", "invalid record id", {"resource_path_index": 1}
            )
        self._notify([Change(store.mdef.api_name, "delete", rid, [])])
        return web.json_response(
            {
                "data": [
                    {
                        "code": "SUCCESS",
                        "details": {"id": rid},
                        "message": "record deleted",
                        "status": "success",
                    }
                ]
            }
        )

    # -- notifications ------------------------------------------------------------------------

    def _watch_item(self, item: Any, index: int, request: web.Request, partial: bool) -> Json:
        """Validate one ``watch`` item; returns normalized values or raises ZohoError."""
        if not isinstance(item, dict):
            raise ZohoError(
                "INVALID_DATA",
                "invalid data",
                {"expected_data_type": "jsonobject", "json_path": f"$.watch[{index}]"},
            )
        path = f"$.watch[{index}]"
        out: Json = {}
        channel_id = item.get("channel_id")
        if channel_id is None:
            raise mandatory_missing("channel_id", f"{path}.channel_id")
        if isinstance(channel_id, bool) or not re.fullmatch(r"\d{1,19}", str(channel_id)):
            raise ZohoError(
                "INVALID_DATA",
                "invalid data",
                {
                    "expected_data_type": "long",
                    "api_name": "channel_id",
                    "json_path": f"{path}.channel_id",
                },
            )
        out["channel_id"] = str(channel_id)
        events = item.get("events")
        if events is None and not partial:
            raise mandatory_missing("events", f"{path}.events")
        if events is not None:
            if not isinstance(events, list) or not events:
                raise ZohoError(
                    "INVALID_DATA",
                    "invalid data",
                    {
                        "expected_data_type": "jsonarray",
                        "api_name": "events",
                        "json_path": f"{path}.events",
                    },
                )
            parsed: dict[str, set[str]] = {}
            for event_index, event in enumerate(events):
                module, _, operation = str(event).rpartition(".")
                if module not in self.modules or operation not in (
                    "create",
                    "edit",
                    "delete",
                    "all",
                ):
                    raise invalid_value("events", f"{path}.events[{event_index}]")
                ops = {"create", "edit", "delete"} if operation == "all" else {operation}
                parsed.setdefault(module, set()).update(ops)
            out["events"] = parsed
        notify_url = item.get("notify_url")
        if notify_url is None and not partial:
            raise mandatory_missing("notify_url", f"{path}.notify_url")
        if notify_url is not None:
            if not isinstance(notify_url, str) or not urlsplit(notify_url).scheme.startswith(
                "http"
            ):
                raise invalid_value("notify_url", f"{path}.notify_url")
            out["notify_url"] = notify_url
        if "token" in item:
            token = item["token"]
            if token is not None and (not isinstance(token, str) or len(token) > MAX_WATCH_TOKEN):
                raise invalid_value("token", f"{path}.token", maximum_length=MAX_WATCH_TOKEN)
            out["token"] = token
        now = self.now()
        if item.get("channel_expiry") is not None or not partial:
            expiry_raw = item.get("channel_expiry")
            expiry = now + DEFAULT_CHANNEL_EXPIRY_S
            if expiry_raw is not None:
                parsed_expiry = parse_datetime(expiry_raw) if isinstance(expiry_raw, str) else None
                fractional = isinstance(expiry_raw, str) and bool(
                    re.search(r"T\d{2}:\d{2}:\d{2}\.\d", expiry_raw)
                )
                if (
                    parsed_expiry is None
                    or parsed_expiry <= now
                    or (fractional and self.opts.reject_fractional_channel_expiry)
                ):
                    raise invalid_value("channel_expiry", f"{path}.channel_expiry")
                if parsed_expiry <= now + MAX_CHANNEL_EXPIRY_S:
                    expiry = parsed_expiry
            out["expires_at"] = expiry
        for flag in ("return_affected_field_values", "notify_on_related_action"):
            if flag in item:
                if not isinstance(item[flag], bool):
                    raise invalid_type(FieldDef(flag, "boolean"), f"{path}.{flag}")
                out[flag] = item[flag]
        if item.get("_delete_events") is True:
            out["_delete_events"] = True
        return out

    def _watch_details(self, watch: Watch) -> Json:
        return {
            "channel_expiry": self.fmt_time(watch.expires_at),
            "resource_uri": f"{watch.api_domain}/crm/{API_VERSION}/{watch.module}",
            "resource_id": self.modules[watch.module].id,
            "resource_name": watch.module,
            "channel_id": watch.channel_id,
        }

    async def _watch_body(self, request: web.Request) -> list[Any]:
        body = await self._read_json(request)
        items = body.get("watch") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise RequestError(
                400,
                "MANDATORY_NOT_FOUND",
                "required field not found",
                {"api_name": "watch", "json_path": "$.watch"},
            )
        if len(items) > 50:
            raise RequestError(
                400, "LIMIT_EXCEEDED", "limit exceeded", {"limit": 50, "api_name": "watch"}
            )
        return items

    @staticmethod
    def _multi_status(results: list[Json], ok: int) -> int:
        successes = sum(1 for r in results if r["status"] == "success")
        return ok if successes == len(results) else 207 if successes else 400

    async def watch_enable(self, request: web.Request) -> web.Response:
        items = await self._watch_body(request)
        results: list[Json] = []
        for index, item in enumerate(items):
            try:
                values = self._watch_item(item, index, request, partial=False)
            except ZohoError as exc:
                results.append(exc.body)
                continue
            events = []
            for module, ops in values["events"].items():
                watch = Watch(
                    channel_id=values["channel_id"],
                    module=module,
                    events=set(ops),
                    notify_url=values["notify_url"],
                    token=values.get("token"),
                    expires_at=values["expires_at"],
                    return_affected_field_values=values.get("return_affected_field_values", False),
                    notify_on_related_action=values.get("notify_on_related_action", True),
                    api_domain=self.api_domain(request),
                )
                self.watches[(watch.channel_id, module)] = watch
                events.append(self._watch_details(watch))
            results.append(
                {
                    "code": "SUCCESS",
                    "details": {"events": events},
                    "message": "Successfully subscribed for actions-watch of the given module",
                    "status": "success",
                }
            )
        return web.json_response({"watch": results}, status=self._multi_status(results, 201))

    async def watch_replace(self, request: web.Request) -> web.Response:
        items = await self._watch_body(request)
        results: list[Json] = []
        for index, item in enumerate(items):
            try:
                values = self._watch_item(item, index, request, partial=False)
            except ZohoError as exc:
                results.append(exc.body)
                continue
            channel_id = values["channel_id"]
            if not any(key[0] == channel_id for key in self.watches):
                results.append(self._not_subscribed(channel_id, index))
                continue
            for key in [k for k in self.watches if k[0] == channel_id]:
                del self.watches[key]
            events = []
            for module, ops in values["events"].items():
                watch = Watch(
                    channel_id=channel_id,
                    module=module,
                    events=set(ops),
                    notify_url=values["notify_url"],
                    token=values.get("token"),
                    expires_at=values["expires_at"],
                    return_affected_field_values=values.get("return_affected_field_values", False),
                    notify_on_related_action=values.get("notify_on_related_action", True),
                    api_domain=self.api_domain(request),
                )
                self.watches[(channel_id, module)] = watch
                events.append(self._watch_details(watch))
            results.append(
                {
                    "code": "SUCCESS",
                    "details": {"events": events},
                    "message": "Successfully updated the subscribe details",
                    "status": "success",
                }
            )
        return web.json_response({"watch": results}, status=self._multi_status(results, 200))

    @staticmethod
    def _not_subscribed(channel_id: str, index: int) -> Json:
        return ZohoError(
            "NOT_SUBSCRIBED",
            "not subscribed for actions-watch of the given channel",
            {
                "api_name": "channel_id",
                "json_path": f"$.watch[{index}].channel_id",
                "id": channel_id,
            },
        ).body

    async def watch_patch(self, request: web.Request) -> web.Response:
        items = await self._watch_body(request)
        results: list[Json] = []
        for index, item in enumerate(items):
            try:
                values = self._watch_item(item, index, request, partial=True)
            except ZohoError as exc:
                results.append(exc.body)
                continue
            channel_id = values["channel_id"]
            current = {k[1]: w for k, w in self.watches.items() if k[0] == channel_id}
            if not current:
                results.append(self._not_subscribed(channel_id, index))
                continue
            template = next(iter(current.values()))
            for module, ops in values.get("events", {}).items():
                watch = current.get(module)
                if values.get("_delete_events"):
                    if watch is not None:
                        watch.events -= ops
                        if not watch.events:
                            del self.watches[(channel_id, module)]
                            del current[module]
                    continue
                if watch is None:
                    watch = Watch(**{**template.__dict__, "module": module, "events": set()})
                    self.watches[(channel_id, module)] = watch
                    current[module] = watch
                watch.events |= ops
            for watch in current.values():
                if "notify_url" in values:
                    watch.notify_url = values["notify_url"]
                if "token" in values:
                    watch.token = values["token"]
                if "expires_at" in values:
                    watch.expires_at = values["expires_at"]
                for flag in ("return_affected_field_values", "notify_on_related_action"):
                    if flag in values:
                        setattr(watch, flag, values[flag])
            results.append(
                {
                    "code": "SUCCESS",
                    "details": {"events": [self._watch_details(w) for w in current.values()]},
                    "message": "Successfully updated the subscribe details",
                    "status": "success",
                }
            )
        return web.json_response({"watch": results}, status=self._multi_status(results, 200))

    async def watch_list(self, request: web.Request) -> web.Response:
        now = self.now()
        channel_id = request.query.get("channel_id")
        module = request.query.get("module")
        per_page = min(self._int_param(request, "per_page", MAX_PER_PAGE), MAX_PER_PAGE)
        page = self._int_param(request, "page", 1)
        rows = [
            w
            for w in self.watches.values()
            if w.expires_at > now
            and (channel_id is None or w.channel_id == channel_id)
            and (module is None or w.module == module)
        ]
        window = rows[(page - 1) * per_page : page * per_page]
        if not window:
            return web.Response(status=204)
        data = [
            {
                "notify_on_related_action": w.notify_on_related_action,
                "channel_expiry": self.fmt_time(w.expires_at),
                "return_affected_field_values": w.return_affected_field_values,
                "resource_uri": f"{w.api_domain}/crm/{API_VERSION}/{w.module}",
                "resource_id": self.modules[w.module].id,
                "notify_url": w.notify_url,
                "resource_name": w.module,
                "fields": None,
                "notification_condition": None,
                "channel_id": w.channel_id,
                "events": sorted(f"{w.module}.{op}" for op in w.events),
                "token": w.token,
            }
            for w in window
        ]
        return web.json_response(
            {
                "watch": data,
                "info": {
                    "per_page": per_page,
                    "count": len(data),
                    "page": page,
                    "more_records": page * per_page < len(rows),
                },
            }
        )

    async def watch_disable(self, request: web.Request) -> web.Response:
        raw = request.query.get("channel_ids", "")
        channel_ids = [c.strip() for c in raw.split(",") if c.strip()]
        if not channel_ids:
            raise RequestError(
                400,
                "REQUIRED_PARAM_MISSING",
                "required param is missing",
                {"param_name": "channel_ids"},
            )
        results: list[Json] = []
        for index, channel_id in enumerate(channel_ids):
            keys = [k for k in self.watches if k[0] == channel_id]
            if not keys:
                results.append(self._not_subscribed(channel_id, index))
                continue
            for key in keys:
                watch = self.watches.pop(key)
                results.append(
                    {
                        "code": "SUCCESS",
                        "details": {
                            "resource_uri": f"{watch.api_domain}/crm/{API_VERSION}/{watch.module}",
                            "resource_id": self.modules[watch.module].id,
                            "channel_id": channel_id,
                        },
                        "message": "Successfully un-subscribed from actions-watch",
                        "status": "success",
                    }
                )
        return web.json_response({"watch": results}, status=self._multi_status(results, 200))

    def _notify(self, changes: list[Change]) -> None:
        """POST one callback per channel, module and operation; fire and forget."""
        if not changes or not self.watches:
            return
        now = self.now()
        grouped: dict[tuple[str, str], list[Change]] = {}
        for change in changes:
            grouped.setdefault((change.module, change.operation), []).append(change)
        event_of = {"insert": "create", "update": "edit", "delete": "delete"}
        for (module, operation), items in grouped.items():
            for watch in list(self.watches.values()):
                if (
                    watch.module != module
                    or watch.expires_at <= now
                    or event_of[operation] not in watch.events
                ):
                    continue
                url = urlsplit(watch.notify_url)
                payload = {
                    "server_time": int(now * 1000),
                    "query_params": dict(parse_qsl(url.query)),
                    "module": module,
                    # Zoho's documented callbacks carry /crm/v2/ whatever the API version
                    "resource_uri": f"{watch.api_domain}/crm/v2/{module}",
                    "ids": [c.rid for c in items],
                    "affected_fields": (
                        [{c.rid: c.fields} for c in items if operation == "update"]
                        if watch.return_affected_field_values
                        else []
                    ),
                    "operation": operation,
                    "channel_id": watch.channel_id,
                    "token": watch.token,
                }
                entry: Json = {
                    "channel_id": watch.channel_id,
                    "notify_url": watch.notify_url,
                    "module": module,
                    "operation": operation,
                    "ids": payload["ids"],
                    "status": None,
                }
                self.notification_log.append(entry)
                if url.hostname not in LOCAL_HOSTS:
                    entry["status"] = "skipped: only local callback URLs are called"
                    self.counters["notifications_skipped"] += 1
                    continue
                task = asyncio.get_running_loop().create_task(
                    self._deliver(watch.notify_url, payload, entry)
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, payload: Json, entry: Json) -> None:
        try:
            if self._session is None or self._session.closed:
                self._session = aiohttp.ClientSession()
            timeout = aiohttp.ClientTimeout(total=self.opts.notify_timeout_s)
            async with self._session.post(url, json=payload, timeout=timeout) as response:
                await response.read()
                entry["status"] = response.status
            self.counters["notifications_sent"] += 1
        except Exception as exc:
            entry["status"] = f"error: {exc!r}"
            self.counters["notifications_failed"] += 1

    async def on_cleanup(self, _: web.Application) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- control API --------------------------------------------------------------------------

    def _control_store(self, module: Any) -> ModuleStore:
        store = self.stores.get(module) if isinstance(module, str) else None
        if store is None:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": f"unknown module {module!r}"}),
                content_type="application/json",
            )
        return store

    async def control_fields(self, request: web.Request) -> web.Response:
        body = await request.json()
        module = body.get("module")
        specs = body.get("fields") or []
        if module in self.subforms:
            defs = self.subforms[module]
            store = None
        else:
            store = self._control_store(module)
            defs = store.mdef.fields
        added = []
        for spec in specs:
            data_type = spec.get("data_type", "text")
            api_name = spec.get("api_name")
            if not isinstance(api_name, str) or data_type not in DATA_TYPES:
                raise web.HTTPBadRequest(text=f"bad field spec {spec!r}")
            lookup = spec.get("lookup") or spec.get("lookup_module")
            if data_type == "lookup" and lookup not in self.modules:
                raise web.HTTPBadRequest(text=f"lookup field needs a module: {spec!r}")
            previous = defs.get(api_name)
            fdef = FieldDef(
                api_name=api_name,
                data_type=data_type,
                label=spec.get("field_label") or api_name.replace("_", " "),
                length=spec.get("length", DEFAULT_LENGTHS.get(data_type)),
                system_mandatory=bool(spec.get("system_mandatory", False)),
                unique=bool(spec.get("unique", False)),
                external=bool(spec.get("external", False)),
                read_only=bool(spec.get("read_only", False)),
                lookup_module=lookup if data_type == "lookup" else None,
                pick_list_values=tuple(spec.get("pick_list_values") or ()),
                custom=previous.custom if previous else True,
                id=previous.id if previous else self.field_ids(),
            )
            defs[api_name] = fdef
            added.append(fdef.metadata(self.modules))
        if store is not None:
            store.mdef.refresh()
            store.rebuild_indexes()
            store.changed()
        return web.json_response({"module": module, "fields": added})

    def _generated_values(self, store: ModuleStore, n: int) -> Json:
        values: Json = {}
        mdef = store.mdef
        for fdef in mdef.fields.values():
            wanted = fdef.system_mandatory or fdef.tracked or fdef.api_name == mdef.dup_field
            if not wanted or fdef.read_only:
                continue
            if fdef.data_type in TEXT_TYPES:
                values[fdef.api_name] = (
                    f"SEED-{n:06d}" if fdef.tracked else f"Seed {mdef.singular} {n}"
                )
            elif fdef.data_type == "email":
                values[fdef.api_name] = f"seed{n}@example.com"
            elif fdef.data_type == "picklist" and fdef.pick_list_values:
                values[fdef.api_name] = fdef.pick_list_values[0]
            elif fdef.data_type == "date":
                values[fdef.api_name] = datetime.fromtimestamp(self.now(), UTC).date().isoformat()
            elif fdef.data_type in NUMBER_TYPES:
                values[fdef.api_name] = n
        return values

    async def control_seed(self, request: web.Request) -> web.Response:
        body = await request.json()
        store = self._control_store(body.get("module"))
        records = body.get("records")
        if records is None:
            count = int(body.get("count", 0))
            base = len(store.records)
            overrides = body.get("fields") or {}
            records = [
                {**self._generated_values(store, base + i + 1), **overrides} for i in range(count)
            ]
        external = self.parse_external_header(request, store.mdef.api_name)
        ids = []
        changes = []
        for index, item in enumerate(records):
            try:
                values = self.prepare(store, item, index, external, None, allow_read_only=True)
            except ZohoError as exc:
                return web.json_response({"error": exc.body, "index": index}, status=400)
            rid = str(item["id"]) if item.get("id") else None
            if rid is not None and rid in store.records:
                return web.json_response({"error": f"id {rid} exists", "index": index}, status=400)
            record = self.create_record(store, values, rid)
            ids.append(record["id"])
            changes.append(Change(store.mdef.api_name, "insert", record["id"], list(values)))
        if body.get("notify"):
            self._notify(changes)
        return web.json_response({"module": store.mdef.api_name, "ids": ids, "count": len(ids)})

    def _full(self, store: ModuleStore, record: Json) -> Json:
        return self.render(store, record, None, subforms=True)

    async def control_records(self, request: web.Request) -> web.Response:
        store = self._control_store(request.match_info["module"])
        offset = int(request.query.get("offset", 0))
        limit = request.query.get("limit")
        rows = list(store.records.values())
        rows = rows[offset : offset + int(limit)] if limit else rows[offset:]
        return web.json_response(
            {
                "module": store.mdef.api_name,
                "count": len(store.records),
                "data": [self._full(store, r) for r in rows],
            }
        )

    async def control_record(self, request: web.Request) -> web.Response:
        store = self._control_store(request.match_info["module"])
        rid = request.match_info["id"]
        record = store.records.get(rid)
        if record is None:
            raise web.HTTPNotFound(text=f"no {store.mdef.api_name} record {rid}")
        if request.method == "GET":
            return web.json_response(self._full(store, record))
        if request.method == "DELETE":
            self._delete(store, rid)
            self._notify([Change(store.mdef.api_name, "delete", rid, [])])
            return web.json_response({"deleted": rid})
        body = await request.json()
        external = self.parse_external_header(request, store.mdef.api_name)
        try:
            values = self.prepare(store, body, 0, external, record, allow_read_only=True)
            self._check_mandatory(store, values, 0, creating=False)
            self._check_unique(store, values, 0, rid)
        except ZohoError as exc:
            return web.json_response({"error": exc.body}, status=400)
        changed = self.update_record(store, record, values)
        self._notify([Change(store.mdef.api_name, "update", rid, changed)])
        return web.json_response(self._full(store, record))

    async def control_expire_tokens(self, request: web.Request) -> web.Response:
        body: Json = {}
        if request.can_read_body:
            with contextlib.suppress(ValueError):
                body = await request.json() or {}
        expired = 0
        for access in self.access_tokens.values():
            if body.get("access_token") and access.token != body["access_token"]:
                continue
            if body.get("refresh_token") and access.refresh_token != body["refresh_token"]:
                continue
            if access.expires_at > 0:
                access.expires_at = 0
                expired += 1
        return web.json_response({"expired": expired})

    async def control_refresh_tokens(self, request: web.Request) -> web.Response:
        body = await request.json()
        token = body.get("refresh_token") or f"1000.{secrets.token_hex(16)}.{secrets.token_hex(16)}"
        client_id = body.get("client_id") or next(iter(self.clients), DEFAULT_CLIENT_ID)
        if "client_secret" in body:
            self.clients[client_id] = body["client_secret"]
        self.refresh_tokens[token] = client_id
        return web.json_response({"refresh_token": token, "client_id": client_id})

    async def control_reject(self, request: web.Request) -> web.Response:
        if request.method == "DELETE":
            self.reject_rules.clear()
        elif request.method == "POST":
            body = await request.json()
            self._control_store(body.get("module"))
            self.reject_rules.append((body["module"], body["field"], str(body["value"])))
        return web.json_response(
            {"rules": [{"module": m, "field": f, "value": v} for m, f, v in self.reject_rules]}
        )

    async def control_config(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            body = await request.json()
            for name, value in body.items():
                if name not in RUNTIME_OPTIONS:
                    raise web.HTTPBadRequest(text=f"unknown or fixed option {name!r}")
                setattr(self.opts, name, value)
        return web.json_response(
            {name: getattr(self.opts, name) for name in sorted(RUNTIME_OPTIONS)}
        )

    async def control_advance(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._skew += float(body.get("seconds", 0))
        return web.json_response({"now": self.fmt_time(self.now()), "skew_s": self._skew})

    async def control_counts(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "records": {name: len(store.records) for name, store in self.stores.items()},
                "write_calls": self.counters["write_calls"],
            }
        )

    async def control_channels(self, request: web.Request) -> web.Response:
        now = self.now()
        return web.json_response(
            {
                "channels": [
                    {
                        "channel_id": w.channel_id,
                        "module": w.module,
                        "events": sorted(w.events),
                        "notify_url": w.notify_url,
                        "token": w.token,
                        "channel_expiry": self.fmt_time(w.expires_at),
                        "expired": w.expires_at <= now,
                    }
                    for w in self.watches.values()
                ]
            }
        )

    async def control_notifications(self, request: web.Request) -> web.Response:
        return web.json_response({"notifications": list(self.notification_log)})


EMULATOR_KEY = web.AppKey("zoho_crm", ZohoCrmEmulator)
"""``app[EMULATOR_KEY]`` is the emulator behind an app, for in-process tests."""


def create_app(**options: Any) -> web.Application:
    """The Zoho CRM emulator app; see :class:`ZohoOptions` for the options."""
    emulator = ZohoCrmEmulator(ZohoOptions(**options))
    app = web.Application(
        middlewares=[
            emulator.gate_middleware(),
            fault_middleware(
                emulator.faults,
                emulator.call_stats,
                emulator.fault_response,
                emulator.route_name,
            ),
            emulator.api_middleware(),
        ],
        client_max_size=32 * 1024 * 1024,
    )
    app[EMULATOR_KEY] = emulator
    app.router.add_post("/oauth/v2/token", emulator.oauth_token)
    app.router.add_post("/oauth/v2/token/revoke", emulator.oauth_revoke)
    app.router.add_route("*", "/crm/{version}/{tail:.*}", emulator.dispatch)
    add_common_control_routes(
        app, emulator.faults, emulator.call_stats, emulator.extra_stats, emulator.reset
    )
    control = CONTROL_PREFIX
    app.router.add_post(f"{control}/fields", emulator.control_fields)
    app.router.add_post(f"{control}/seed", emulator.control_seed)
    app.router.add_get(f"{control}/records/{{module}}", emulator.control_records)
    app.router.add_route("*", f"{control}/records/{{module}}/{{id}}", emulator.control_record)
    app.router.add_post(f"{control}/expire_tokens", emulator.control_expire_tokens)
    app.router.add_post(f"{control}/token_expire", emulator.control_expire_tokens)
    app.router.add_post(f"{control}/refresh_tokens", emulator.control_refresh_tokens)
    app.router.add_route("*", f"{control}/reject", emulator.control_reject)
    app.router.add_route("*", f"{control}/config", emulator.control_config)
    app.router.add_post(f"{control}/advance", emulator.control_advance)
    app.router.add_get(f"{control}/counts", emulator.control_counts)
    app.router.add_get(f"{control}/channels", emulator.control_channels)
    app.router.add_get(f"{control}/notifications", emulator.control_notifications)
    app.on_cleanup.append(emulator.on_cleanup)
    return app


def main() -> None:
    serve_main(create_app, 8102)


if __name__ == "__main__":
    main()
