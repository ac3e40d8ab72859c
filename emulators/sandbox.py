"""A ready sandbox: the SYSPRO and Zoho CRM emulators on 127.0.0.1, the Zoho custom fields the
shipped flows write, and the connections and flows registered in the database.

Used by ``ml-connector demo``, the end-to-end tests and the benchmarks; never in production.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from emulators import syspro, zoho_crm
from emulators.kit import RunningEmulator
from shared.connections import ConnectionStore
from shared.flow_store import FlowStore
from shared.flows import Flow, load_flow_file

ROOT = Path(__file__).resolve().parent.parent
FLOWS_DIR = ROOT / "flows"

SYSPRO_OPERATOR, SYSPRO_PASSWORD, SYSPRO_COMPANY = "ADMIN", "demo-operator-pw", "EDU1"

# The custom fields of flows/syspro-zoho.yaml, as a Zoho administrator would create them.
ZOHO_CUSTOM_FIELDS: dict[str, list[dict[str, Any]]] = {
    "Accounts": [
        {
            "api_name": "ERP_Customer_No",
            "data_type": "text",
            "length": 30,
            "unique": True,
            "external": True,
        },
        {"api_name": "Credit_Limit", "data_type": "currency"},
        {"api_name": "Currency_Code", "data_type": "text", "length": 3},
        {"api_name": "Payment_Terms", "data_type": "text", "length": 50},
        {"api_name": "ERP_Contact", "data_type": "text", "length": 100},
        {"api_name": "Email", "data_type": "email"},
        {"api_name": "On_Hold", "data_type": "boolean"},
    ],
    "Deals": [
        {
            "api_name": "ERP_Invoice_Key",
            "data_type": "text",
            "length": 60,
            "unique": True,
            "external": True,
        },
        {"api_name": "Invoice_Date", "data_type": "date"},
        {"api_name": "Balance", "data_type": "currency"},
        {"api_name": "Payment_Status", "data_type": "text", "length": 20},
        {"api_name": "Days_Overdue", "data_type": "integer"},
    ],
    "Invoices": [
        {
            "api_name": "ERP_Invoice_Key",
            "data_type": "text",
            "length": 60,
            "unique": True,
            "external": True,
        },
        {"api_name": "Balance", "data_type": "currency"},
        {"api_name": "Payment_Status", "data_type": "text", "length": 20},
        {"api_name": "Days_Overdue", "data_type": "integer"},
    ],
}


def syspro_sandbox_options(customers: int = 0, invoices: int = 0, seed: int = 1) -> dict[str, Any]:
    return {
        "operators": {SYSPRO_OPERATOR: SYSPRO_PASSWORD},
        "company_id": SYSPRO_COMPANY,
        "odata_users": {SYSPRO_OPERATOR: SYSPRO_PASSWORD},
        "customers": customers,
        "invoices": invoices,
        "seed": seed,
    }


MATCH_FIELDS = {
    "Accounts": "ERP_Customer_No",
    "Deals": "ERP_Invoice_Key",
    "Invoices": "ERP_Invoice_Key",
}


def duplicate_creates(stats: dict[str, Any]) -> int:
    """Records the integration created twice: sharing a value of a flow's match field."""
    by_field = stats.get("duplicates_by_field", {})
    return sum(int(by_field.get(m, {}).get(f, 0)) for m, f in MATCH_FIELDS.items())


@dataclass
class RemoteEmulator:
    """An emulator running in another process (benchmarks): only its URL is known here."""

    url: str

    async def stop(self) -> None:
        return None


