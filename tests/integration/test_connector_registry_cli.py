"""``flows apply`` checks each flow against its connections' declared capabilities (issue 18
point 1): a flow naming what its source cannot read or its target cannot write is refused with
the file, the flow and the field named, and nothing is stored."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from emulators.sandbox import Sandbox
from tests.integration.test_cli import ROOT, Cli, _add_connections, cli, sandbox

__all__ = ["cli", "sandbox"]  # fixtures


async def test_flows_apply_refuses_what_a_connection_cannot_read_or_write(
    cli: Cli, sandbox: Sandbox, clean_db: asyncpg.Pool, tmp_path: Path
) -> None:
    await _add_connections(cli, sandbox)
    text = (ROOT / "flows/syspro-zoho.yaml").read_text()
    assert "entity: Deals" in text and "entity: ArCustomer" in text
    dealz = tmp_path / "dealz.yaml"
    dealz.write_text(
        text.replace("entity: Deals", "entity: Dealz").replace("name: syspro-zoho", "name: dz", 1)
    )
    typo = tmp_path / "typo.yaml"
    typo.write_text(
        text.replace("entity: ArCustomer", "entity: ArCustomr").replace(
            "name: syspro-zoho", "name: typo", 1
        )
    )
    code, out, err = await cli("flows", "apply", "flows/syspro-zoho.yaml", str(dealz), str(typo))
    assert code == 2, out
    assert (
        f"{dealz}: flow 'dz': entities[1].target.entity: zoho_crm cannot write 'Dealz'"
        " (writable: Accounts, Contacts, Deals," in err
    )
    assert (
        f"{typo}: flow 'typo': entities[0].source.entity: syspro cannot read 'ArCustomr'"
        " (readable: ArCustomer, ArInvoice)" in err
    )
    assert "nothing applied" in err and "Traceback" not in err
    assert await clean_db.fetchval("SELECT count(*) FROM flows") == 0

    code, out, err = await cli("flows", "apply", "flows/syspro-zoho.yaml")
    assert code == 0 and "syspro-zoho v1 created" in out, err
