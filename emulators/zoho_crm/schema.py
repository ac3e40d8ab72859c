"""Modules and fields of a fresh Enterprise org: the metadata the emulator validates against."""

from __future__ import annotations

from dataclasses import dataclass, field
from dataclasses import fields as dc_fields
from typing import Any

from emulators.zoho_crm.options import ZohoOptions

TEXT_TYPES = {"text", "textarea", "website", "autonumber"}
STRING_TYPES = TEXT_TYPES | {"email", "phone", "picklist"}
NUMBER_TYPES = {"integer", "bigint", "double", "currency"}
DATA_TYPES = (
    STRING_TYPES
    | NUMBER_TYPES
    | {
        "boolean",
        "date",
        "datetime",
        "lookup",
        "ownerlookup",
        "subform",
        "multiselectpicklist",
    }
)
JSON_TYPES = {
    "integer": "integer",
    "bigint": "string",
    "double": "double",
    "currency": "double",
    "boolean": "boolean",
    "lookup": "jsonobject",
    "ownerlookup": "jsonobject",
    "subform": "jsonarray",
    "multiselectpicklist": "jsonarray",
}
DEFAULT_LENGTHS = {
    "text": 255,
    "textarea": 32000,
    "website": 255,
    "email": 100,
    "phone": 30,
    "picklist": 120,
    "integer": 9,
    "bigint": 18,
    "double": 16,
    "currency": 16,
}


Json = dict[str, Any]


@dataclass
class FieldDef:
    api_name: str
    data_type: str
    label: str = ""
    length: int | None = None
    system_mandatory: bool = False
    unique: bool = False
    external: bool = False
    read_only: bool = False
    lookup_module: str | None = None
    pick_list_values: tuple[str, ...] = ()
    subform: str | None = None
    custom: bool = False
    id: str = ""

    @property
    def tracked(self) -> bool:
        return self.unique or self.external

    def metadata(self, modules: dict[str, ModuleDef]) -> Json:
        lookup: Json = {}
        if self.lookup_module:
            target = modules.get(self.lookup_module)
            lookup = {
                "display_label": self.label,
                "api_name": self.api_name,
                "module": {
                    "api_name": self.lookup_module,
                    "id": target.id if target else None,
                },
                "id": self.id,
            }
        meta: Json = {
            "api_name": self.api_name,
            "field_label": self.label or self.api_name.replace("_", " "),
            "display_label": self.label or self.api_name.replace("_", " "),
            "id": self.id,
            "data_type": self.data_type,
            "json_type": JSON_TYPES.get(self.data_type, "string"),
            "length": self.length,
            "system_mandatory": self.system_mandatory,
            "read_only": self.read_only,
            "field_read_only": self.read_only,
            "custom_field": self.custom,
            "unique": {"casesensitive": "false"} if self.unique or self.external else {},
            "external": (
                {"show": True, "type": "org", "allow_multiple_config": False}
                if self.external
                else None
            ),
            "lookup": lookup,
            "pick_list_values": [
                {
                    "display_value": value,
                    "actual_value": value,
                    "sequence_number": number,
                    "id": f"{self.id}{number:03d}",
                }
                for number, value in enumerate(self.pick_list_values, start=1)
            ],
            "visible": True,
        }
        if self.subform:
            meta["associated_module"] = {"api_name": self.subform, "module": self.subform}
            meta["subform"] = {"module": self.subform}
        return meta


@dataclass
class ModuleDef:
    api_name: str
    singular: str
    id: str
    display_field: str
    dup_field: str | None
    fields: dict[str, FieldDef]
    line_items: str | None = None
    mandatory: list[str] = field(default_factory=list)
    """System-mandatory api names (derived; call :meth:`refresh` after changing fields)."""
    unique: list[str] = field(default_factory=list)
    """Unique or external api names (derived)."""
    external: list[str] = field(default_factory=list)
    """External api names (derived)."""

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        values = self.fields.values()
        self.mandatory = [f.api_name for f in values if f.system_mandatory]
        self.unique = [f.api_name for f in values if f.tracked]
        self.external = [f.api_name for f in values if f.external]

    def tracked_fields(self) -> list[str]:
        names = list(self.unique)
        if self.dup_field and self.dup_field not in names:
            names.insert(0, self.dup_field)
        return names

    def unique_fields(self) -> list[str]:
        return self.unique


class Ids:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"{self.prefix}000{self.n:09d}"


