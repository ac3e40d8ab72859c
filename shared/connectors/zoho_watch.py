"""Zoho CRM's push side: notification channels (``/actions/watch``) and their callbacks.

Zoho echoes the channel's verification token in every callback (there is no signature), so a
callback is accepted only when its ``channel_id`` is a channel we registered for this
connection, its ``token`` equals the one stored (compared in constant time), and the channel has
not expired. Payloads carry ids only; the poller fetches the records.

Channels: ``POST`` enables (``channel_id`` a long, ``token`` at most 50 characters,
``channel_expiry`` at most a week, without fractional seconds), ``PATCH`` with a new
``channel_expiry`` renews, ``DELETE ?channel_ids=`` disables. Every call goes through the
connector's ``_call`` (token, retries, rate limit, error classes).
"""

from __future__ import annotations

import inspect
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

from shared.channels import (
    Channel,
    ChannelLookup,
    ChannelSpec,
    NotificationRefused,
    PushRequest,
    tokens_match,
)
from shared.failures import PermanentError
from shared.messages import ChangeNotice

WATCH = "/actions/watch"
MAX_TOKEN = 50


class ZohoCallback(BaseModel):
    model_config = ConfigDict(extra="allow")
    channel_id: str | int
    token: str = Field(max_length=256)
    module: str = Field(pattern=r"^[A-Za-z0-9_]+$", max_length=100)
    ids: list[str] = Field(min_length=1, max_length=1000)
    operation: str = "update"
    server_time: int | None = None


class _Any(RootModel[Any]):
    pass


def zoho_time(value: datetime) -> str:
    """ISO 8601 in UTC without fractional seconds (Zoho refuses them)."""
    return value.astimezone(UTC).replace(microsecond=0).isoformat()


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


class ZohoWatch:
    """The ``PushSource`` of a ``ZohoCrmConnector``."""

    def __init__(self, connector: Any) -> None:
        self.connector = connector
        self._takes_model = "model" in inspect.signature(connector._call).parameters

    # -- callbacks ------------------------------------------------------------------------------

    def events_for(self, entities: list[str]) -> tuple[str, ...]:
        return tuple(sorted(f"{module}.all" for module in set(entities)))

    async def verify(self, request: PushRequest, channels: ChannelLookup) -> list[ChangeNotice]:
        try:
            callback = ZohoCallback.model_validate(request.payload)
        except ValidationError as exc:
            raise NotificationRefused(
                400, f"invalid notification: {exc.errors()[0]['msg']}"
            ) from None
        stored = await channels.find(str(callback.channel_id), request.connection)
        if stored is None:
            raise NotificationRefused(401, "unknown channel")
        if not tokens_match(stored.token, callback.token):
            raise NotificationRefused(401, "token mismatch")
        if not stored.live:
            raise NotificationRefused(410, "channel expired")
        return [
            ChangeNotice(
                connection=request.connection,
                system=request.system,
                entity=callback.module,
                ids=callback.ids,
                operation=callback.operation,
            )
        ]

    # -- channels -------------------------------------------------------------------------------

    async def _watch(
        self, method: str, *, operation: str, json: Any = None, params: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        if self._takes_model:
            status, answer = await self.connector._call(
                method, WATCH, _Any, params=params, json=json, operation=operation
            )
        else:
            status, answer = await self.connector._call(
                method, WATCH, params=params, json=json, operation=operation
            )
        if isinstance(answer, RootModel):
            answer = answer.root
        elif isinstance(answer, BaseModel):
            answer = answer.model_dump()
        return status, answer

    @staticmethod
    def _result(answer: Any, what: str) -> dict[str, Any]:
        """The one ``watch`` item of an answer, which must say SUCCESS."""
        items = answer.get("watch") if isinstance(answer, dict) else None
        item = items[0] if isinstance(items, list) and items else None
        if not isinstance(item, dict):
            raise PermanentError(f"Zoho CRM {what}: the answer has no watch result")
        if item.get("code") != "SUCCESS":
            code = str(item.get("code") or "") or None
            raise PermanentError(f"Zoho CRM {what}: {item.get('message') or 'refused'}", code=code)
        return item

    @staticmethod
    def _expiry(item: dict[str, Any], fallback: datetime) -> datetime:
        """The expiry Zoho confirmed (it may shorten what was asked), else what was asked."""
        events = (item.get("details") or {}).get("events") or []
        times = [_parse_time(e.get("channel_expiry")) for e in events if isinstance(e, dict)]
        known = [t for t in times if t is not None]
        return min(known) if known else fallback

    async def subscribe(self, spec: ChannelSpec) -> Channel:
        if len(spec.token) > MAX_TOKEN:
            raise PermanentError(f"a Zoho channel token is at most {MAX_TOKEN} characters")
        body = {
            "watch": [
                {
                    "channel_id": spec.channel_id,
                    "events": list(spec.events),
                    "channel_expiry": zoho_time(spec.expires_at),
                    "token": spec.token,
                    "notify_url": spec.notify_url,
                    "notify_on_related_action": False,
                }
            ]
        }
        _, answer = await self._watch("POST", json=body, operation="watch_enable")
        item = self._result(answer, "enable notifications")
        return Channel(
            channel_id=spec.channel_id,
            connection=spec.connection,
            events=spec.events,
            notify_url=spec.notify_url,
            expires_at=self._expiry(item, spec.expires_at),
        )

    async def renew(self, channel: Channel, expires_at: datetime) -> Channel:
        body = {
            "watch": [
                {
                    "channel_id": channel.channel_id,
                    "events": list(channel.events),
                    "channel_expiry": zoho_time(expires_at),
                }
            ]
        }
        _, answer = await self._watch("PATCH", json=body, operation="watch_renew")
        item = self._result(answer, "renew notifications")
        return Channel(
            channel_id=channel.channel_id,
            connection=channel.connection,
            events=channel.events,
            notify_url=channel.notify_url,
            expires_at=self._expiry(item, expires_at),
            created_at=channel.created_at,
        )

    async def unsubscribe(self, channel: Channel) -> None:
        try:
            _, answer = await self._watch(
                "DELETE", params={"channel_ids": channel.channel_id}, operation="watch_disable"
            )
        except PermanentError:
            if await self._known(channel.channel_id):
                raise
            return  # Zoho no longer has it (NOT_SUBSCRIBED): nothing to disable
        self._result(answer, "disable notifications")

    async def _known(self, channel_id: str) -> bool:
        status, answer = await self._watch(
            "GET", params={"channel_id": channel_id}, operation="watch_list"
        )
        if status == 204 or not isinstance(answer, dict):
            return False
        return any(
            isinstance(item, dict) and str(item.get("channel_id")) == channel_id
            for item in answer.get("watch") or []
        )
