"""Notification channels: what a push source offers, where channels are kept, and the loop that
keeps them registered.

A connector whose API can push change notifications offers a :class:`PushSource`: it verifies a
callback and turns it into ``ChangeNotice``s, and it subscribes, renews and unsubscribes a
channel. Channels live in ``webhook_channels`` (the verification token encrypted by the vault,
bound to the connection's name). The :class:`SubscriptionLoop` runs in the webhooks service: it
registers a channel for every connection that is the source of an enabled flow, renews each at
2/3 of its life, and removes the channels no enabled flow needs. Polling stays on as the safety
net, so a channel that lapses loses nothing, it only delays changes to the next poll.

Several replicas may run the loop: each connection is handled under a PostgreSQL advisory lock,
so only one replica registers or renews its channels at a time (the others skip it that round).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, runtime_checkable

import asyncpg

from shared.audit import AuditEvent, AuditWriter
from shared.failures import FailureClass, PermanentError, describe
from shared.logs import register_secret
from shared.messages import ChangeNotice
from shared.metrics import CHANNEL_EXPIRY, CHANNEL_RENEWALS, forget_channel
from shared.vault import Vault, VaultError

log = logging.getLogger(__name__)

TOKEN_BYTES = 30  # 40 characters of URL-safe base64: within Zoho's 50
RENEW_AT = 2 / 3  # of a channel's life
LOCK_NAMESPACE = "mlc-channels:"


class NotificationRefused(PermanentError):
    """A callback that is not ours or not valid; ``status`` is the HTTP answer (400, 401, 410,
    500), the message is one line for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, status=status)


@dataclass(frozen=True)
class ChannelSpec:
    """A channel to register: what to watch, where to call, how long, with which token."""

    connection: str
    events: tuple[str, ...]
    notify_url: str
    token: str
    expires_at: datetime
    channel_id: str


@dataclass(frozen=True)
class Channel:
    """A registered channel, as the source confirmed it (it may shorten the expiry)."""

    channel_id: str
    connection: str
    events: tuple[str, ...]
    notify_url: str
    expires_at: datetime
    renewed_at: datetime | None = None
    created_at: datetime | None = None

    def renew_due(self, now: datetime) -> bool:
        """At 2/3 of the time between the last registration or renewal and the expiry."""
        start = self.renewed_at or self.created_at or now
        return now >= start + (self.expires_at - start) * RENEW_AT


@dataclass(frozen=True)
class StoredChannel:
    channel: Channel
    token: str
    live: bool


@dataclass(frozen=True)
class PushRequest:
    """One callback as the webhook receiver read it (body already size- and depth-checked)."""

    connection: str
    system: str
    headers: Mapping[str, str]
    payload: Any


class ChannelLookup(Protocol):
    async def find(self, channel_id: str, connection: str) -> StoredChannel | None: ...


@runtime_checkable
class PushSource(Protocol):
    """What a connector that takes webhook notifications offers."""

    def events_for(self, entities: list[str]) -> tuple[str, ...]:
        """The source's event names that cover changes to these entities."""
        ...

    async def verify(self, request: PushRequest, channels: ChannelLookup) -> list[ChangeNotice]:
        """The notices a callback carries; NotificationRefused when it is not valid or ours."""
        ...

    async def subscribe(self, spec: ChannelSpec) -> Channel: ...

    async def renew(self, channel: Channel, expires_at: datetime) -> Channel: ...

    async def unsubscribe(self, channel: Channel) -> None: ...


# system -> how to make its push source from an open connector (a connector may also offer a
# ``push`` attribute itself, which wins).
PUSH_FACTORIES: dict[str, Callable[[Any], PushSource]] = {}


def _zoho(connector: Any) -> PushSource:
    from shared.connectors.zoho_watch import ZohoWatch

    return ZohoWatch(connector)


PUSH_FACTORIES["zoho_crm"] = _zoho


def push_source(system: str, connector: Any) -> PushSource | None:
    """The connector's push side, or None when the system cannot push."""
    offered = getattr(connector, "push", None)
    if isinstance(offered, PushSource):
        return offered
    factory = PUSH_FACTORIES.get(system)
    return factory(connector) if factory is not None else None


def can_push(system: str) -> bool:
    return system in PUSH_FACTORIES


