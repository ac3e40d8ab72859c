"""Prometheus metrics, one registry per process, served on /metrics by every service."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECORDS = Counter(
    "mlc_records_total",
    "Records by flow, stage (polled, mapped, written, skipped, failed) and outcome",
    ["flow", "stage"],
)
API_CALLS = Counter(
    "mlc_api_calls_total", "External API calls", ["connection", "operation", "status"]
)
API_LATENCY = Histogram(
    "mlc_api_call_seconds",
    "External API call latency",
    ["connection", "operation"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TOKEN_REFRESHES = Counter("mlc_token_refreshes_total", "Token refreshes", ["connection"])
TOKEN_REFRESH_FAILURES = Counter(
    "mlc_token_refresh_failures_total",
    "Token refreshes (or logons) that failed, including a token endpoint's error with HTTP 200",
    ["connection"],
)
THROTTLE_WAITS = Counter(
    "mlc_throttle_wait_seconds_total", "Seconds spent waiting after throttling", ["connection"]
)
QUEUE_READY = Gauge("mlc_queue_ready", "Messages ready in a queue", ["queue"])
QUEUE_UNACKED = Gauge("mlc_queue_unacked", "Messages delivered and not yet acked", ["queue"])
MESSAGES = Counter("mlc_messages_total", "Bus messages handled by outcome", ["queue", "outcome"])
AUDIT_ROWS_DROPPED = Counter(
    "mlc_audit_rows_dropped_total",
    "Audit rows PostgreSQL refused even alone (each logged, then dropped)",
)
FUTURE_CHANGES = Counter(
    "mlc_future_change_values_total",
    "Records published whose change field lay past the time of the read (the cursor stops there)",
    ["flow", "entity"],
)
SOURCE_VALUES_CLEANED = Counter(
    "mlc_source_values_cleaned_total",
    "Source records whose values held NUL characters or invalid Unicode, cleaned before publishing",
    ["flow", "entity"],
)
CHANNEL_RENEWALS = Counter(
    "mlc_channel_renewals_total",
    "Notification channel operations by connection and outcome"
    " (subscribed, renewed, removed, failed)",
    ["connection", "outcome"],
)
CHANNEL_EXPIRY = Gauge(
    "mlc_channel_expiry_seconds",
    "When each registered notification channel expires (Unix time)",
    ["connection", "channel"],
)


def forget_channel(connection: str, channel: str) -> None:
    """Drop a removed channel's expiry gauge (it never existed: nothing to drop)."""
    try:
        CHANNEL_EXPIRY.remove(connection, channel)
    except KeyError:
        pass
