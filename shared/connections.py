"""Connections: a named, configured instance of an external system.

Non-secret settings are stored as JSON; secrets are sealed by the vault with the connection name
as associated data. Each system module declares its settings and secrets as pydantic models and
registers a ``ConnectorType`` (``shared.connectors.registry``, from entry points);
``build_connector`` builds a live connector from a stored row.

- Opening a connection registers every one of its secrets with ``shared.logs``, so that they
  are masked in every text we write, whatever a vendor echoes.
- Replacing a connection (``add(..., replace=True)``) clears its cached token in the same
  transaction: a token (and the API domain it came with) belongs to the settings and secrets
  it was obtained with.
- In production (``MLC_ENV=production``) a plain ``http://`` URL in a connection's settings is
  refused, where the connection is added and where it is opened, unless
  ``MLC_ALLOW_HTTP=true`` (credentials and tokens would cross the network in the clear).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
from pydantic import BaseModel, SecretStr, ValidationError

from shared.connectors import registry
from shared.connectors.base import Connector
from shared.connectors.registry import ConnectionConfigError, ConnectorType
from shared.logs import MIN_SECRET_LENGTH, register_secrets
from shared.tokens import TokenCache
from shared.vault import Vault

__all__ = [
    "ConnectionConfigError",
    "ConnectionStore",
    "ConnectorType",
    "StoredConnection",
    "UrlPolicy",
    "build_connector",
    "connector_type",
    "validation_message",
]

log = logging.getLogger(__name__)


def connector_type(system: str) -> ConnectorType:
    """The registered connector type of ``system`` (``shared.connectors.registry``)."""
    return registry.get(system)


@dataclass(frozen=True)
class UrlPolicy:
    """Whether plain ``http://`` connection URLs are allowed: always outside production; in
    production only with ``MLC_ALLOW_HTTP=true``."""

    production: bool = False
    allow_http: bool = False

    @classmethod
    def from_settings(cls, settings: Any = None) -> UrlPolicy:
        """From ``settings`` (a ``shared.settings.Settings``), or the process's settings."""
        if settings is None:
            from shared.settings import load_settings

            settings = load_settings()
        return cls(settings.env == "production", bool(getattr(settings, "allow_http", False)))

    def check(self, name: str, settings: BaseModel) -> None:
        """Refuse a plain ``http://`` URL among ``settings`` where the policy says so."""
        if not self.production or self.allow_http:
            return
        for field_name, value in _strings(settings.model_dump(mode="json")):
            if value.strip().lower().startswith("http://"):
                raise ConnectionConfigError(
                    f"connection {name!r}: {field_name} is a plain http:// URL, refused in"
                    " production (credentials and tokens would travel unencrypted); use"
                    " https://, or set MLC_ALLOW_HTTP=true to allow it"
                )


def _strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{path}[{index}]")


def validation_message(exc: ValidationError, what: str) -> str:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
    )
    return f"{what}: {problems}"


@dataclass
class StoredConnection:
    name: str
    system: str
    settings: dict[str, Any]
    secrets: dict[str, SecretStr]
    key_id: str | None

    def describe(self) -> dict[str, Any]:
        """What ``connections show`` prints: settings, and secret names only."""
        return {
            "name": self.name,
            "system": self.system,
            "settings": self.settings,
            "secrets": {name: "********" for name in sorted(self.secrets)},
            "key_id": self.key_id,
        }


