"""Access tokens: refreshed before they expire, once for all concurrent callers, and shared by
every replica through the encrypted ``token_cache`` table (so that replicas never each refresh
and trip a vendor's token limit)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from shared import metrics
from shared.failures import AuthError
from shared.logs import register_token
from shared.vault import Vault, VaultError

log = logging.getLogger(__name__)


class TokenRefusedError(AuthError):
    """The token endpoint (or a logon) refused the connection's own credentials: asking again
    cannot help, so a call's retry does not refresh for it (it is still an auth failure)."""


@dataclass
class Token:
    value: str = field(repr=False)
    expires_at: float  # time.time() seconds
    context: dict[str, Any] = field(default_factory=dict)  # e.g. api_domain

    def fresh(self, margin_s: float) -> bool:
        return time.time() < self.expires_at - margin_s

    def __repr__(self) -> str:
        return f"Token(expires_at={self.expires_at}, context={self.context})"


class TokenCache:
    """The ``token_cache`` table: one encrypted token per connection, shared by replicas."""

    def __init__(self, pool: asyncpg.Pool, vault: Vault) -> None:
        self.pool = pool
        self.vault = vault

    async def with_lock(
        self, connection: str, work: Callable[[asyncpg.Connection], Awaitable[Token]]
    ) -> Token:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"token:{connection}")
            return await work(conn)

    async def load(self, conn: asyncpg.Connection, connection: str) -> Token | None:
        row = await conn.fetchrow(
            "SELECT token, expires_at FROM token_cache WHERE connection = $1", connection
        )
        if row is None:
            return None
        try:
            data = json.loads(self.vault.decrypt(row["token"], connection))
        except VaultError as exc:
            log.warning("cached token of %s unreadable (%s); refreshing", connection, exc)
            return None
        return Token(data["value"], row["expires_at"].timestamp(), data.get("context", {}))

    async def store(self, conn: asyncpg.Connection, connection: str, token: Token) -> None:
        blob = self.vault.encrypt(
            json.dumps({"value": token.value, "context": token.context}).encode(), connection
        )
        await conn.execute(
            """INSERT INTO token_cache (connection, token, key_id, expires_at, updated_at)
               VALUES ($1, $2, $3, $4, now())
               ON CONFLICT (connection) DO UPDATE
               SET token = $2, key_id = $3, expires_at = $4, updated_at = now()""",
            connection,
            blob,
            self.vault.current_key_id,
            datetime.fromtimestamp(token.expires_at, UTC),
        )


class TokenManager:
    """Hands out a valid token; ``fetch`` obtains a new one from the vendor.

    - proactive: a token within ``margin_s`` of expiry is replaced before use;
    - single flight: concurrent callers wait for one refresh;
    - ``invalidate(token)`` after a 401 forces a refresh, unless another caller already did;
    - with a ``cache``, replicas share one token under a Postgres advisory lock;
    - every token obtained is registered with ``shared.logs`` (masked in everything we write);
      a failed refresh counts in ``mlc_token_refresh_failures_total``;
    - ``fetch`` makes one attempt: it runs inside an API call's retries, never with its own.
    """

    def __init__(
        self,
        connection: str,
        fetch: Callable[[], Awaitable[Token]],
        *,
        cache: TokenCache | None = None,
        margin_s: float = 300.0,
    ) -> None:
        self.connection = connection
        self._fetch = fetch
        self._cache = cache
        self._margin_s = margin_s
        self._token: Token | None = None
        self._rejected: str | None = None
        self._lock = asyncio.Lock()
        self.refreshes = 0

    async def get(self) -> Token:
        token = self._token
        if token is not None and token.fresh(self._margin_s) and token.value != self._rejected:
            return token
        async with self._lock:
            token = self._token
            if token is not None and token.fresh(self._margin_s) and token.value != self._rejected:
                return token
            token = await self._obtain()
            register_token(self.connection, token.value)  # also one another replica obtained
            self._token = token
            return token

    def invalidate(self, token: Token | None) -> None:
        """The vendor rejected ``token``; the next ``get`` obtains another."""
        if token is not None:
            self._rejected = token.value

    async def _obtain(self) -> Token:
        if self._cache is None:
            return await self._refresh()

        async def under_lock(conn: asyncpg.Connection) -> Token:
            cached = await self._cache.load(conn, self.connection)  # type: ignore[union-attr]
            if (
                cached is not None
                and cached.fresh(self._margin_s)
                and cached.value != self._rejected
            ):
                return cached
            token = await self._refresh()
            await self._cache.store(conn, self.connection, token)  # type: ignore[union-attr]
            return token

        return await self._cache.with_lock(self.connection, under_lock)

    async def _refresh(self) -> Token:
        """One attempt at a new token (the API call that needs it owns the retries)."""
        try:
            token = await self._fetch()
        except Exception:
            metrics.TOKEN_REFRESH_FAILURES.labels(self.connection).inc()
            raise
        register_token(self.connection, token.value)
        self.refreshes += 1
        metrics.TOKEN_REFRESHES.labels(self.connection).inc()
        remaining = int(token.expires_at - time.time())
        log.info(
            "token refreshed", extra={"connection": self.connection, "expires_in_s": remaining}
        )
        return token


def expires_in(seconds: float) -> float:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).timestamp()