LEAD_SOURCES = (
    "Advertisement",
    "Cold Call",
    "Employee Referral",
    "External Referral",
    "Online Store",
    "Partner",
    "Public Relations",
    "Sales Email Alias",
    "Seminar Partner",
    "Internal Seminar",
    "Trade Show",
    "Web Download",
    "Web Research",
    "Chat",
)
INDUSTRIES = (
    "ASP (Application Service Provider)",
    "Data/Telecom OEM",
    "ERP (Enterprise Resource Planning)",
    "Government/Military",
    "Large Enterprise",
    "ManagementISV",
    "MSP (Management Service Provider)",
    "Network Equipment Enterprise",
    "Non-management ISV",
    "Optical Networking",
    "Service Provider",
    "Small/Medium Enterprise",
    "Storage Equipment",
    "Storage Service Provider",
    "Systems Integrator",
    "Wireless Industry",
)
DEAL_STAGES = (
    "Qualification",
    "Needs Analysis",
    "Value Proposition",
    "Id. Decision Makers",
    "Perception Analysis",
    "Proposal/Price Quote",
    "Negotiation/Review",
    "Closed Won",
    "Closed Lost",
    "Closed Lost to Competition",
)
ORDER_STATUS = ("Created", "Approved", "Delivered", "Cancelled")
CARRIERS = ("FedEX", "UPS", "USPS", "DHL", "BlueDart")
USAGE_UNITS = (
    "Box",
    "Carton",
    "Dozen",
    "Each",
    "Hours",
    "Impressions",
    "Lb",
    "M",
    "Pack",
    "Pages",
    "Pieces",
    "Quantity",
    "Reams",
    "Sheet",
    "Spiral Binder",
    "Sq Ft",
)


def _f(api_name: str, data_type: str, length: int | None = None, **kw: Any) -> FieldDef:
    if length is None:
        length = DEFAULT_LENGTHS.get(data_type)
    return FieldDef(api_name=api_name, data_type=data_type, length=length, **kw)


def _address(prefix: str, code: str = "Code") -> list[FieldDef]:
    return [
        _f(f"{prefix}_Street", "text", 250),
        _f(f"{prefix}_City", "text", 30),
        _f(f"{prefix}_State", "text", 30),
        _f(f"{prefix}_{code}", "text", 30),
        _f(f"{prefix}_Country", "text", 30),
    ]


def _system_fields() -> list[FieldDef]:
    return [
        _f("Created_By", "ownerlookup", read_only=True),
        _f("Modified_By", "ownerlookup", read_only=True),
        _f("Created_Time", "datetime", read_only=True),
        _f("Modified_Time", "datetime", read_only=True),
    ]


def _inventory_totals() -> list[FieldDef]:
    return [
        _f("Sub_Total", "currency", read_only=True),
        _f("Discount", "currency"),
        _f("Tax", "currency", read_only=True),
        _f("Adjustment", "currency"),
        _f("Grand_Total", "currency", read_only=True),
    ]


def line_item_names(casing: str) -> dict[str, str]:
    """Logical line-item keys -> api names for the chosen casing."""
    if casing == "lower":
        return {
            "quantity": "quantity",
            "list_price": "list_price",
            "discount": "discount",
            "tax": "tax",
            "total": "total",
            "net_total": "net_total",
            "description": "description",
        }
    return {
        "quantity": "Quantity",
        "list_price": "List_Price",
        "discount": "Discount",
        "tax": "Tax",
        "total": "Total",
        "net_total": "Net_Total",
        "description": "Description",
    }