class ConnectionStore:
    def __init__(
        self, pool: asyncpg.Pool, vault: Vault, *, url_policy: UrlPolicy | None = None
    ) -> None:
        self.pool = pool
        self.vault = vault
        self._url_policy = url_policy

    @property
    def url_policy(self) -> UrlPolicy:
        if self._url_policy is None:
            self._url_policy = UrlPolicy.from_settings()
        return self._url_policy

    async def add(
        self,
        name: str,
        system: str,
        settings: dict[str, Any],
        secrets: dict[str, str],
        *,
        replace: bool = False,
    ) -> StoredConnection:
        kind = connector_type(system)
        try:
            valid_settings = kind.settings_model.model_validate(settings)
            valid_secrets = kind.secrets_model.model_validate(secrets)
        except ValidationError as exc:
            raise ConnectionConfigError(validation_message(exc, f"connection {name!r}")) from None
        self.url_policy.check(name, valid_settings)
        secret_values = {
            k: v if isinstance(v, SecretStr) else SecretStr(str(v))
            for k, v in valid_secrets.model_dump().items()
            if v is not None
        }
        blob = self.vault.seal_secrets(secret_values, name)
        settings_json = valid_settings.model_dump(mode="json")
        conflict = (
            "ON CONFLICT (name) DO UPDATE SET system = $2, settings = $3, secrets = $4,"
            " key_id = $5, updated_at = now()"
            if replace
            else ""
        )
        for secret_name, value in sorted(secret_values.items()):
            if 0 < len(value.get_secret_value()) < MIN_SECRET_LENGTH:
                log.warning(
                    "connection %r: secret %r is shorter than %d characters, too short to be"
                    " masked where a vendor echoes it into logs and errors; use a longer one",
                    name,
                    secret_name,
                    MIN_SECRET_LENGTH,
                )
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO connections (name, system, settings, secrets, key_id)"
                    f" VALUES ($1, $2, $3, $4, $5) {conflict}",
                    name,
                    system,
                    settings_json,
                    blob,
                    self.vault.current_key_id,
                )
                # a cached token (and its api_domain) belongs to the settings it came with
                await conn.execute("DELETE FROM token_cache WHERE connection = $1", name)
        except asyncpg.UniqueViolationError:
            raise ConnectionConfigError(f"connection {name!r} exists already") from None
        return StoredConnection(
            name, system, settings_json, secret_values, self.vault.current_key_id
        )

    async def get(self, name: str) -> StoredConnection:
        row = await self.pool.fetchrow("SELECT * FROM connections WHERE name = $1", name)
        if row is None:
            raise ConnectionConfigError(f"no connection named {name!r}")
        secrets = self.vault.open_secrets(row["secrets"], name) if row["secrets"] else {}
        return StoredConnection(name, row["system"], row["settings"], secrets, row["key_id"])

    async def system_of(self, name: str) -> str:
        """The system a connection talks to, without opening its secrets."""
        system = await self.pool.fetchval("SELECT system FROM connections WHERE name = $1", name)
        if system is None:
            raise ConnectionConfigError(f"no connection named {name!r}")
        return str(system)

    async def list(self) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT name, system, settings, key_id, updated_at FROM connections ORDER BY name"
        )
        return [dict(row) for row in rows]

    async def remove(self, name: str) -> bool:
        result = await self.pool.execute("DELETE FROM connections WHERE name = $1", name)
        await self.pool.execute("DELETE FROM token_cache WHERE connection = $1", name)
        return result.endswith(" 1")

    async def open(self, name: str, **deps: Any) -> Connector:
        stored = await self.get(name)
        return build_connector(
            stored,
            url_policy=self.url_policy,
            token_cache=TokenCache(self.pool, self.vault),
            **deps,
        )


def build_connector(
    stored: StoredConnection, *, url_policy: UrlPolicy | None = None, **deps: Any
) -> Connector:
    """A live connector from a stored connection: settings checked (and its URLs against the
    ``url_policy``, by default the process's), every secret registered for masking."""
    kind = connector_type(stored.system)
    try:
        settings = kind.settings_model.model_validate(stored.settings)
        secrets = kind.secrets_model.model_validate(
            {k: v.get_secret_value() for k, v in stored.secrets.items()}
        )
    except ValidationError as exc:
        raise ConnectionConfigError(
            validation_message(exc, f"connection {stored.name!r}")
        ) from None
    (url_policy or UrlPolicy.from_settings()).check(stored.name, settings)
    register_secrets(secrets)
    return kind.factory(stored.name, settings, secrets, **deps)
