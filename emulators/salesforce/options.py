"""Settings of the Salesforce emulator. Facts the reference marks UNVERIFIED are settings here."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from dataclasses import fields as dc_fields
from typing import Any

DEFAULT_CLIENT_ID = "3MVG9EMULATOR.connected.app.consumer.key.0000000000000000000000000000"
DEFAULT_CLIENT_SECRET = "EMULATOR0CONSUMER0SECRET0000000000000000000000000000000000000000"

DEFAULT_STAGES: tuple[dict[str, Any], ...] = (
    # Commonly cited out-of-the-box stages (reference §5: UNVERIFIED against an official list).
    {"value": "Prospecting", "probability": 10, "closed": False, "won": False},
    {"value": "Qualification", "probability": 10, "closed": False, "won": False},
    {"value": "Needs Analysis", "probability": 20, "closed": False, "won": False},
    {"value": "Value Proposition", "probability": 50, "closed": False, "won": False},
    {"value": "Id. Decision Makers", "probability": 60, "closed": False, "won": False},
    {"value": "Perception Analysis", "probability": 70, "closed": False, "won": False},
    {"value": "Proposal/Price Quote", "probability": 75, "closed": False, "won": False},
    {"value": "Negotiation/Review", "probability": 90, "closed": False, "won": False},
    {"value": "Closed Won", "probability": 100, "closed": True, "won": True},
    {"value": "Closed Lost", "probability": 0, "closed": True, "won": False},
)


@dataclass
class SalesforceOptions:
    """Everything :func:`emulators.salesforce.make_app` accepts."""

    clients: dict[str, str] = field(
        default_factory=lambda: {DEFAULT_CLIENT_ID: DEFAULT_CLIENT_SECRET}
    )
    """consumer key -> consumer secret of external client apps with client credentials on."""
    instance_url: str | None = None
    """The org's My Domain URL; None: the scheme://host the token request came in on."""
    org_id: str = "00D5e0000012EMU"
    """15-character org id (the 18-character form is derived)."""
    user_id: str = "0055e00000RunAs"
    """The Run As user of the client credentials flow (15 characters; 18 derived)."""
    user_name: str = "Integration User"
    scope: str = "api"

    session_timeout_s: float = 7200.0
    """Session timeout of the Run As user's sessions (reference §1: default 2 hours)."""
    session_sliding: bool = True
    """Sessions time out after this much inactivity (each call renews), as Salesforce's
    session timeout does; False: a fixed lifetime from the grant."""
    invalid_client_status: int = 400
    """UNVERIFIED: the token endpoint answers bad credentials with 400 (some clients see 401)."""
    generic_login_hosts: tuple[str, ...] = ("login.salesforce.com", "test.salesforce.com")
    """Hosts whose token endpoint refuses client credentials (reference §1)."""

    latest_version: str = "66.0"
    """Newest API version the org serves (Spring '26 = 66.0, Summer '26 = 67.0)."""
    oldest_version: str = "31.0"
    """Oldest version still served; 21.0-30.0 are retired (410), older ones too."""

    api_requests_max: int = 15_000
    """Daily API request allocation (Developer Edition 15,000; Enterprise 100,000 + 1,000 per
    licence)."""
    api_requests_overrun: int = 0
    """Calls a paid org may make beyond the allocation before the hard cap (0: none, as for
    developer, trial and sandbox orgs)."""
    api_window_s: float = 24 * 3600
    """The allocation is a rolling 24-hour window."""

    query_batch_size: int = 2000
    query_batch_min: int = 200
    query_batch_max: int = 2000
    max_offset: int = 2000
    max_open_cursors: int = 10
    """UNVERIFIED here (Developer Limits quick reference): 10 open query cursors per user; the
    oldest is dropped when another opens, and its nextRecordsUrl then fails."""
    cursor_ttl_s: float = 2 * 24 * 3600

    collection_max_records: int = 200
    stage_picklist_restricted: bool = True
    """UNVERIFIED: whether StageName rejects values outside the org's stages."""
    stages: list[dict[str, Any]] = field(default_factory=lambda: [dict(s) for s in DEFAULT_STAGES])
    external_id_case_sensitive: bool = False
    """External id and unique text fields match case-insensitively unless made case-sensitive."""
    upsert_body_external_id: str = "error"
    """Single-record upsert whose body repeats the URL's external id field: 'error' (the docs:
    "Do not specify Id or an external ID field in the request body or an error is generated")
    or 'allow_if_equal' (UNVERIFIED alternative)."""
    external_field_error_message: str = (
        "Provided external ID field does not exist or is not accessible: {field}"
    )
    """UNVERIFIED wording of the 404 NOT_FOUND for an upsert on a field that is not an external
    id (the docs only say NOT_FOUND)."""
    collection_limit_message: str = (
        "record limit reached. cannot submit more than {max} records into this call"
    )
    """UNVERIFIED wording of the 400 EXCEEDED_ID_LIMIT for a Collections call over the cap."""

    custom_object: bool = False
    """Also serve the custom object ERP_Invoice__c (key prefix a0E)."""
    duplicate_rules: list[dict[str, Any]] = field(default_factory=list)
    """Active duplicate rules: ``{"object", "fields": [...], "action": "block" | "alert",
    "name"}``; a write whose values match another record on all fields gets
    DUPLICATES_DETECTED (alert rules let it through with Sforce-Duplicate-Rule-Header
    allowSave=true). New orgs have alerting rules on Account; off here unless set."""
    fault_error_status: int = 500
    """Status of an injected error: 500 UNKNOWN_EXCEPTION or 503 SERVER_UNAVAILABLE."""
    service_time_ms: float = 0.0
    """Simulated server work per API call."""
    clock: Callable[[], float] = time.time


RUNTIME_OPTIONS = {
    f.name
    for f in dc_fields(SalesforceOptions)
    if f.name not in {"clock", "clients", "org_id", "user_id", "custom_object"}
}
