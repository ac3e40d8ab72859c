"""After a full run, neither the services' logs nor a dump of the database hold a secret."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from emulators.sandbox import SYSPRO_PASSWORD
from emulators.zoho_crm import DEFAULT_CLIENT_SECRET, DEFAULT_REFRESH_TOKEN
from tests.e2e.conftest import Pipeline, wait_until


@pytest.mark.skipif(not shutil.which("pg_dump"), reason="pg_dump is not installed")
async def test_no_secret_in_logs_or_database(pipeline_factory) -> None:
    p: Pipeline = await pipeline_factory(customers=200, invoices=400)
    for service in ("poller", "mapper", "writer"):
        p.spawn(service)
    await wait_until(lambda: _landed(p), 90, "the run to finish")
    # a failure path too: an expired token and a refused record put errors into logs and audit
    await p.sandbox.control("zoho", "POST", "/_control/expire_tokens", {})
    await p.sandbox.control(
        "syspro", "POST", "/_control/change", {"table": "ArCustomer", "count": 5}
    )
    await asyncio.sleep(6)
    access_tokens = await p.pool.fetchval("SELECT count(*) FROM token_cache")
    assert access_tokens >= 1  # the token is cached, encrypted
    await p.close()

    secrets = [SYSPRO_PASSWORD, DEFAULT_CLIENT_SECRET, DEFAULT_REFRESH_TOKEN]
    logs = await asyncio.to_thread(_read_logs, p.settings.bus_prefix)
    assert logs, "the services wrote logs"
    for log, text in logs.items():
        assert text.strip(), f"{log} is empty"
        for secret in secrets:
            assert secret not in text, f"{log} holds a secret"
        assert "Zoho-oauthtoken" not in text
    dump = await asyncio.to_thread(
        subprocess.run,
        ["pg_dump", "--data-only", p.settings.database_url.get_secret_value()],
        capture_output=True,
        check=True,
    )
    data = dump.stdout.decode(errors="ignore")
    assert "syspro-zoho" in data  # the dump has the data
    for secret in secrets:
        assert secret not in data, "the database holds a secret in clear"


async def _landed(p: Pipeline) -> bool:
    return await p.zoho_count("Accounts") >= 200 and await p.zoho_count("Deals") >= 400


def _read_logs(prefix: str) -> dict[str, str]:
    return {
        str(path): path.read_text(errors="ignore")
        for path in Path("/tmp").glob(f"mlc-{prefix}-*.log")
    }
