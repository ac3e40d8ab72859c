from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from pydantic import SecretStr

from shared.vault import Vault, VaultError


async def test_rotation_re_encrypts_every_secret(clean_db: asyncpg.Pool) -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    old = Vault("k1", {"k1": old_key})
    for name in ("a", "b"):
        await clean_db.execute(
            "INSERT INTO connections (name, system, secrets, key_id)"
            " VALUES ($1, 'zoho_crm', $2, 'k1')",
            name,
            old.seal_secrets({"client_secret": SecretStr(f"secret-{name}")}, name),
        )
    await clean_db.execute(
        "INSERT INTO token_cache (connection, token, key_id, expires_at)"
        " VALUES ('a', $1, 'k1', $2)",
        old.encrypt(b"access-token", "a"),
        datetime.now(UTC) + timedelta(hours=1),
    )

    rotating = Vault("k2", {"k2": new_key, "k1": old_key})
    counts = await rotating.rotate(clean_db)
    assert counts == {"connections": 2, "token_cache": 1, "webhook_channels": 0}
    assert await rotating.rotate(clean_db) == {
        "connections": 0,
        "token_cache": 0,
        "webhook_channels": 0,
    }

    only_new = Vault("k2", {"k2": new_key})
    rows = await clean_db.fetch("SELECT name, secrets, key_id FROM connections ORDER BY name")
    for row in rows:
        assert row["key_id"] == "k2"
        secrets = only_new.open_secrets(row["secrets"], row["name"])
        assert secrets["client_secret"].get_secret_value() == f"secret-{row['name']}"
        with pytest.raises(VaultError):
            old.open_secrets(row["secrets"], row["name"])
    token = await clean_db.fetchval("SELECT token FROM token_cache")
    assert only_new.decrypt(token, "a") == b"access-token"