def new_token() -> str:
    """A fresh verification token, registered so that no log line ever shows it."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    register_secret(token)
    return token


def new_channel_id() -> str:
    """A random positive 63-bit number (Zoho wants a long), never starting with 0."""
    return str(secrets.randbelow(9 * 10**17) + 10**17)


def tokens_match(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.encode())


class ChannelStore:
    """``webhook_channels``: one row a channel, the token encrypted for its connection."""

    def __init__(self, pool: asyncpg.Pool, vault: Vault) -> None:
        self.pool = pool
        self.vault = vault

    async def add(self, channel: Channel, token: str) -> None:
        await self.pool.execute(
            """INSERT INTO webhook_channels (channel_id, connection, events, token, key_id,
                   notify_url, expires_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7)""",
            channel.channel_id,
            channel.connection,
            list(channel.events),
            self.vault.encrypt(token.encode(), channel.connection),
            self.vault.current_key_id,
            channel.notify_url,
            channel.expires_at,
        )

    async def renewed(self, channel: Channel) -> None:
        await self.pool.execute(
            "UPDATE webhook_channels SET expires_at = $2, renewed_at = now() WHERE channel_id = $1",
            channel.channel_id,
            channel.expires_at,
        )

    async def remove(self, channel_id: str) -> None:
        await self.pool.execute("DELETE FROM webhook_channels WHERE channel_id = $1", channel_id)

    async def of_connection(self, connection: str) -> list[Channel]:
        rows = await self.pool.fetch(
            "SELECT * FROM webhook_channels WHERE connection = $1 ORDER BY created_at", connection
        )
        return [_channel(row) for row in rows]

    async def connections(self) -> list[str]:
        rows = await self.pool.fetch("SELECT DISTINCT connection FROM webhook_channels")
        return [row["connection"] for row in rows]

    async def find(self, channel_id: str, connection: str) -> StoredChannel | None:
        """The channel and its token, when it belongs to ``connection``; NotificationRefused
        (500) when its token cannot be decrypted."""
        row = await self.pool.fetchrow(
            "SELECT *, expires_at > now() AS live FROM webhook_channels WHERE channel_id = $1",
            channel_id,
        )
        if row is None or row["connection"] != connection:
            return None
        try:
            token = self.vault.decrypt(row["token"], connection).decode()
        except VaultError:
            log.error("stored token of channel %s cannot be decrypted", channel_id)
            raise NotificationRefused(500, "channel token unreadable") from None
        register_secret(token)
        return StoredChannel(_channel(row), token, bool(row["live"]))


def _channel(row: asyncpg.Record) -> Channel:
    return Channel(
        channel_id=row["channel_id"],
        connection=row["connection"],
        events=tuple(row["events"]),
        notify_url=row["notify_url"],
        expires_at=row["expires_at"],
        renewed_at=row["renewed_at"],
        created_at=row["created_at"],
    )


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


PushOpener = Callable[[str], Awaitable[PushSource | None]]


class SubscriptionLoop:
    """Keeps each push connection's channel in step with the enabled flows that read from it."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        store: ChannelStore,
        audit: AuditWriter,
        opener: PushOpener,
        *,
        public_url: str,
        lifetime_s: float,
        check_s: float,
        actor: str,
    ) -> None:
        self.pool = pool
        self.store = store
        self.audit = audit
        self.opener = opener
        self.public_url = public_url.rstrip("/")
        self.lifetime = timedelta(seconds=lifetime_s)
        self.check_s = check_s
        self.actor = actor

    def notify_url(self, connection: str) -> str:
        return f"{self.public_url}/hooks/{connection}"

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.reconcile()
            except Exception as exc:  # the loop outlives a database or broker hiccup
                log.warning("channel loop: %s", describe(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.check_s)

    async def wanted(self) -> dict[str, list[str]]:
        """Source connection -> the entities its enabled flows read."""
        rows = await self.pool.fetch(
            "SELECT source_connection, definition FROM flows WHERE enabled ORDER BY name"
        )
        out: dict[str, list[str]] = {}
        for row in rows:
            definition = row["definition"]
            if isinstance(definition, str):
                import json

                definition = json.loads(definition)
            entities = out.setdefault(row["source_connection"], [])
            for entity in definition.get("entities", []):
                name = (entity.get("source") or {}).get("entity")
                if name and name not in entities:
                    entities.append(name)
        return out

    async def reconcile(self) -> None:
        """One round over every connection that has or needs a channel."""
        wanted = await self.wanted()
        for connection in sorted(set(wanted) | set(await self.store.connections())):
            try:
                await self._locked(connection, wanted.get(connection, []))
            except Exception as exc:
                log.warning("channels of %s: %s", connection, describe(exc))

    async def _locked(self, connection: str, entities: list[str]) -> None:
        async with self.pool.acquire() as conn:
            key = LOCK_NAMESPACE + connection
            if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", key):
                return  # another replica is at it
            try:
                await self._reconcile(connection, entities)
            finally:
                await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", key)

    async def _reconcile(self, connection: str, entities: list[str]) -> None:
        channels = await self.store.of_connection(connection)
        source = await self.opener(connection)
        if source is None:
            for channel in channels:  # the connection was replaced by one that cannot push
                await self.store.remove(channel.channel_id)
                forget_channel(connection, channel.channel_id)
            return
        events = source.events_for(entities) if entities else ()
        keep: Channel | None = None
        for channel in channels:
            if keep is None and events and sorted(channel.events) == sorted(events):
                keep = channel
            else:
                await self._unsubscribe(source, channel)
        if not events:
            return
        now = utcnow()
        if keep is None:
            await self._subscribe(source, connection, events, now)
        elif keep.renew_due(now) or keep.expires_at <= now:
            await self._renew(source, keep, now)
        else:
            CHANNEL_EXPIRY.labels(connection, keep.channel_id).set(keep.expires_at.timestamp())

    async def _subscribe(
        self, source: PushSource, connection: str, events: tuple[str, ...], now: datetime
    ) -> None:
        token = new_token()
        spec = ChannelSpec(
            connection=connection,
            events=events,
            notify_url=self.notify_url(connection),
            token=token,
            expires_at=now + self.lifetime,
            channel_id=new_channel_id(),
        )
        try:
            channel = await source.subscribe(spec)
        except Exception as exc:
            await self._failed(connection, spec.channel_id, "subscribe", exc)
            return
        await self.store.add(channel, token)
        await self._done(channel, "subscribed")

    async def _renew(self, source: PushSource, channel: Channel, now: datetime) -> None:
        try:
            renewed = await source.renew(channel, now + self.lifetime)
        except Exception as exc:
            await self._failed(channel.connection, channel.channel_id, "renew", exc)
            refused = getattr(exc, "failure_class", None) == FailureClass.PERMANENT
            if refused or channel.expires_at <= now:
                # refused (the source no longer knows it) or lapsed: register afresh next round
                with contextlib.suppress(Exception):
                    await source.unsubscribe(channel)
                await self.store.remove(channel.channel_id)
                forget_channel(channel.connection, channel.channel_id)
            return
        await self.store.renewed(renewed)
        await self._done(renewed, "renewed")

    async def _unsubscribe(self, source: PushSource, channel: Channel) -> None:
        try:
            await source.unsubscribe(channel)
        except Exception as exc:
            await self._failed(channel.connection, channel.channel_id, "unsubscribe", exc)
            if channel.expires_at > utcnow():
                return  # try again next round; once it has lapsed, forget it anyway
        await self.store.remove(channel.channel_id)
        forget_channel(channel.connection, channel.channel_id)
        await self._done(replace(channel), "removed", gauge=False)

    async def _done(self, channel: Channel, outcome: str, *, gauge: bool = True) -> None:
        CHANNEL_RENEWALS.labels(channel.connection, outcome).inc()
        if gauge:
            CHANNEL_EXPIRY.labels(channel.connection, channel.channel_id).set(
                channel.expires_at.timestamp()
            )
        log.info("channel %s of %s %s", channel.channel_id, channel.connection, outcome)
        await self.audit.write(
            [
                AuditEvent(
                    stage="channel",
                    status=outcome,
                    actor=self.actor,
                    source_ref=f"{channel.connection}:{channel.channel_id}",
                    details={
                        "events": list(channel.events),
                        "expires_at": channel.expires_at.isoformat(),
                    },
                )
            ]
        )

    async def _failed(self, connection: str, channel_id: str, what: str, exc: Exception) -> None:
        CHANNEL_RENEWALS.labels(connection, "failed").inc()
        error = describe(exc)
        log.warning("channel %s of %s: %s failed: %s", channel_id, connection, what, error)
        failure = getattr(exc, "failure_class", None)
        await self.audit.write(
            [
                AuditEvent(
                    stage="channel",
                    status="failed",
                    actor=self.actor,
                    source_ref=f"{connection}:{channel_id}",
                    error_class=str(failure) if failure is not None else None,
                    error=f"{what}: {error}",
                )
            ]
        )
