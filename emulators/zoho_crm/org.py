"""The org's data: schema, records, users and clock, and the record rules every write follows
(validation of values, lookups, line items, unique values, derived values, rendering)."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

from aiohttp import web

from emulators.kit import Clock
from emulators.zoho_crm.errors import (
    RequestError,
    ZohoError,
    invalid_type,
    invalid_value,
    mandatory_missing,
)
from emulators.zoho_crm.options import MAX_FIELDS_PARAM, ZohoOptions
from emulators.zoho_crm.schema import (
    NUMBER_TYPES,
    TEXT_TYPES,
    FieldDef,
    Ids,
    build_schema,
    line_item_names,
)
from emulators.zoho_crm.store import ModuleStore
from emulators.zoho_crm.wire import parse_datetime, to_number

Json = dict[str, Any]

EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
PHONE_RE = re.compile(r"^\+?[0-9(][0-9\s().\-/]*((\s*(x|ext\.?)\s*)[0-9]+)?$", re.IGNORECASE)
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class Org:
    """One org of the datacenter: what every API and control handler reads and changes."""

    def __init__(self, options: ZohoOptions) -> None:
        self.opts = options
        self.clock = Clock(lambda: options.clock())
        self.user: Json = {
            "name": "Emulator Admin",
            "id": f"{options.org_id}000000411001",
            "email": "admin@emulator.example",
        }
        self.users: dict[str, Json] = {self.user["id"]: self.user}
        self.counters: Counter[str] = Counter()
        self.record_errors: Counter[str] = Counter()
        self._time_cache: dict[tuple[int, int], str] = {}
        self.reset()

    def reset(self) -> None:
        """Forget records, schema changes, reject rules, counters and clock skew."""
        self.modules, self.subforms = build_schema(self.opts)
        self.stores = {
            name: ModuleStore(mdef, self.opts.unique_case_insensitive)
            for name, mdef in self.modules.items()
        }
        self.ids = Ids(self.opts.org_id)
        self.ids.n = 1_000_000
        self.seq = 0
        self.field_ids = Ids(self.opts.org_id + "09")
        self.reject_rules: list[tuple[str, str, str]] = []
        self.counters.clear()
        self.record_errors.clear()
        self.clock.reset()

    def now(self) -> float:
        return self.clock.now()

    def fmt_time(self, ts: float) -> str:
        key = (math.floor(ts), self.opts.utc_offset_minutes)
        text = self._time_cache.get(key)
        if text is None:
            if len(self._time_cache) > 4096:
                self._time_cache.clear()
            tz = timezone(timedelta(minutes=key[1]))
            text = datetime.fromtimestamp(key[0], tz).isoformat()
            self._time_cache[key] = text
        return text

    def api_domain(self, request: web.Request) -> str:
        return self.opts.api_domain or f"{request.scheme}://{request.host}"

    # -- rendering ----------------------------------------------------------------------------

    def raw_value(self, record: Json, api_name: str) -> Any:
        if api_name == "Created_Time":
            return record["_c"]
        if api_name == "Modified_Time":
            return record["_m"]
        if api_name in ("Created_By", "Modified_By"):
            return record.get(api_name, self.user["id"])
        if api_name == "id":
            return record["id"]
        return record.get(api_name)

    def display_name(self, module: str, rid: str) -> str | None:
        store = self.stores.get(module)
        if store is None:
            return None
        record = store.records.get(rid)
        if record is None:
            return None
        value = record.get(store.mdef.display_field)
        return value if isinstance(value, str) else None

    def user_of(self, uid: str) -> Json:
        return self.users.get(uid) or {"name": None, "id": uid, "email": None}

    def render_value(self, fdef: FieldDef, value: Any) -> Any:
        if value is None:
            return None
        dtype = fdef.data_type
        if dtype == "datetime":
            return self.fmt_time(value) if isinstance(value, (int, float)) else value
        if dtype == "lookup":
            return {"name": self.display_name(fdef.lookup_module or "", value), "id": value}
        if dtype == "ownerlookup":
            return self.user_of(value)
        if dtype == "subform":
            items_defs = self.subforms.get(fdef.subform or "", {})
            rendered = []
            for item in value:
                out: Json = {"id": item["id"]}
                for name, sub in items_defs.items():
                    out[name] = self.render_value(sub, item.get(name))
                rendered.append(out)
            return rendered
        return value

    def render(
        self, store: ModuleStore, record: Json, names: Iterable[str] | None, subforms: bool
    ) -> Json:
        defs = store.mdef.fields
        out: Json = {"id": record["id"]}
        selected = names if names is not None else defs.keys()
        for name in selected:
            if name == "id":
                continue
            fdef = defs.get(name)
            if fdef is None:
                continue
            if fdef.data_type == "subform" and not subforms:
                continue
            out[name] = self.render_value(fdef, self.raw_value(record, name))
        return out

    def write_details(self, record: Json) -> Json:
        return {
            "Modified_Time": self.fmt_time(record["_m"]),
            "Modified_By": {"name": self.user["name"], "id": self.user["id"]},
            "Created_Time": self.fmt_time(record["_c"]),
            "id": record["id"],
            "Created_By": {"name": self.user["name"], "id": self.user["id"]},
        }

    def fields_param(self, store: ModuleStore, raw: str | None, required: bool) -> list[str] | None:
        if raw is None or not raw.strip():
            if required:
                raise RequestError(
                    400,
                    "REQUIRED_PARAM_MISSING",
                    "required param is missing",
                    {"param_name": "fields"},
                )
            return None
        names = list(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
        if len(names) > MAX_FIELDS_PARAM:
            raise RequestError(
                400,
                "LIMIT_EXCEEDED",
                "limit exceeded",
                {"limit": MAX_FIELDS_PARAM, "param_name": "fields"},
            )
        if self.opts.strict_fields_param:
            for name in names:
                if name != "id" and name not in store.mdef.fields:
                    raise RequestError(
                        400,
                        "INVALID_DATA",
                        "the field api name given seems to be invalid",
                        {"api_name": name, "param_name": "fields"},
                    )
        return names

    def resolve_path_id(self, request: web.Request, store: ModuleStore, value: str) -> str | None:
        """A record id from the path, or an external value with ``X-EXTERNAL: Module.Field``."""
        external = request.headers.get("X-EXTERNAL", "")
        for entry in (e.strip() for e in external.split(",") if e.strip()):
            parts = entry.split(".")
            if len(parts) == 2 and parts[0] == store.mdef.api_name:
                fdef = store.mdef.fields.get(parts[1])
                if fdef is None or not fdef.external:
                    raise RequestError(
                        400,
                        "INVALID_DATA",
                        "invalid data",
                        {"header_name": "X-EXTERNAL", "api_name": parts[1]},
                    )
                found = store.find(parts[1], value)
                return found[0] if found else None
        return value if value in store.records else None

    # -- validation ---------------------------------------------------------------------------

    @staticmethod
    def parse_external_header(request: web.Request, module: str) -> dict[tuple[str, ...], str]:
        """``X-EXTERNAL: Contacts.Account_Name.Ext_Id,Invoices.Invoiced_Items.Product_Name.X``."""
        mapping: dict[tuple[str, ...], str] = {}
        for entry in request.headers.get("X-EXTERNAL", "").split(","):
            parts = [p for p in entry.strip().split(".") if p]
            if len(parts) >= 3 and parts[0] == module:
                mapping[tuple(parts[1:-1])] = parts[-1]
        return mapping

    def convert(
        self,
        fdef: FieldDef,
        value: Any,
        path: str,
        external: dict[tuple[str, ...], str],
        chain: tuple[str, ...],
    ) -> Any:
        """Validate one input value and turn it into its stored form. Raises ZohoError."""
        if value is None:
            return None
        dtype = fdef.data_type
        if dtype in TEXT_TYPES or dtype in ("email", "phone"):
            if not isinstance(value, str):
                raise invalid_type(fdef, path)
            if fdef.length is not None and len(value) > fdef.length:
                raise invalid_value(fdef.api_name, path, maximum_length=fdef.length)
            if value == "":
                return None
            if dtype == "email" and not EMAIL_RE.match(value):
                raise invalid_type(fdef, path)
            if dtype == "phone" and not PHONE_RE.match(value.strip()):
                raise invalid_type(fdef, path)
            return value
        if dtype == "picklist":
            if not isinstance(value, str):
                raise invalid_type(fdef, path)
            if value in ("", "-None-"):
                return None
            if (
                self.opts.strict_picklists
                and fdef.pick_list_values
                and value not in fdef.pick_list_values
            ):
                raise invalid_value(
                    fdef.api_name, path, supported_values=["-None-", *fdef.pick_list_values]
                )
            return value
        if dtype == "multiselectpicklist":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise invalid_type(fdef, path, "jsonarray")
            if self.opts.strict_picklists and fdef.pick_list_values:
                for item in value:
                    if item not in fdef.pick_list_values:
                        raise invalid_value(
                            fdef.api_name, path, supported_values=list(fdef.pick_list_values)
                        )
            return list(value)
        if dtype in ("integer", "bigint"):
            if isinstance(value, bool):
                raise invalid_type(fdef, path)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
                value = int(value.strip())
            if not isinstance(value, int):
                raise invalid_type(fdef, path)
            if fdef.length is not None and len(str(abs(value))) > fdef.length:
                raise invalid_value(fdef.api_name, path, maximum_length=fdef.length)
            return value
        if dtype in ("double", "currency"):
            number = to_number(value)
            if number is None:
                raise invalid_type(fdef, path)
            digits = len(str(int(abs(number))))
            if fdef.length is not None and digits > fdef.length:
                raise invalid_value(fdef.api_name, path, maximum_length=fdef.length)
            return round(number, 9) if dtype == "double" else round(number, 2)
        if dtype == "boolean":
            if not isinstance(value, bool):
                raise invalid_type(fdef, path)
            return value
        if dtype == "date":
            if not isinstance(value, str) or not DATE_RE.match(value):
                raise invalid_type(fdef, path)
            try:
                date.fromisoformat(value)
            except ValueError:
                raise invalid_type(fdef, path) from None
            return value
        if dtype == "datetime":
            parsed = parse_datetime(value) if isinstance(value, str) else None
            if parsed is None:
                raise invalid_type(fdef, path)
            return parsed
        if dtype == "ownerlookup":
            uid = value.get("id") if isinstance(value, dict) else None
            if uid is None:
                raise invalid_type(fdef, path, "jsonobject")
            if str(uid) not in self.users:
                raise invalid_value(fdef.api_name, path)
            return str(uid)
        if dtype == "lookup":
            return self._convert_lookup(fdef, value, path, external, chain)
        if dtype == "subform":
            raise invalid_type(fdef, path, "jsonarray")  # handled by convert_subform
        raise invalid_type(fdef, path)

    def _convert_lookup(
        self,
        fdef: FieldDef,
        value: Any,
        path: str,
        external: dict[tuple[str, ...], str],
        chain: tuple[str, ...],
    ) -> str:
        if not isinstance(value, dict):
            raise invalid_type(fdef, path, "jsonobject")
        target = self.stores[fdef.lookup_module or ""]
        ext_field = external.get((*chain, fdef.api_name))
        if ext_field is not None:
            ext_def = target.mdef.fields.get(ext_field)
            if ext_def is None or not ext_def.external:
                raise invalid_value(fdef.api_name, path)
            if ext_field in value:
                found = target.find(ext_field, value[ext_field])
                if not found:
                    raise invalid_value(fdef.api_name, f"{path}.{ext_field}")
                return found[0]
        rid = value.get("id")
        if rid is not None:
            rid = str(rid)
            if rid not in target.records:
                raise invalid_value(fdef.api_name, f"{path}.id")
            return rid
        name = value.get("name")
        if isinstance(name, str) and name:
            display = target.mdef.display_field
            if display in target.index:
                found = target.find(display, name)
            else:
                wanted = name.strip().casefold()
                found = [
                    r["id"]
                    for r in target.records.values()
                    if str(r.get(display, "")).strip().casefold() == wanted
                ]
            if len(found) == 1:
                return found[0]
        raise invalid_value(fdef.api_name, path)

    def convert_subform(
        self,
        fdef: FieldDef,
        value: Any,
        path: str,
        external: dict[tuple[str, ...], str],
        existing: list[Json] | None,
    ) -> list[Json]:
        """Validate a subform array; items keep their ``id`` / ``_delete`` markers."""
        if not isinstance(value, list):
            raise invalid_type(fdef, path, "jsonarray")
        defs = self.subforms.get(fdef.subform or "", {})
        known_ids = {item["id"] for item in existing or []}
        items: list[Json] = []
        for index, item in enumerate(value):
            item_path = f"{path}[{index}]"
            if not isinstance(item, dict):
                raise invalid_type(fdef, item_path, "jsonobject")
            out: Json = {}
            item_id = item.get("id")
            if item_id is not None:
                item_id = str(item_id)
                if item_id not in known_ids:
                    raise invalid_value("id", f"{item_path}.id")
                out["id"] = item_id
                if "_delete" in item:
                    out["_delete"] = True
                    items.append(out)
                    continue
            for key, raw in item.items():
                if key in ("id", "_delete") or key.startswith("$"):
                    continue
                sub = defs.get(key)
                if sub is None:
                    raise ZohoError(
                        "INVALID_DATA",
                        "the field api name given seems to be invalid",
                        {"api_name": key, "json_path": f"{item_path}.{key}"},
                    )
                if sub.read_only:
                    continue
                out[key] = self.convert(sub, raw, f"{item_path}.{key}", external, (fdef.api_name,))
            if item_id is None:
                for sub in defs.values():
                    if sub.system_mandatory and out.get(sub.api_name) is None:
                        raise mandatory_missing(sub.api_name, f"{item_path}.{sub.api_name}")
            items.append(out)
        return items

    def prepare(
        self,
        store: ModuleStore,
        item: Json,
        index: int,
        external: dict[tuple[str, ...], str],
        existing: Json | None,
        allow_read_only: bool = False,
    ) -> dict[str, Any]:
        """Validate the keys given for one record and convert them. Raises ZohoError."""
        defs = store.mdef.fields
        values: dict[str, Any] = {}
        for key, raw in item.items():
            if key == "id" or key.startswith("$"):
                continue
            fdef = defs.get(key)
            path = f"$.data[{index}].{key}"
            if fdef is None:
                raise ZohoError(
                    "INVALID_DATA",
                    "the field api name given seems to be invalid",
                    {"api_name": key, "json_path": path},
                )
            if fdef.read_only and not allow_read_only:
                continue
            if fdef.data_type == "subform":
                if raw is None:
                    values[fdef.api_name] = []
                    continue
                current = existing.get(fdef.api_name) if existing else None
                values[fdef.api_name] = self.convert_subform(fdef, raw, path, external, current)
            elif allow_read_only and fdef.api_name in ("Created_Time", "Modified_Time"):
                converted = self.convert(fdef, raw, path, external, ())
                values["_c" if fdef.api_name == "Created_Time" else "_m"] = converted
            else:
                values[fdef.api_name] = self.convert(fdef, raw, path, external, ())
        for module, field_name, bad in self.reject_rules:
            if (
                module == store.mdef.api_name
                and field_name in item
                and str(item[field_name]) == bad
            ):
                raise invalid_value(field_name, f"$.data[{index}].{field_name}")
        return values

    def check_mandatory(
        self, store: ModuleStore, values: dict[str, Any], index: int, creating: bool
    ) -> None:
        for name in store.mdef.mandatory:
            if (creating or name in values) and values.get(name) is None:
                raise mandatory_missing(name, f"$.data[{index}].{name}")
        line_items = store.mdef.line_items
        if line_items and self.opts.line_items_required:
            if creating and not values.get(line_items):
                raise mandatory_missing(line_items, f"$.data[{index}].{line_items}")
            if not creating and line_items in values and not values[line_items]:
                raise mandatory_missing(line_items, f"$.data[{index}].{line_items}")

    def check_unique(
        self, store: ModuleStore, values: dict[str, Any], index: int, own_id: str | None
    ) -> None:
        errors: list[Json] = []
        for name in store.mdef.unique_fields():
            value = values.get(name)
            if value is None:
                continue
            others = [rid for rid in store.find(name, value) if rid != own_id]
            if others:
                errors.append(
                    ZohoError(
                        "DUPLICATE_DATA",
                        "duplicate data",
                        {
                            "api_name": name,
                            "json_path": f"$.data[{index}].{name}",
                            "duplicate_record": {
                                "id": others[0],
                                "Owner": {
                                    "name": self.user["name"],
                                    "id": self.user["id"],
                                    "zuid": "700000001",
                                },
                                "module": {
                                    "api_name": store.mdef.api_name,
                                    "id": store.mdef.id,
                                },
                            },
                            "id": others[0],
                            "more_records": len(others) > 1,
                        },
                    ).body
                )
        if len(errors) == 1:
            error = ZohoError("DUPLICATE_DATA", "duplicate data")
            error.body = errors[0]
            raise error
        if errors:
            raise ZohoError(
                "MULTIPLE_OR_MULTI_ERRORS", "Multiple errors in the request", {"errors": errors}
            )

    # -- applying changes ---------------------------------------------------------------------

    def derive(self, store: ModuleStore, record: Json) -> None:
        """Read-only values Zoho computes: Full_Name, line-item and order totals."""
        module = store.mdef.api_name
        if module == "Contacts":
            full = " ".join(
                str(v) for v in (record.get("First_Name"), record.get("Last_Name")) if v
            )
            store.replace_values(record, {"Full_Name": full or None})
        line_items = store.mdef.line_items
        if line_items and line_items in record:
            names = line_item_names(self.opts.line_item_casing)
            products = self.stores["Products"].records
            sub_total = 0.0
            for item in record[line_items]:
                quantity = float(item.get(names["quantity"]) or 0)
                price = item.get(names["list_price"])
                if price is None:
                    product = products.get(item.get("Product_Name") or "")
                    price = product.get("Unit_Price") if product else None
                    if price is not None:
                        item[names["list_price"]] = price
                total = round(quantity * float(price or 0), 2)
                net = round(
                    total
                    - float(item.get(names["discount"]) or 0)
                    + float(item.get(names["tax"]) or 0),
                    2,
                )
                item[names["total"]] = total
                item[names["net_total"]] = net
                sub_total += net
            sub_total = round(sub_total, 2)
            grand = round(
                sub_total
                - float(record.get("Discount") or 0)
                + float(record.get("Tax") or 0)
                + float(record.get("Adjustment") or 0),
                2,
            )
            record["Sub_Total"] = sub_total
            record["Grand_Total"] = grand
        if module == "Deals":
            amount = record.get("Amount")
            probability = record.get("Probability")
            if amount is not None and probability is not None:
                record["Expected_Revenue"] = round(float(amount) * float(probability) / 100, 2)

    def subform_items(self, new_items: list[Json]) -> list[Json]:
        out = []
        for item in new_items:
            item = dict(item)
            item.pop("_delete", None)
            item["id"] = item.get("id") or self.ids()
            out.append(item)
        return out

    def create_record(
        self, store: ModuleStore, values: dict[str, Any], rid: str | None = None
    ) -> Json:
        now = self.now()
        self.seq += 1
        modified = values.pop("_m", None)
        created = values.pop("_c", None)
        if created is None:
            created = min(now, modified) if modified is not None else now
        record: Json = {
            "id": rid or self.ids(),
            "_n": self.seq,
            "_c": created,
            "_m": modified if modified is not None else max(now, created),
            "Owner": self.user["id"],
        }
        for name, value in values.items():
            if value is None:
                continue
            fdef = store.mdef.fields[name]
            record[name] = self.subform_items(value) if fdef.data_type == "subform" else value
        self.derive(store, record)
        store.add(record)
        return record

    def update_record(self, store: ModuleStore, record: Json, values: dict[str, Any]) -> list[str]:
        """Apply values; returns the api names that changed (Modified_Time bumps per options)."""
        changes: dict[str, Any] = {}
        for name, value in values.items():
            if name in ("_c", "_m"):
                continue
            fdef = store.mdef.fields[name]
            if fdef.data_type == "subform":
                current = {item["id"]: item for item in record.get(name, [])}
                replace = self.opts.subform_update_mode == "replace"
                merged = {} if replace or not value else dict(current)
                for item in value:
                    item_id = item.get("id")
                    if item_id is None:
                        new_item = dict(item)
                        new_item["id"] = self.ids()
                        merged[new_item["id"]] = new_item
                    elif item.get("_delete"):
                        merged.pop(item_id, None)
                    else:
                        merged[item_id] = {**current[item_id], **item}
                new_list = list(merged.values())
                if new_list != record.get(name, []):
                    changes[name] = new_list
            elif record.get(name) != value:
                changes[name] = value
        if changes:
            store.replace_values(record, changes)
            self.derive(store, record)
        explicit_m = values.get("_m")
        if changes or self.opts.noop_update_bumps_modified_time:
            record["_m"] = explicit_m if explicit_m is not None else max(self.now(), record["_m"])
            store.changed()
        return list(changes)

    def delete_record(self, store: ModuleStore, rid: str) -> bool:
        record = store.remove(rid)
        if record is None:
            return False
        store.deleted.append(
            {
                "id": rid,
                "display_name": record.get(store.mdef.display_field),
                "_t": max(self.now(), record["_m"]),
            }
        )
        self.counters["records_deleted"] += 1
        return True

    def generated_values(self, store: ModuleStore, n: int) -> Json:
        values: Json = {}
        mdef = store.mdef
        for fdef in mdef.fields.values():
            wanted = fdef.system_mandatory or fdef.tracked or fdef.api_name == mdef.dup_field
            if not wanted or fdef.read_only:
                continue
            if fdef.data_type in TEXT_TYPES:
                values[fdef.api_name] = (
                    f"SEED-{n:06d}" if fdef.tracked else f"Seed {mdef.singular} {n}"
                )
            elif fdef.data_type == "email":
                values[fdef.api_name] = f"seed{n}@example.com"
            elif fdef.data_type == "picklist" and fdef.pick_list_values:
                values[fdef.api_name] = fdef.pick_list_values[0]
            elif fdef.data_type == "date":
                values[fdef.api_name] = datetime.fromtimestamp(self.now(), UTC).date().isoformat()
            elif fdef.data_type in NUMBER_TYPES:
                values[fdef.api_name] = n
        return values

    def full(self, store: ModuleStore, record: Json) -> Json:
        return self.render(store, record, None, subforms=True)
