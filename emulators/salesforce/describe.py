"""The org's metadata: objects, fields, the StageName picklist, and describe output.

Field properties follow the sObject Describe result (``name``, ``type``, ``nillable``,
``createable``, ``updateable``, ``externalId``, ``unique``, ``picklistValues``, ...). Names are
case-insensitive on input and keep their declared case on output, as in Salesforce.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from emulators.salesforce.options import SalesforceOptions

Json = dict[str, Any]

TEXT_TYPES = {"string", "textarea", "picklist", "phone", "url", "email"}
NUMBER_TYPES = {"currency", "double", "percent", "int"}
FIELD_TYPES = TEXT_TYPES | NUMBER_TYPES | {"id", "boolean", "date", "datetime", "reference"}
SOAP_TYPES = {
    "id": "tns:ID",
    "reference": "tns:ID",
    "boolean": "xsd:boolean",
    "int": "xsd:int",
    "currency": "xsd:double",
    "double": "xsd:double",
    "percent": "xsd:double",
    "date": "xsd:date",
    "datetime": "xsd:dateTime",
}
DEFAULT_LENGTHS = {
    "string": 255,
    "textarea": 255,
    "picklist": 255,
    "phone": 40,
    "url": 255,
    "email": 80,
    "id": 18,
    "reference": 18,
}


@dataclass
class FieldDef:
    name: str
    type: str
    label: str = ""
    length: int = 0
    precision: int = 0
    scale: int = 0
    nillable: bool = True
    createable: bool = True
    updateable: bool = True
    external_id: bool = False
    unique: bool = False
    case_sensitive: bool = False
    id_lookup: bool = False
    name_field: bool = False
    custom: bool = False
    calculated: bool = False
    defaulted_on_create: bool = False
    picklist: list[str] = field(default_factory=list)
    restricted: bool = False
    reference_to: list[str] = field(default_factory=list)
    relationship_name: str | None = None

    @property
    def required_on_create(self) -> bool:
        return (
            not self.nillable
            and self.createable
            and not self.defaulted_on_create
            and self.type != "boolean"
        )

    @property
    def server_set(self) -> bool:
        return not self.createable and not self.updateable

    def describe(self) -> Json:
        text = self.type in TEXT_TYPES or self.type in ("id", "reference")
        return {
            "name": self.name,
            "label": self.label or self.name,
            "type": self.type,
            "soapType": SOAP_TYPES.get(self.type, "xsd:string"),
            "length": self.length if text else 0,
            "byteLength": self.length * 3 if text else 0,
            "precision": self.precision,
            "scale": self.scale,
            "digits": 9 if self.type == "int" else 0,
            "nillable": self.nillable,
            "createable": self.createable,
            "updateable": self.updateable,
            "externalId": self.external_id,
            "unique": self.unique,
            "caseSensitive": self.case_sensitive,
            "idLookup": self.id_lookup or self.external_id or self.type == "id",
            "nameField": self.name_field,
            "custom": self.custom,
            "calculated": self.calculated,
            "defaultedOnCreate": self.defaulted_on_create,
            "filterable": self.type != "textarea" or self.length <= 255,
            "sortable": self.type != "textarea" or self.length <= 255,
            "groupable": self.type not in NUMBER_TYPES | {"datetime", "textarea"},
            "picklistValues": [
                {
                    "active": True,
                    "defaultValue": False,
                    "label": value,
                    "validFor": None,
                    "value": value,
                }
                for value in self.picklist
            ],
            "restrictedPicklist": self.restricted,
            "referenceTo": list(self.reference_to),
            "relationshipName": self.relationship_name,
            "updateableOnlyOnCreate": False,
        }


@dataclass
class ObjectDef:
    name: str
    label: str
    label_plural: str
    key_prefix: str
    custom: bool = False
    fields: dict[str, FieldDef] = field(default_factory=dict)
    """lower-case name -> field, in declaration order."""
    writable: bool = True
    """False for User: readable (Owner.Name in SOQL), not written through this emulator."""

    def add(self, fdef: FieldDef) -> None:
        if not fdef.length:
            fdef.length = DEFAULT_LENGTHS.get(fdef.type, 0)
        self.fields[fdef.name.lower()] = fdef

    def field(self, name: str) -> FieldDef | None:
        return self.fields.get(name.lower())

    def relationship(self, name: str) -> FieldDef | None:
        lowered = name.lower()
        for fdef in self.fields.values():
            if fdef.relationship_name and fdef.relationship_name.lower() == lowered:
                return fdef
        return None

    @property
    def external_fields(self) -> list[FieldDef]:
        return [f for f in self.fields.values() if f.external_id]

    @property
    def unique_fields(self) -> list[FieldDef]:
        return [f for f in self.fields.values() if f.unique or f.external_id]

    def urls(self, version: str) -> Json:
        base = f"/services/data/v{version}/sobjects/{self.name}"
        return {
            "sobject": base,
            "describe": f"{base}/describe",
            "rowTemplate": f"{base}/{{ID}}",
        }

    def summary(self, version: str) -> Json:
        return {
            "name": self.name,
            "label": self.label,
            "labelPlural": self.label_plural,
            "keyPrefix": self.key_prefix,
            "custom": self.custom,
            "createable": self.writable,
            "updateable": self.writable,
            "deletable": self.writable,
            "queryable": True,
            "retrieveable": True,
            "searchable": True,
            "layoutable": True,
            "urls": self.urls(version),
        }

    def describe(self, version: str) -> Json:
        return {
            **self.summary(version),
            "fields": [f.describe() for f in self.fields.values()],
            "childRelationships": [],
            "recordTypeInfos": [],
        }


def _system_fields(obj: ObjectDef) -> None:
    server = {"createable": False, "updateable": False, "nillable": False}
    obj.add(
        FieldDef(
            "OwnerId",
            "reference",
            "Owner ID",
            reference_to=["User"],
            relationship_name="Owner",
            nillable=False,
            defaulted_on_create=True,
        )
    )
    obj.add(FieldDef("IsDeleted", "boolean", "Deleted", **server, defaulted_on_create=True))
    for name, label in (
        ("CreatedDate", "Created Date"),
        ("LastModifiedDate", "Last Modified Date"),
        ("SystemModstamp", "System Modstamp"),
    ):
        obj.add(FieldDef(name, "datetime", label, **server, defaulted_on_create=True))
    for name, label in (
        ("CreatedById", "Created By ID"),
        ("LastModifiedById", "Last Modified By ID"),
    ):
        obj.add(
            FieldDef(
                name,
                "reference",
                label,
                **server,
                defaulted_on_create=True,
                reference_to=["User"],
                relationship_name=name[:-2],
            )
        )


def _id_field(obj: ObjectDef, label: str) -> None:
    obj.add(
        FieldDef(
            "Id",
            "id",
            label,
            nillable=False,
            createable=False,
            updateable=False,
            defaulted_on_create=True,
            id_lookup=True,
        )
    )


def _address(obj: ObjectDef, prefix: str) -> None:
    obj.add(FieldDef(f"{prefix}Street", "textarea", f"{prefix} Street", 255))
    obj.add(FieldDef(f"{prefix}City", "string", f"{prefix} City", 40))
    obj.add(FieldDef(f"{prefix}State", "string", f"{prefix} State/Province", 80))
    obj.add(FieldDef(f"{prefix}PostalCode", "string", f"{prefix} Zip/Postal Code", 20))
    obj.add(FieldDef(f"{prefix}Country", "string", f"{prefix} Country", 80))


def _money(name: str, label: str) -> FieldDef:
    return FieldDef(name, "currency", label, precision=18, scale=2, custom=True)


def _ext(name: str, label: str, length: int) -> FieldDef:
    return FieldDef(
        name, "string", label, length, external_id=True, unique=True, custom=True, id_lookup=True
    )


def account_object() -> ObjectDef:
    obj = ObjectDef("Account", "Account", "Accounts", "001")
    _id_field(obj, "Account ID")
    obj.add(FieldDef("Name", "string", "Account Name", 255, nillable=False, name_field=True))
    obj.add(
        FieldDef(
            "Type",
            "picklist",
            "Account Type",
            picklist=[
                "Prospect",
                "Customer - Direct",
                "Customer - Channel",
                "Channel Partner / Reseller",
                "Installation Partner",
                "Technology Partner",
                "Other",
            ],
        )
    )
    obj.add(
        FieldDef(
            "ParentId",
            "reference",
            "Parent Account ID",
            reference_to=["Account"],
            relationship_name="Parent",
        )
    )
    _address(obj, "Billing")
    _address(obj, "Shipping")
    obj.add(FieldDef("Phone", "phone", "Account Phone"))
    obj.add(FieldDef("Fax", "phone", "Account Fax"))
    obj.add(FieldDef("Website", "url", "Website"))
    obj.add(FieldDef("AccountNumber", "string", "Account Number", 40))
    obj.add(FieldDef("Industry", "picklist", "Industry", picklist=["Manufacturing", "Other"]))
    obj.add(FieldDef("AnnualRevenue", "currency", "Annual Revenue", precision=18, scale=0))
    obj.add(FieldDef("NumberOfEmployees", "int", "Employees", precision=8))
    obj.add(FieldDef("Description", "textarea", "Account Description", 32000))
    _system_fields(obj)
    obj.add(_ext("ERP_Customer_Id__c", "ERP Customer Id", 40))
    obj.add(_money("ERP_Credit_Limit__c", "ERP Credit Limit"))
    obj.add(FieldDef("ERP_Currency__c", "string", "ERP Currency", 3, custom=True))
    obj.add(_money("ERP_Balance__c", "ERP Balance"))
    obj.add(FieldDef("ERP_Payment_Terms__c", "string", "ERP Payment Terms", 50, custom=True))
    obj.add(
        FieldDef(
            "ERP_On_Hold__c",
            "boolean",
            "ERP On Hold",
            custom=True,
            nillable=False,
            defaulted_on_create=True,
        )
    )
    return obj


def opportunity_object(opts: SalesforceOptions) -> ObjectDef:
    obj = ObjectDef("Opportunity", "Opportunity", "Opportunities", "006")
    _id_field(obj, "Opportunity ID")
    obj.add(
        FieldDef(
            "AccountId",
            "reference",
            "Account ID",
            reference_to=["Account"],
            relationship_name="Account",
        )
    )
    obj.add(FieldDef("Name", "string", "Name", 120, nillable=False, name_field=True))
    obj.add(FieldDef("Description", "textarea", "Description", 32000))
    obj.add(
        FieldDef(
            "StageName",
            "picklist",
            "Stage",
            nillable=False,
            picklist=[s["value"] for s in opts.stages],
            restricted=opts.stage_picklist_restricted,
        )
    )
    obj.add(FieldDef("Amount", "currency", "Amount", precision=18, scale=2))
    obj.add(FieldDef("Probability", "percent", "Probability (%)", precision=3, scale=0))
    obj.add(FieldDef("CloseDate", "date", "Close Date", nillable=False))
    obj.add(
        FieldDef(
            "Type",
            "picklist",
            "Opportunity Type",
            picklist=[
                "Existing Customer - Upgrade",
                "Existing Customer - Replacement",
                "Existing Customer - Downgrade",
                "New Customer",
            ],
        )
    )
    obj.add(FieldDef("NextStep", "string", "Next Step", 255))
    obj.add(FieldDef("LeadSource", "picklist", "Lead Source", picklist=["Web", "Other"]))
    derived = {"createable": False, "updateable": False, "defaulted_on_create": True}
    obj.add(FieldDef("IsClosed", "boolean", "Closed", nillable=False, **derived))
    obj.add(FieldDef("IsWon", "boolean", "Won", nillable=False, **derived))
    obj.add(
        FieldDef(
            "ForecastCategoryName",
            "picklist",
            "Forecast Category",
            picklist=["Omitted", "Pipeline", "Best Case", "Commit", "Closed"],
        )
    )
    _system_fields(obj)
    obj.add(_ext("ERP_Invoice_Key__c", "ERP Invoice Key", 60))
    obj.add(_money("ERP_Balance__c", "ERP Balance"))
    obj.add(FieldDef("ERP_Currency__c", "string", "ERP Currency", 3, custom=True))
    obj.add(FieldDef("ERP_Invoice_Date__c", "date", "ERP Invoice Date", custom=True))
    obj.add(FieldDef("ERP_Due_Date__c", "date", "ERP Due Date", custom=True))
    obj.add(FieldDef("ERP_Payment_Status__c", "string", "ERP Payment Status", 40, custom=True))
    obj.add(
        FieldDef("ERP_Days_Overdue__c", "double", "ERP Days Overdue", precision=18, custom=True)
    )
    return obj


def invoice_object() -> ObjectDef:
    obj = ObjectDef("ERP_Invoice__c", "ERP Invoice", "ERP Invoices", "a0E", custom=True)
    _id_field(obj, "Record ID")
    obj.add(
        FieldDef(
            "Name",
            "string",
            "ERP Invoice Name",
            80,
            nillable=False,
            name_field=True,
            id_lookup=True,
        )
    )
    obj.add(
        FieldDef(
            "Account__c",
            "reference",
            "Account",
            reference_to=["Account"],
            relationship_name="Account__r",
            custom=True,
        )
    )
    obj.add(_ext("ERP_Invoice_Key__c", "ERP Invoice Key", 60))
    obj.add(_money("Amount__c", "Amount"))
    obj.add(_money("Balance__c", "Balance"))
    obj.add(FieldDef("Currency__c", "string", "Currency", 3, custom=True))
    obj.add(FieldDef("Invoice_Date__c", "date", "Invoice Date", custom=True))
    obj.add(FieldDef("Due_Date__c", "date", "Due Date", custom=True))
    obj.add(FieldDef("Payment_Status__c", "string", "Payment Status", 40, custom=True))
    obj.add(FieldDef("Days_Overdue__c", "double", "Days Overdue", precision=18, custom=True))
    _system_fields(obj)
    return obj


def user_object() -> ObjectDef:
    """The org's users, read-only here: the Run As user owns every record."""
    obj = ObjectDef("User", "User", "Users", "005", writable=False)
    _id_field(obj, "User ID")
    read_only = {"createable": False, "updateable": False}
    obj.add(FieldDef("Username", "string", "Username", 80, nillable=False, **read_only))
    obj.add(FieldDef("Name", "string", "Full Name", 121, name_field=True, **read_only))
    obj.add(FieldDef("Email", "email", "Email", 128, **read_only))
    obj.add(FieldDef("IsActive", "boolean", "Active", nillable=False, **read_only))
    for name, label in (
        ("CreatedDate", "Created Date"),
        ("LastModifiedDate", "Last Modified Date"),
        ("SystemModstamp", "System Modstamp"),
    ):
        obj.add(FieldDef(name, "datetime", label, nillable=False, **read_only))
    return obj


