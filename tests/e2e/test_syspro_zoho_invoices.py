"""The second ready flow: SYSPRO invoices into Zoho's Invoices module (Professional and up)."""

from __future__ import annotations

from emulators.sandbox import duplicate_creates
from tests.e2e.conftest import Pipeline, wait_until


async def _landed(p: Pipeline) -> bool:
    return await p.zoho_count("Accounts") >= 40 and await p.zoho_count("Invoices") >= 120


async def test_invoices_module_flow(pipeline_factory) -> None:
    p: Pipeline = await pipeline_factory(
        customers=40,
        invoices=120,
        flow_files=("syspro-zoho-invoices.yaml",),
        invoice_product=True,
        full_every=2.0,  # payments on older invoices are seen by the periodic full read
    )
    p.start()
    await wait_until(lambda: _landed(p), 60, "40 accounts and 120 invoices")
    accounts = {a["ERP_Customer_No"]: a for a in await p.sandbox.zoho_records("Accounts")}
    invoices = await p.sandbox.zoho_records("Invoices")
    for invoice in invoices:
        customer = invoice["ERP_Invoice_Key"].split("|")[0]
        assert invoice["Account_Name"]["id"] == accounts[customer]["id"]
        assert len(invoice["Invoiced_Items"]) == 1
        assert invoice["Status"] in ("Approved", "Delivered")

    # A payment updates the invoice; its single line item is not sent again (no duplicate line).
    rows = await p.sandbox.syspro_rows("ArInvoice")
    open_row = next(r for r in rows if float(r["InvoiceBal1"]) > 0)
    key = f"{open_row['Customer']}|{open_row['Invoice']}|{open_row['DocumentType']}"
    await p.sandbox.control(
        "syspro", "PATCH", f"/_control/tables/ArInvoice/{key}", {"InvoiceBal1": 0}
    )
    match = (
        f"{open_row['Customer'].strip()}|{open_row['Invoice'].strip()}|{open_row['DocumentType']}"
    )

    async def paid() -> bool:
        for invoice in await p.sandbox.zoho_records("Invoices"):
            if invoice["ERP_Invoice_Key"] == match:
                return invoice["Payment_Status"] == "paid" and invoice
        return False

    invoice = await wait_until(paid, 30, "the payment in Zoho")
    assert invoice["Status"] == "Delivered"
    assert len(invoice["Invoiced_Items"]) == 1
    stats = await p.sandbox.zoho_stats()
    assert stats["records"]["Invoices"] == 120
    assert duplicate_creates(stats) == 0
    await p.stop()
