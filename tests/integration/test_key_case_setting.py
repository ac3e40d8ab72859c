"""Whether a connection's keys are case-sensitive is read from its stored settings, without
opening its secrets (the poller and the mapper read it; real PostgreSQL)."""

from __future__ import annotations

import asyncpg

from shared.connections import ConnectionStore
from shared.keys import load_case_sensitive_keys
from shared.settings import Settings
from shared.vault import Vault

SYSPRO = {
    "rest_url": "http://127.0.0.1:1/SYSPROWCFService/Rest",
    "odata_url": "http://127.0.0.1:1/SYSPRO8Odata/SYSPROOData",
    "operator": "ADMIN",
    "company_id": "EDU1",
}
SYSPRO_SECRETS = {"operator_password": "op-secret", "odata_password": "odata-secret"}
ZOHO = {"accounts_url": "http://127.0.0.1:1", "client_id": "1000.TEST"}
ZOHO_SECRETS = {"client_secret": "client-secret", "refresh_token": "refresh-token"}


async def test_the_stored_setting_and_its_default(clean_db: asyncpg.Pool) -> None:
    store = ConnectionStore(clean_db, Vault.from_settings(Settings()))
    await store.add("erp", "syspro", SYSPRO, SYSPRO_SECRETS)
    await store.add("erp-cs", "syspro", {**SYSPRO, "case_sensitive_keys": "true"}, SYSPRO_SECRETS)
    await store.add("crm", "zoho_crm", ZOHO, ZOHO_SECRETS)
    assert await load_case_sensitive_keys(clean_db, "erp") is False
    assert await load_case_sensitive_keys(clean_db, "erp-cs") is True
    assert await load_case_sensitive_keys(clean_db, "crm") is True
    # stored before the setting existed: the system's default
    await clean_db.execute(
        "UPDATE connections SET settings = settings - 'case_sensitive_keys' WHERE name = 'erp'"
    )
    assert await load_case_sensitive_keys(clean_db, "erp") is False
    assert await load_case_sensitive_keys(clean_db, "nowhere") is True
