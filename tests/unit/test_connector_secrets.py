"""The one registry of secrets (``shared.logs``): what is registered, in which forms a secret is
masked, and the tokens a connection obtains (issue 17, item 10)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any
from urllib.parse import quote, quote_plus

from shared.failures import TransientError, describe
from shared.logs import (
    MIN_SECRET_LENGTH,
    TOKENS_KEPT,
    JsonFormatter,
    redact,
    register_secret,
    register_secrets,
    register_token,
)
from shared.tokens import Token, TokenManager


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def json_line(message: str) -> str:
    log = logging.getLogger("test.secrets")
    record = log.makeRecord(log.name, logging.WARNING, __file__, 1, "%s", (message,), None)
    return JsonFormatter("test").format(record)


def test_a_secret_is_masked_as_sent_and_as_echoed() -> None:
    secret = unique('pa ss+w/o"rd\\')
    assert register_secret(secret)
    for form in (secret, quote(secret, safe=""), quote_plus(secret), quote(secret)):
        assert redact(f"[{form}]") == "[********]", form
    line = json_line(f"vendor said: {secret}")
    assert secret not in line and json.dumps(secret)[1:-1] not in line
    assert json.loads(line)["message"] == "vendor said: ********"
    assert describe(TransientError(f"echo {secret}")) == "echo ********"


def test_secrets_too_short_to_mask_are_refused_and_named() -> None:
    assert MIN_SECRET_LENGTH == 4
    assert register_secret("") and register_secret(None)  # nothing to mask
    assert not register_secret("x7q")
    assert redact("x7q is kept") == "x7q is kept"
    too_short = register_secrets({"client_secret": unique("long-enough"), "pin": "123"})
    assert too_short == ["pin"]


def test_the_tokens_of_a_connection_are_masked_and_bounded() -> None:
    connection = unique("conn")
    tokens = [unique("tok") for _ in range(TOKENS_KEPT + 3)]
    for token in tokens:
        register_token(connection, token)
    assert redact(tokens[-1]) == "********"
    assert redact(tokens[3]) == "********"
    assert redact(tokens[0]) == tokens[0]  # only the newest TOKENS_KEPT are kept


class FakeCache:
    def __init__(self, value: str) -> None:
        self.value = value

    async def with_lock(self, connection: str, work: Any) -> Token:
        result: Token = await work(None)
        return result

    async def load(self, conn: Any, connection: str) -> Token | None:
        return Token(self.value, time.time() + 3600)

    async def store(self, conn: Any, connection: str, token: Token) -> None:
        raise AssertionError("a fresh cached token is used, not replaced")


async def test_every_token_a_connection_obtains_is_registered() -> None:
    fetched = unique("access")

    async def fetch() -> Token:
        return Token(fetched, time.time() + 3600)

    await TokenManager(unique("c"), fetch).get()
    assert redact(f"token {fetched}") == "token ********"

    shared = unique("from-another-replica")
    await TokenManager(unique("c"), fetch, cache=FakeCache(shared)).get()  # type: ignore[arg-type]
    assert redact(shared) == "********"
