"""The flow and connection stores against the real PostgreSQL: what a service reads per batch."""

from __future__ import annotations

import os

import asyncpg
import pytest
from pydantic import SecretStr

from emulators.sandbox import FLOWS_DIR
from shared.connections import ConnectionConfigError, ConnectionStore
from shared.flow_store import FlowNotFoundError, FlowStore
from shared.flows import load_flow_file
from shared.vault import Vault


async def test_a_flow_read_per_batch_follows_new_versions_and_its_switch(
    clean_db: asyncpg.Pool,
) -> None:
    """The mapper reads the flow for every batch; the definition is parsed once per version,
    yet a new version and enabling or disabling show at the next read."""
    store = FlowStore(clean_db)
    flow = load_flow_file(FLOWS_DIR / "syspro-zoho.yaml")
    assert (await store.apply(flow))[0] == 1
    first = await store.get(flow.name)
    assert first.version == 1 and first.enabled
    assert (await store.get(flow.name)).flow is first.flow  # parsed once

    fields = flow.entity("customers").fields
    fields["Account_Name"] = fields["Account_Name"].model_copy(update={"default": "(no name)"})
    assert (await store.apply(flow))[0] == 2
    second = await store.get(flow.name)
    assert second.version == 2
    assert second.flow.entity("customers").fields["Account_Name"].default == "(no name)"
    assert first.flow.entity("customers").fields["Account_Name"].default is None

    await store.set_enabled(flow.name, False)
    assert (await store.get(flow.name)).enabled is False
    with pytest.raises(FlowNotFoundError):
        await store.get("no-such-flow")


async def test_the_system_of_a_connection_is_read_without_its_secrets(
    clean_db: asyncpg.Pool,
) -> None:
    """Services ask which system a connection is for every batch: that must not need (or
    decrypt) its secrets, here sealed with a key this vault does not have."""
    elsewhere = Vault("old", {"old": os.urandom(32)})
    await clean_db.execute(
        "INSERT INTO connections (name, system, secrets, key_id)"
        " VALUES ($1, 'zoho_crm', $2, 'old')",
        "crm",
        elsewhere.seal_secrets({"client_secret": SecretStr("s")}, "crm"),
    )
    store = ConnectionStore(clean_db, Vault("new", {"new": os.urandom(32)}))
    assert await store.system_of("crm") == "zoho_crm"
    with pytest.raises(ConnectionConfigError, match="no connection named 'erp'"):
        await store.system_of("erp")