def build_schema(opts: SalesforceOptions) -> dict[str, ObjectDef]:
    """lower-case object name -> definition."""
    objects = [account_object(), opportunity_object(opts), user_object()]
    if opts.custom_object:
        objects.append(invoice_object())
    return {obj.name.lower(): obj for obj in objects}


def field_from_spec(spec: Json, previous: FieldDef | None) -> FieldDef:
    """A field from a control-API spec (describe-style keys), merged over an existing field."""
    keys = {
        "name": "name",
        "type": "type",
        "label": "label",
        "length": "length",
        "precision": "precision",
        "scale": "scale",
        "nillable": "nillable",
        "createable": "createable",
        "updateable": "updateable",
        "externalId": "external_id",
        "unique": "unique",
        "caseSensitive": "case_sensitive",
        "restrictedPicklist": "restricted",
        "referenceTo": "reference_to",
        "relationshipName": "relationship_name",
        "defaultedOnCreate": "defaulted_on_create",
    }
    values: Json = {}
    for key, attr in keys.items():
        if key in spec:
            values[attr] = spec[key]
    if "picklistValues" in spec:
        values["picklist"] = [
            v["value"] if isinstance(v, dict) else str(v) for v in spec["picklistValues"]
        ]
    if previous is not None:
        return replace(previous, **values)
    name = values.get("name")
    ftype = values.get("type", "string")
    if not isinstance(name, str) or not name or ftype not in FIELD_TYPES:
        raise ValueError(f"a field needs a name and one of the types {sorted(FIELD_TYPES)}")
    values.setdefault("custom", name.lower().endswith("__c"))
    if values.get("external_id"):
        values.setdefault("id_lookup", True)
    return FieldDef(**values)
