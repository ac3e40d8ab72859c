"""Zoho's push side without the network: a callback is verified against the stored channel
(token compared in constant time, expiry checked), and channel calls say what Zoho wants."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from shared.channels import (
    Channel,
    ChannelSpec,
    NotificationRefused,
    PushRequest,
    PushSource,
    StoredChannel,
    new_channel_id,
    new_token,
    push_source,
)
from shared.connectors.zoho_watch import ZohoWatch, zoho_time
from shared.logs import redact

EXPIRES = datetime(2026, 12, 5, 10, 30, 0, 123456, tzinfo=UTC)


class FakeConnector:
    def __init__(self, answers: list[tuple[int, Any]]) -> None:
        self.answers = answers
        self.calls: list[dict[str, Any]] = []

    async def _call(
        self,
        method: str,
        path: str,
        model: Any,
        *,
        params: Any = None,
        json: Any = None,
        headers: Any = None,
        operation: str,
    ) -> tuple[int, Any]:
        self.calls.append({"method": method, "path": path, "params": params, "json": json})
        status, body = self.answers.pop(0)
        return status, model.model_validate(body)


class Lookup:
    def __init__(self, stored: StoredChannel | None) -> None:
        self.stored = stored

    async def find(self, channel_id: str, connection: str) -> StoredChannel | None:
        if self.stored is None or self.stored.channel.channel_id != channel_id:
            return None
        return self.stored


def _stored(live: bool = True) -> StoredChannel:
    channel = Channel("1000000068001", "zoho", ("Accounts.all",), "http://x/hooks/zoho", EXPIRES)
    return StoredChannel(channel, "the-right-token-0123456789", live)


def _request(**changes: Any) -> PushRequest:
    payload = {
        "module": "Accounts",
        "ids": ["5725767000003000064"],
        "operation": "update",
        "channel_id": "1000000068001",
        "token": "the-right-token-0123456789",
        **changes,
    }
    return PushRequest("zoho", "zoho_crm", {}, payload)


async def test_a_callback_with_the_right_token_names_the_records() -> None:
    watch = ZohoWatch(FakeConnector([]))
    (notice,) = await watch.verify(_request(), Lookup(_stored()))
    assert (notice.connection, notice.system, notice.entity) == ("zoho", "zoho_crm", "Accounts")
    assert notice.ids == ["5725767000003000064"] and notice.operation == "update"


@pytest.mark.parametrize(
    ("changes", "live", "status", "error"),
    [
        ({"token": "the-wrong-token-0123456789"}, True, 401, "token mismatch"),
        ({"channel_id": "999"}, True, 401, "unknown channel"),
        ({}, False, 410, "channel expired"),
        ({"ids": []}, True, 400, "invalid notification"),
        ({"module": "Acc'; drop"}, True, 400, "invalid notification"),
    ],
)
async def test_a_callback_that_is_not_ours_is_refused(
    changes: dict[str, Any], live: bool, status: int, error: str
) -> None:
    watch = ZohoWatch(FakeConnector([]))
    with pytest.raises(NotificationRefused) as refused:
        await watch.verify(_request(**changes), Lookup(_stored(live)))
    assert refused.value.status == status and refused.value.message.startswith(error)


async def test_subscribe_sends_what_zoho_wants_and_keeps_the_expiry_it_confirms() -> None:
    confirmed = "2026-12-05T09:00:00+00:00"  # Zoho shortened it
    connector = FakeConnector(
        [
            (
                201,
                {
                    "watch": [
                        {
                            "code": "SUCCESS",
                            "status": "success",
                            "details": {"events": [{"channel_expiry": confirmed}]},
                        }
                    ]
                },
            )
        ]
    )
    token = new_token()
    spec = ChannelSpec("zoho", ("Accounts.all",), "http://x/hooks/zoho", token, EXPIRES, "123")
    channel = await ZohoWatch(connector).subscribe(spec)
    (call,) = connector.calls
    (item,) = call["json"]["watch"]
    assert (call["method"], call["path"]) == ("POST", "/actions/watch")
    assert item["channel_expiry"] == "2026-12-05T10:30:00+00:00"  # no fractional seconds
    assert item["token"] == token and len(token) <= 50
    assert channel.expires_at == datetime.fromisoformat(confirmed)


async def test_a_refused_subscription_is_an_error() -> None:
    connector = FakeConnector([(207, {"watch": [{"code": "INVALID_DATA", "message": "bad"}]})])
    spec = ChannelSpec("zoho", ("Accounts.all",), "http://x", "t" * 40, EXPIRES, "123")
    with pytest.raises(Exception, match="bad"):
        await ZohoWatch(connector).subscribe(spec)


def test_tokens_and_channel_ids_are_fresh_and_tokens_are_masked() -> None:
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50 and all(32 <= len(t) <= 50 for t in tokens)
    token = tokens.pop()
    assert token not in redact(f"callback with token {token}")
    ids = {new_channel_id() for _ in range(50)}
    assert len(ids) == 50 and all(i.isdigit() and 18 <= len(i) <= 19 for i in ids)
    assert zoho_time(EXPIRES) == "2026-12-05T10:30:00+00:00"


def test_zoho_connectors_are_push_sources_and_others_are_not() -> None:
    source = push_source("zoho_crm", FakeConnector([]))
    assert isinstance(source, PushSource) and isinstance(source, ZohoWatch)
    assert push_source("syspro", object()) is None