def build_schema(opts: ZohoOptions) -> tuple[dict[str, ModuleDef], dict[str, dict[str, FieldDef]]]:
    """The standard modules of a fresh Enterprise org, and the line-item subforms."""
    field_ids = Ids(opts.org_id + "00")
    names = line_item_names(opts.line_item_casing)

    def line_items() -> dict[str, FieldDef]:
        items = [
            _f("Product_Name", "lookup", lookup_module="Products", system_mandatory=True),
            _f(names["quantity"], "double", system_mandatory=True),
            _f(names["list_price"], "currency"),
            _f(names["discount"], "currency"),
            _f(names["tax"], "currency"),
            _f(names["total"], "currency", read_only=True),
            _f(names["net_total"], "currency", read_only=True),
            _f(names["description"], "textarea", 2000),
        ]
        for item in items:
            item.id = field_ids()
        return {item.api_name: item for item in items}

    po_items = opts.purchase_order_items_name
    subforms = {
        "Invoiced_Items": line_items(),
        "Ordered_Items": line_items(),
        po_items: line_items(),
    }
    owner = _f("Owner", "ownerlookup")
    specs: list[tuple[str, str, str, str | None, str | None, list[FieldDef]]] = [
        (
            "Accounts",
            "Account",
            "Account_Name",
            "Account_Name",
            None,
            [
                owner,
                _f("Account_Name", "text", 200, system_mandatory=True),
                _f("Account_Number", "text", 40),
                _f("Account_Site", "text", 80),
                _f("Parent_Account", "lookup", lookup_module="Accounts"),
                _f(
                    "Account_Type",
                    "picklist",
                    pick_list_values=(
                        "Analyst",
                        "Competitor",
                        "Customer",
                        "Distributor",
                        "Integrator",
                        "Investor",
                        "Partner",
                        "Press",
                        "Prospect",
                        "Reseller",
                        "Other",
                    ),
                ),
                _f("Industry", "picklist", pick_list_values=INDUSTRIES),
                _f("Annual_Revenue", "currency"),
                _f("Employees", "integer"),
                _f(
                    "Ownership",
                    "picklist",
                    pick_list_values=(
                        "Other",
                        "Private",
                        "Public",
                        "Subsidiary",
                        "Partnership",
                        "Government",
                        "Privately Held",
                        "Public Company",
                    ),
                ),
                _f(
                    "Rating",
                    "picklist",
                    pick_list_values=(
                        "Acquired",
                        "Active",
                        "Market Failed",
                        "Project Cancelled",
                        "Shut Down",
                    ),
                ),
                _f("Phone", "phone"),
                _f("Fax", "phone"),
                _f("Website", "website"),
                _f("Ticker_Symbol", "text", 30),
                _f("SIC_Code", "integer"),
                *_address("Billing"),
                *_address("Shipping"),
                _f("Description", "textarea"),
            ],
        ),
        (
            "Contacts",
            "Contact",
            "Full_Name",
            "Email",
            None,
            [
                owner,
                _f(
                    "Salutation",
                    "picklist",
                    pick_list_values=("Mr.", "Mrs.", "Ms.", "Dr.", "Prof."),
                ),
                _f("First_Name", "text", 40),
                _f("Last_Name", "text", 80, system_mandatory=True),
                _f("Full_Name", "text", 120, read_only=True),
                _f("Email", "email"),
                _f("Secondary_Email", "email"),
                _f("Phone", "phone"),
                _f("Other_Phone", "phone"),
                _f("Home_Phone", "phone"),
                _f("Mobile", "phone"),
                _f("Fax", "phone"),
                _f("Title", "text", 100),
                _f("Department", "text", 100),
                _f("Account_Name", "lookup", lookup_module="Accounts"),
                _f("Vendor_Name", "lookup", lookup_module="Vendors"),
                _f("Reports_To", "lookup", lookup_module="Contacts"),
                _f("Lead_Source", "picklist", pick_list_values=LEAD_SOURCES),
                _f("Date_of_Birth", "date"),
                _f("Email_Opt_Out", "boolean"),
                *_address("Mailing", "Zip"),
                *_address("Other", "Zip"),
                _f("Description", "textarea"),
            ],
        ),
        (
            "Deals",
            "Deal",
            "Deal_Name",
            "Deal_Name",
            None,
            [
                owner,
                _f("Deal_Name", "text", 120, system_mandatory=True),
                _f("Account_Name", "lookup", lookup_module="Accounts"),
                _f("Contact_Name", "lookup", lookup_module="Contacts"),
                _f(
                    "Type",
                    "picklist",
                    pick_list_values=("Existing Business", "New Business"),
                ),
                _f("Lead_Source", "picklist", pick_list_values=LEAD_SOURCES),
                _f("Stage", "picklist", system_mandatory=True, pick_list_values=DEAL_STAGES),
                _f("Amount", "currency"),
                _f("Probability", "integer", 3),
                _f("Expected_Revenue", "currency", read_only=True),
                _f(
                    "Closing_Date",
                    "date",
                    system_mandatory=opts.deals_closing_date_required,
                ),
                _f("Next_Step", "text", 100),
                _f("Description", "textarea"),
            ],
        ),
        (
            "Products",
            "Product",
            "Product_Name",
            "Product_Name",
            None,
            [
                owner,
                _f("Product_Name", "text", 200, system_mandatory=True),
                _f("Product_Code", "text", 40),
                _f("Product_Active", "boolean"),
                _f(
                    "Product_Category",
                    "picklist",
                    pick_list_values=("Hardware", "Software", "CRM Applications"),
                ),
                _f("Vendor_Name", "lookup", lookup_module="Vendors"),
                _f("Unit_Price", "currency"),
                _f("Commission_Rate", "currency"),
                _f("Usage_Unit", "picklist", pick_list_values=USAGE_UNITS),
                _f("Qty_Ordered", "double"),
                _f("Qty_in_Stock", "double"),
                _f("Reorder_Level", "double"),
                _f("Qty_in_Demand", "double"),
                _f("Taxable", "boolean"),
                _f("Sales_Start_Date", "date"),
                _f("Sales_End_Date", "date"),
                _f("Description", "textarea"),
            ],
        ),
        (
            "Vendors",
            "Vendor",
            "Vendor_Name",
            "Vendor_Name",
            None,
            [
                owner,
                _f("Vendor_Name", "text", 120, system_mandatory=True),
                _f("Email", "email"),
                _f("Phone", "phone"),
                _f("Website", "website"),
                _f("Category", "text", 40),
                _f("Street", "text", 250),
                _f("City", "text", 30),
                _f("State", "text", 30),
                _f("Zip_Code", "text", 30),
                _f("Country", "text", 30),
                _f("Description", "textarea"),
            ],
        ),
        (
            "Sales_Orders",
            "Sales Order",
            "Subject",
            "Subject",
            "Ordered_Items",
            [
                owner,
                _f("Subject", "text", 255, system_mandatory=True),
                _f("Customer_No", "text", 40),
                _f("Purchase_Order", "text", 100),
                _f("Account_Name", "lookup", lookup_module="Accounts"),
                _f("Contact_Name", "lookup", lookup_module="Contacts"),
                _f("Deal_Name", "lookup", lookup_module="Deals"),
                _f("Due_Date", "date"),
                _f("Status", "picklist", pick_list_values=ORDER_STATUS),
                _f("Carrier", "picklist", pick_list_values=CARRIERS),
                _f("Excise_Duty", "currency"),
                _f("Sales_Commission", "currency"),
                _f("Ordered_Items", "subform", subform="Ordered_Items"),
                *_inventory_totals(),
                *_address("Billing"),
                *_address("Shipping"),
                _f("Terms_and_Conditions", "textarea"),
                _f("Description", "textarea"),
            ],
        ),
        (
            "Invoices",
            "Invoice",
            "Subject",
            "Subject",
            "Invoiced_Items",
            [
                owner,
                _f("Subject", "text", 255, system_mandatory=True),
                _f("Invoice_Date", "date"),
                _f("Due_Date", "date"),
                _f("Status", "picklist", pick_list_values=ORDER_STATUS),
                _f("Account_Name", "lookup", lookup_module="Accounts"),
                _f("Contact_Name", "lookup", lookup_module="Contacts"),
                _f("Sales_Order", "lookup", lookup_module="Sales_Orders"),
                _f("Deal_Name", "lookup", lookup_module="Deals"),
                _f("Purchase_Order", "text", 100),
                _f("Excise_Duty", "currency"),
                _f("Sales_Commission", "currency"),
                _f("Invoiced_Items", "subform", subform="Invoiced_Items"),
                *_inventory_totals(),
                *_address("Billing"),
                *_address("Shipping"),
                _f("Terms_and_Conditions", "textarea"),
                _f("Description", "textarea"),
            ],
        ),
        (
            "Purchase_Orders",
            "Purchase Order",
            "Subject",
            "Subject",
            po_items,
            [
                owner,
                _f("Subject", "text", 255, system_mandatory=True),
                _f("PO_Number", "text", 100),
                _f("PO_Date", "date"),
                _f("Due_Date", "date"),
                _f("Vendor_Name", "lookup", lookup_module="Vendors", system_mandatory=True),
                _f("Contact_Name", "lookup", lookup_module="Contacts"),
                _f("Requisition_No", "text", 100),
                _f("Tracking_Number", "text", 100),
                _f("Carrier", "picklist", pick_list_values=CARRIERS),
                _f("Status", "picklist", pick_list_values=ORDER_STATUS),
                _f("Excise_Duty", "currency"),
                _f("Sales_Commission", "currency"),
                _f(po_items, "subform", subform=po_items),
                *_inventory_totals(),
                *_address("Billing"),
                *_address("Shipping"),
                _f("Terms_and_Conditions", "textarea"),
                _f("Description", "textarea"),
            ],
        ),
    ]
    module_ids = Ids(opts.org_id + "01")
    modules: dict[str, ModuleDef] = {}
    for api_name, singular, display, dup, items_name, field_list in specs:
        defs: dict[str, FieldDef] = {}
        for fdef in [*field_list, *_system_fields()]:
            copy = FieldDef(**{f.name: getattr(fdef, f.name) for f in dc_fields(FieldDef)})
            copy.id = field_ids()
            copy.label = copy.label or copy.api_name.replace("_", " ")
            defs[copy.api_name] = copy
        modules[api_name] = ModuleDef(
            api_name=api_name,
            singular=singular,
            id=module_ids(),
            display_field=display,
            dup_field=dup,
            fields=defs,
            line_items=items_name,
        )
    return modules, subforms