@dataclass
class Sandbox:
    syspro: RunningEmulator | RemoteEmulator
    zoho: RunningEmulator | RemoteEmulator
    _http: aiohttp.ClientSession | None = field(default=None, repr=False)

    @classmethod
    async def start(
        cls,
        *,
        customers: int = 0,
        invoices: int = 0,
        seed: int = 1,
        syspro_options: dict[str, Any] | None = None,
        zoho_options: dict[str, Any] | None = None,
        syspro_port: int = 0,
        zoho_port: int = 0,
    ) -> Sandbox:
        s_opts = {**syspro_sandbox_options(customers, invoices, seed), **(syspro_options or {})}
        sys_emulator = await RunningEmulator(syspro.create_app(**s_opts), syspro_port).start()
        zoho_emulator = await RunningEmulator(
            zoho_crm.create_app(**(zoho_options or {})), zoho_port
        ).start()
        box = cls(sys_emulator, zoho_emulator)
        for module, fields in ZOHO_CUSTOM_FIELDS.items():
            await box.control(
                "zoho", "POST", "/_control/fields", {"module": module, "fields": fields}
            )
        return box

    @classmethod
    async def attach(cls, syspro_url: str, zoho_url: str) -> Sandbox:
        """Use emulators served by other processes; creates the Zoho custom fields."""
        box = cls(RemoteEmulator(syspro_url), RemoteEmulator(zoho_url))
        for module, fields in ZOHO_CUSTOM_FIELDS.items():
            await box.control(
                "zoho", "POST", "/_control/fields", {"module": module, "fields": fields}
            )
        return box

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
        await self.syspro.stop()
        await self.zoho.stop()

    async def control(self, which: str, method: str, path: str, body: Any = None) -> Any:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        base = self.syspro.url if which == "syspro" else self.zoho.url
        async with self._http.request(method, base + path, json=body) as response:
            payload = await response.json(content_type=None)
            if response.status >= 400:
                raise RuntimeError(f"{which} control {method} {path}: {response.status} {payload}")
            return payload

    # -- connections and flows ---------------------------------------------------------------

    def syspro_connection(self) -> tuple[dict[str, Any], dict[str, str]]:
        settings = {
            "rest_url": f"{self.syspro.url}/SYSPROWCFService/Rest",
            "odata_url": f"{self.syspro.url}/SYSPRO8Odata/SYSPROOData",
            "operator": SYSPRO_OPERATOR,
            "company_id": SYSPRO_COMPANY,
            "page_size": 5000,
        }
        secrets = {"operator_password": SYSPRO_PASSWORD, "odata_password": SYSPRO_PASSWORD}
        return settings, secrets

    def zoho_connection(self) -> tuple[dict[str, Any], dict[str, str]]:
        settings = {"accounts_url": self.zoho.url, "client_id": zoho_crm.DEFAULT_CLIENT_ID}
        secrets = {
            "client_secret": zoho_crm.DEFAULT_CLIENT_SECRET,
            "refresh_token": zoho_crm.DEFAULT_REFRESH_TOKEN,
        }
        return settings, secrets

    async def register(
        self,
        connections: ConnectionStore,
        flows: FlowStore,
        *,
        flow_files: tuple[str, ...] = ("syspro-zoho.yaml",),
        poll_interval: float | None = None,
        syspro_settings: dict[str, Any] | None = None,
        full_every: float | None = None,
        lookups: dict[str, dict[str, Any]] | None = None,
    ) -> list[Flow]:
        settings, secrets = self.syspro_connection()
        settings.update(syspro_settings or {})
        await connections.add("syspro", "syspro", settings, secrets, replace=True)
        settings, secrets = self.zoho_connection()
        await connections.add("zoho", "zoho_crm", settings, secrets, replace=True)
        applied = []
        for name in flow_files:
            flow = load_flow_file(FLOWS_DIR / name)
            if poll_interval is not None:
                flow = flow.model_copy(update={"poll_interval": poll_interval})
            for table, values in (lookups or {}).items():
                if table in flow.lookups:
                    flow.lookups[table].update(values)
            if full_every is not None:
                for entity in flow.entities:
                    if entity.source.change_detection.mode == "column":
                        entity.source.change_detection.full_every = full_every
            await flows.apply(flow, file=str(FLOWS_DIR / name))
            applied.append(flow)
        return applied

    # -- what landed ---------------------------------------------------------------------------

    async def seed_invoice_product(self) -> str:
        """The Zoho product that stands for an ERP invoice (flows/syspro-zoho-invoices.yaml)."""
        seeded = await self.control(
            "zoho",
            "POST",
            "/_control/seed",
            {"module": "Products", "records": [{"Product_Name": "ERP invoice", "Unit_Price": 0}]},
        )
        return str(seeded["ids"][0])

    async def zoho_stats(self) -> dict[str, Any]:
        return await self.control("zoho", "GET", "/_control/stats")

    async def zoho_counts(self) -> dict[str, Any]:
        """Records per module and write calls, cheaply (``zoho_stats`` walks every record)."""
        return await self.control("zoho", "GET", "/_control/counts")

    async def zoho_records(self, module: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = await self.control(
                "zoho", "GET", f"/_control/records/{module}?limit=5000&offset={offset}"
            )
            rows = page["data"]
            out.extend(rows)
            if len(rows) < 5000:
                return out
            offset += len(rows)

    async def syspro_rows(self, table: str) -> list[dict[str, Any]]:
        return (await self.control("syspro", "GET", f"/_control/tables/{table}"))["rows"]


def main() -> None:
    """``python -m emulators.sandbox syspro|zoho --port N [--json-options '{...}']``: serve one
    emulator with the sandbox's credentials in its own process (benchmarks)."""
    import argparse
    import json

    from aiohttp import web

    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=["syspro", "zoho"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--json-options", default="{}")
    args = parser.parse_args()
    extra = json.loads(args.json_options)
    if args.system == "syspro":
        app = syspro.create_app(**{**syspro_sandbox_options(), **extra})
    else:
        app = zoho_crm.create_app(**extra)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
