"""Options of the Zoho CRM emulator, and the vendor limits it enforces.

Facts marked UNVERIFIED in ``reference/zoho_crm.md`` are options of
:func:`emulators.zoho_crm.create_app` (fields of :class:`ZohoOptions`); tests and the demo may
change most of them at run time through ``POST /_control/config``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from dataclasses import fields as dc_fields

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
MAX_WATCH_ITEMS = 50
MAX_WATCH_EVENTS = 50
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


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
    search_equals: str = "word_prefix"
    """How search ``equals`` matches text fields. Zoho's search is an index search: 'word_prefix'
    (default) matches records whose value holds the criteria value's words, the last one as a
    prefix (``P100`` matches ``P100``, ``P100-7`` and ``Acme P1000``), case-insensitively;
    'contains' is a plain substring match; 'exact' a whole-value match (not Zoho)."""
    search_order: str = "modified_desc"
    """UNVERIFIED: the order of search results. 'modified_desc' (default: the most recently
    modified first, so an exact match created before its look-alikes sits on a later page),
    'created_desc', or 'created_asc' (insertion order)."""
    search_max_results: int = 2000
    coql_max_limit: int = 2000
    """UNVERIFIED: 2,000 (v7 limitations page) vs 200 (older COQL page)."""
    coql_max_in_values: int = 100
    """``in`` / ``not in`` take at most 100 values (v7 COQL limitations; 50 before v7)."""
    coql_max_criteria: int = 25
    """At most 25 criteria in a WHERE clause (COQL limitations)."""
    coql_case_insensitive: bool = True
    """UNVERIFIED: COQL ``=``, ``in`` and ``like`` compare text case-insensitively."""
    reject_fractional_channel_expiry: bool = True
    expired_channels_renewable: bool = False
    """UNVERIFIED: whether PUT/PATCH/DELETE still find a channel past its expiry. Default: an
    expired channel is gone (NOT_SUBSCRIBED); enable it again with POST."""
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
