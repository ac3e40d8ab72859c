"""Process settings, read once from the environment (``MLC_*``).

Defaults work on a developer machine with RabbitMQ and PostgreSQL running locally. A missing or
malformed value stops the program with one line naming the variable (see ``load_settings``).
"""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import Annotated

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.vault import KEY_ID, VaultError, parse_key, parse_old_keys

# A fixed development key: fine for the demo and tests, refused when MLC_ENV=production.
DEV_MASTER_KEY = "ZGV2LW9ubHktbWFzdGVyLWtleS1ub3QtZm9yLXByb2Q="


def _registry_writer_targets() -> tuple[str, ...]:
    from shared.connectors.registry import writer_targets

    return writer_targets()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MLC_", extra="ignore")

    env: str = Field("development", description="development | production")
    allow_http: bool = Field(False, description="allow plain http:// connection URLs in production")
    amqp_url: SecretStr = Field(SecretStr("amqp://guest:guest@127.0.0.1:5672/"))
    database_url: SecretStr = Field(SecretStr("postgresql://postgres@127.0.0.1:5432/mlc"))
    bus_prefix: str = Field("mlc", description="prefix of every exchange and queue name")
    rabbitmq_api_url: str = Field(
        "http://127.0.0.1:15672", description="management API, for unacked counts; '' for none"
    )
    writer_targets: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(_registry_writer_targets()),
        description="systems whose writer queues exist; default: every writable system",
    )
    master_key: SecretStr = Field(SecretStr(DEV_MASTER_KEY), description="base64 32-byte key")
    master_key_id: str = Field(
        "k1", pattern=KEY_ID.pattern, description="id stored beside every ciphertext"
    )
    old_master_keys: SecretStr = Field(
        SecretStr(""), description="'id:base64key,...' keys still accepted for decryption"
    )
    prefetch: int = Field(200, ge=1, le=2000)
    writer_concurrency: int = Field(4, ge=1, le=64, description="target calls in flight per writer")
    writer_max_wait_s: float = Field(0.2, ge=0, le=60, description="wait to fill a batch")
    retry_delays_s: Annotated[list[int], NoDecode] = Field([5, 30, 120, 600, 1800])
    log_level: str = "INFO"
    http_timeout_s: float = Field(60.0, gt=0)
    http_connect_timeout_s: float = Field(10.0, gt=0)
    health_port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    webhook_port: int = Field(8300, ge=0, le=65535)
    webhook_bind: str = Field("127.0.0.1", description="address the webhook server listens on")
    webhook_public_url: str = "http://127.0.0.1:8300"
    webhook_read_timeout_s: float = Field(
        10.0, gt=0, le=300, description="a request's headers and body must arrive within this"
    )
    webhook_max_requests: int = Field(
        100, ge=1, le=10_000, description="webhook requests served at once; more get 503"
    )
    channel_lifetime_s: float = Field(
        86400.0, ge=2, le=7 * 86400, description="life asked for each notification channel"
    )
    channel_check_s: float = Field(
        60.0, gt=0, le=3600, description="how often the webhooks service checks its channels"
    )
    replica: str = Field("", description="name of this replica in the audit trail")

    @field_validator("retry_delays_s", "writer_targets", mode="before")
    @classmethod
    def _split_delays(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("env")
    @classmethod
    def _known_env(cls, value: str) -> str:
        if value not in {"development", "production"}:
            raise ValueError("must be development or production")
        return value

    @field_validator("master_key")
    @classmethod
    def _usable_key(cls, value: SecretStr) -> SecretStr:
        """Checked here, so that every command says so in one line before it starts."""
        try:
            parse_key(value.get_secret_value())
        except VaultError as exc:
            raise ValueError(f"{exc} (generate one with: openssl rand -base64 32)") from None
        return value

    @model_validator(mode="after")
    def _usable_old_keys(self) -> Settings:
        try:
            old = parse_old_keys(self.old_master_keys.get_secret_value())
        except VaultError as exc:
            raise ValueError(str(exc)) from None
        current = parse_key(self.master_key.get_secret_value())
        if old.get(self.master_key_id, current) != current:
            raise ValueError(
                f"MLC_OLD_MASTER_KEYS holds another key under {self.master_key_id!r}, the id of"
                " MLC_MASTER_KEY: a new master key needs a new MLC_MASTER_KEY_ID"
            )
        return self

    def check_production(self) -> None:
        """The development key is refused in production however it is written (spaces around
        it, another base64 spelling of the same bytes): the decoded keys are compared."""
        if self.env == "production" and parse_key(self.master_key.get_secret_value()) == parse_key(
            DEV_MASTER_KEY
        ):
            raise ValueError("MLC_MASTER_KEY: the development key is refused in production")


class SettingsError(SystemExit):
    pass


def describe_error(exc: ValidationError) -> str:
    """The first problem on one line, naming the variable; never the value (it may be a
    secret)."""
    first = exc.errors()[0]
    message = " ".join(str(first["msg"]).removeprefix("Value error, ").split())
    if not first["loc"]:  # a check of several settings together names them itself
        return f"settings are inconsistent: {message}"
    name = "MLC_" + str(first["loc"][0]).upper()
    return f"setting {name} is invalid: {message}"


@lru_cache(maxsize=1)
def load_settings() -> Settings:
    """The settings of this process; on a bad value, one line on stderr and exit status 2."""
    try:
        settings = Settings()
        settings.check_production()
    except ValidationError as exc:
        print(f"ml-connector: {describe_error(exc)}", file=sys.stderr)
        raise SettingsError(2) from None
    except ValueError as exc:
        print(f"ml-connector: {exc}", file=sys.stderr)
        raise SettingsError(2) from None
    return settings
