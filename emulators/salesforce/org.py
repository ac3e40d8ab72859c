"""One emulated org: schema, records, sessions, API usage, query cursors, and the write rules.

A write goes through two stages, as in Salesforce: the body is deserialized first (unknown
fields and JSON values of the wrong type fail the whole request), then each record is saved
or fails on its own (required fields, picklists, lengths, references, unique values,
duplicate rules, row locks).
"""

from __future__ import annotations

import math
import random
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from emulators.kit import CallStats, Faults
from emulators.salesforce.auth import Sessions
from emulators.salesforce.describe import TEXT_TYPES, FieldDef, ObjectDef, build_schema
from emulators.salesforce.errors import (
    ApiError,
    RecordError,
    id18,
    json_error,
    make_id,
    normalize_id,
)
from emulators.salesforce.limits import ApiUsage
from emulators.salesforce.options import SalesforceOptions
from emulators.salesforce.records import Store, coerce, render_value
from emulators.salesforce.soql import compile_query, execute, render

Json = dict[str, Any]

ROLLED_BACK = RecordError(
    "ALL_OR_NONE_OPERATION_ROLLED_BACK",
    "Record rolled back because not all records were valid and the request was using "
    "AllOrNone header",
)


@dataclass
class SalesforceFaults(Faults):
    """The common faults, plus Salesforce's own: row locks on a share of the records written."""

    lock_rate: float = 0.0
    """Share of the records of each write that fail with UNABLE_TO_LOCK_ROW."""
    lock_next: int = 0
    """The next N records written fail with UNABLE_TO_LOCK_ROW."""


@dataclass
class Parsed:
    """A deserialized record: field values, and parents named by external id."""

    values: dict[str, Any]
    parents: list[tuple[FieldDef, Json | None]] = field(default_factory=list)


class MultipleMatches(Exception):
    def __init__(self, ids: list[str]) -> None:
        super().__init__(f"{len(ids)} records match")
        self.ids = ids


@dataclass
class Cursor:
    locator: str
    rows: list[Json]
    batch: int
    version: str
    created: float


Journal = list[tuple[Store, str, Json | None]]


class Org:
    """State and write rules of the emulated org."""

    def __init__(self, opts: SalesforceOptions) -> None:
        self.opts = opts
        self.faults = SalesforceFaults()
        self.call_stats = CallStats()
        self._skew = 0.0
        self.sessions = Sessions(opts, self.now)
        self.usage = ApiUsage(opts, self.now)
        self.rng = random.Random()
        self.user_id = id18(opts.user_id)
        self._reset_state()

    # -- state ------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self.schema: dict[str, ObjectDef] = build_schema(self.opts)
        self.stores: dict[str, Store] = {
            name: Store(obj, self.opts.external_id_case_sensitive)
            for name, obj in self.schema.items()
        }
        self.cursors: OrderedDict[str, Cursor] = OrderedDict()
        self.cursor_seq = 0
        self.counters: Counter[str] = Counter()
        self.write_calls: Counter[str] = Counter()
        self.record_errors: Counter[str] = Counter()
        self.duplicate_rules: list[Json] = [dict(r) for r in self.opts.duplicate_rules]
        self.usage.reset()
        self._skew = 0.0
        now = float(math.floor(self.now()))
        self.stores["user"].put(
            {
                "Id": self.user_id,
                "Username": "integration.user@emulator.example",
                "Name": self.opts.user_name,
                "Email": "integration.user@emulator.example",
                "IsActive": True,
                "CreatedDate": now,
                "LastModifiedDate": now,
                "SystemModstamp": now,
            }
        )

    @property
    def data_stores(self) -> list[Store]:
        """The stores of the objects integrations write (not User)."""
        return [s for s in self.stores.values() if s.obj.writable]

    def reset(self) -> None:
        """Forget records, schema changes, cursors, usage and counters. Sessions stay valid."""
        self._reset_state()

    def now(self) -> float:
        return self.opts.clock() + self._skew

    def today(self) -> date:
        return datetime.fromtimestamp(self.now(), UTC).date()

    def advance(self, seconds: float) -> None:
        self._skew += seconds

    def store(self, name: str) -> Store | None:
        return self.stores.get(name.lower())

    def duplicates(self) -> dict[str, dict[str, int]]:
        return {store.obj.name: store.duplicates() for store in self.data_stores}

    def duplicate_total(self) -> int:
        return sum(sum(by_field.values()) for by_field in self.duplicates().values())

    def extra_stats(self) -> Json:
        return {
            "records": {s.obj.name: len(s.records) for s in self.data_stores},
            "duplicates": self.duplicates(),
            "duplicate_total": self.duplicate_total(),
            "write_calls": dict(self.write_calls),
            "write_calls_total": sum(self.write_calls.values()),
            "records_created": self.counters["records_created"],
            "records_updated": self.counters["records_updated"],
            "record_errors": dict(self.record_errors),
            "lock_failures": self.counters["lock_failures"],
            "api_usage": self.usage.as_dict(),
            "tokens_issued": self.sessions.issued,
            "token_errors": self.sessions.token_errors,
            "auth_failures": self.sessions.auth_failures,
            "queries": self.counters["queries"],
            "open_cursors": len(self.cursors),
        }

    # -- deserializing ------------------------------------------------------------------------

    def parse_record(self, obj: ObjectDef, body: Any) -> Parsed:
        """Request-level checks of one record's JSON; ApiError fails the whole call."""
        if not isinstance(body, dict):
            raise json_error(
                f"Cannot deserialize instance of {obj.name} from {type(body).__name__} value"
            )
        parsed = Parsed({})
        for key, value in body.items():
            if key == "attributes":
                continue
            fdef = obj.field(key)
            if fdef is not None:
                parsed.values[fdef.name] = coerce(fdef, value)
                continue
            ref = obj.relationship(key)
            if ref is not None and (value is None or isinstance(value, dict)):
                if isinstance(value, dict):
                    self._check_parent_fields(ref, value)
                parsed.parents.append((ref, value))
                continue
            raise ApiError(
                400, "INVALID_FIELD", f"No such column '{key}' on sobject of type {obj.name}"
            )
        return parsed

    def _parent_object(self, ref: FieldDef) -> ObjectDef | None:
        for name in ref.reference_to:
            obj = self.schema.get(name.lower())
            if obj is not None:
                return obj
        return None

    def _check_parent_fields(self, ref: FieldDef, spec: Json) -> None:
        target = self._parent_object(ref)
        if target is None:
            raise ApiError(
                400,
                "INVALID_FIELD",
                f"Cannot reference {ref.reference_to[0]} by external id through {ref.name}",
            )
        for key in spec:
            if key != "attributes" and target.field(key) is None:
                raise ApiError(
                    400,
                    "INVALID_FIELD",
                    f"No such column '{key}' on sobject of type {target.name}",
                )

    # -- per-record rules ---------------------------------------------------------------------

    def resolve_parent(self, ref: FieldDef, spec: Json) -> str:
        target = self._parent_object(ref)
        assert target is not None
        keys = [k for k in spec if k != "attributes"]
        if len(keys) != 1:
            raise RecordError(
                "INVALID_FIELD",
                "More than 1 field provided in an external foreign key reference in entity: "
                f"{target.name}"
                if keys
                else f"No external ID field provided in a foreign key reference in entity: "
                f"{target.name}",
            )
        fdef = target.field(keys[0])
        assert fdef is not None
        if not (fdef.external_id or fdef.type == "id" or fdef.id_lookup):
            raise RecordError(
                "INVALID_FIELD",
                f"{fdef.name} is not an External ID or indexed field for {target.name}",
            )
        try:
            value = coerce(fdef, spec[keys[0]])
        except ApiError as exc:
            raise RecordError("INVALID_FIELD", exc.message) from None
        if fdef.type == "id" and isinstance(value, str):
            value = normalize_id(value) or value
        store = self.stores[target.name.lower()]
        matches = store.find(fdef, value) if value is not None else []
        shown = "null" if value is None else value
        if not matches:
            raise RecordError(
                "INVALID_FIELD",
                f"Foreign key external ID: {shown} not found for field {fdef.name} in entity "
                f"{target.name}",
            )
        if len(matches) > 1:
            raise RecordError(
                "DUPLICATE_EXTERNAL_ID",
                f"Foreign key external ID: {shown} matched more than one record for field "
                f"{fdef.name} in entity {target.name}",
            )
        return matches[0]

    def check_reference(self, fdef: FieldDef, value: str) -> str:
        rid = normalize_id(value)
        if rid is None:
            raise RecordError(
                "MALFORMED_ID", f"{fdef.label}: id value of incorrect type: {value}", [fdef.name]
            )
        for name in fdef.reference_to:
            obj = self.schema.get(name.lower())
            if obj is not None and rid.startswith(obj.key_prefix):
                if rid not in self.stores[name.lower()].records:
                    raise RecordError(
                        "INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", [fdef.name]
                    )
                return rid
        raise RecordError(
            "FIELD_INTEGRITY_EXCEPTION",
            f"{fdef.label}: id value of incorrect type: {value}",
            [fdef.name],
        )

    def validate(self, obj: ObjectDef, record: Json, values: Json, creating: bool) -> None:
        missing = [
            f.name
            for f in obj.fields.values()
            if f.required_on_create
            and (creating or f.name in values)
            and record.get(f.name) is None
        ]
        if missing:
            raise RecordError(
                "REQUIRED_FIELD_MISSING",
                f"Required fields are missing: [{', '.join(missing)}]",
                missing,
            )
        for name in values:
            fdef = obj.fields[name.lower()]
            value = record.get(fdef.name)
            if value is None:
                continue
            if fdef.type in TEXT_TYPES and fdef.length and len(value) > fdef.length:
                raise RecordError(
                    "STRING_TOO_LONG",
                    f"{fdef.label}: data value too large: {value} (max length={fdef.length})",
                    [fdef.name],
                )
            if fdef.type == "picklist" and fdef.restricted and value not in fdef.picklist:
                raise RecordError(
                    "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                    f"{fdef.label}: bad value for restricted picklist field: {value}",
                    [fdef.name],
                )

    def check_unique(self, store: Store, record: Json, rid: str | None) -> None:
        for fdef in store.obj.unique_fields:
            value = record.get(fdef.name)
            if value is None:
                continue
            others = [i for i in store.find(fdef, value) if i != rid]
            if others:
                raise RecordError(
                    "DUPLICATE_VALUE",
                    f"duplicate value found: {fdef.name} duplicates value on record with id: "
                    f"{others[0]}",
                )

    def check_duplicate_rules(
        self, store: Store, record: Json, rid: str | None, allow_save: bool, version: str
    ) -> None:
        obj = store.obj
        for rule in self.duplicate_rules:
            if str(rule.get("object", "")).lower() != obj.name.lower():
                continue
            fdefs = [obj.field(n) for n in rule.get("fields", [])]
            if not fdefs or any(f is None for f in fdefs):
                continue
            keys = [(f, store.key(f, record.get(f.name))) for f in fdefs if f is not None]
            if any(record.get(f.name) is None for f, _ in keys):
                continue
            matches = [
                other["Id"]
                for other in store
                if other["Id"] != rid
                and all(
                    other.get(f.name) is not None and store.key(f, other[f.name]) == key
                    for f, key in keys
                )
            ]
            if not matches:
                continue
            action = rule.get("action", "block")
            if action == "alert" and allow_save:
                continue
            message = rule.get("message") or "Use one of these records?"
            name = rule.get("name") or f"Emulator_{obj.name}_Duplicate_Rule"
            raise RecordError(
                "DUPLICATES_DETECTED",
                message,
                duplicateResult={
                    "allowSave": action == "alert",
                    "duplicateRule": name,
                    "duplicateRuleEntityType": obj.name,
                    "errorMessage": message,
                    "matchResults": [
                        {
                            "entityType": obj.name,
                            "errors": [],
                            "matchEngine": "ExactMatchEngine",
                            "matchRecords": [
                                {
                                    "additionalInformation": [],
                                    "fieldDiffs": [],
                                    "matchConfidence": 100.0,
                                    "record": {
                                        "attributes": {
                                            "type": obj.name,
                                            "url": f"/services/data/v{version}/sobjects/"
                                            f"{obj.name}/{match}",
                                        },
                                        "Id": match,
                                    },
                                }
                                for match in matches[:10]
                            ],
                            "rule": f"{name}_Match_Rule",
                            "size": len(matches),
                            "success": True,
                        }
                    ],
                },
            )

    def check_lock(self, rid: str | None) -> None:
        faults = self.faults
        locked = False
        if faults.lock_next > 0:
            faults.lock_next -= 1
            locked = True
        elif faults.lock_rate and self.rng.random() < faults.lock_rate:
            locked = True
        if locked:
            self.counters["lock_failures"] += 1
            suffix = f" or 1 records: {rid}" if rid else ""
            raise RecordError(
                "UNABLE_TO_LOCK_ROW", f"unable to obtain exclusive access to this record{suffix}"
            )

    # -- saving -------------------------------------------------------------------------------

    def save(
        self,
        store: Store,
        parsed: Parsed,
        existing: Json | None,
        *,
        version: str,
        allow_save: bool = False,
        seed: bool = False,
        check_unique: bool = True,
        journal: Journal | None = None,
    ) -> Json:
        """Validate and store one record; RecordError when it fails (nothing written)."""
        obj = store.obj
        creating = existing is None
        values = dict(parsed.values)
        if not seed:
            bad = [
                name
                for name in values
                if not (
                    obj.fields[name.lower()].createable
                    if creating
                    else obj.fields[name.lower()].updateable
                )
            ]
            if bad:
                raise RecordError(
                    "INVALID_FIELD_FOR_INSERT_UPDATE",
                    f"Unable to create/update fields: {', '.join(bad)}. Please check the security "
                    "settings of this field and verify that it is read/write for your profile or "
                    "permission set.",
                    bad,
                )
        for name, value in list(values.items()):
            fdef = obj.fields[name.lower()]
            if fdef.type == "reference" and value is not None:
                values[name] = self.check_reference(fdef, value)
        for ref, spec in parsed.parents:
            values[ref.name] = None if spec is None else self.resolve_parent(ref, spec)
        record = dict(existing) if existing is not None else {}
        record.update(values)
        self.validate(obj, record, values, creating)
        rid = existing["Id"] if existing is not None else None
        if check_unique:
            self.check_unique(store, record, rid)
        if not seed:
            self.check_duplicate_rules(store, record, rid, allow_save, version)
            self.check_lock(rid)
        now = float(math.floor(self.now()))
        if creating:
            store.next_number += 1
            record["Id"] = make_id(obj.key_prefix, 1_000_000 + store.next_number)
            for fdef in obj.fields.values():
                if fdef.type == "boolean" and record.get(fdef.name) is None:
                    record[fdef.name] = False
            record.setdefault("CreatedDate", now)
            record["CreatedById"] = self.user_id
            if record.get("OwnerId") is None:
                record["OwnerId"] = self.user_id
        if not (seed and "LastModifiedDate" in values):
            record["LastModifiedDate"] = now if not creating else record["CreatedDate"]
        if not (seed and "SystemModstamp" in values):
            record["SystemModstamp"] = now if not creating else record["LastModifiedDate"]
        record["LastModifiedById"] = self.user_id
        self._derive(obj, record, values, creating)
        store.put(record)
        if journal is not None:
            journal.append((store, record["Id"], existing))
        return record

    def _derive(self, obj: ObjectDef, record: Json, values: Json, creating: bool) -> None:
        if obj.name != "Opportunity" or not (creating or "StageName" in values):
            return
        stage = next((s for s in self.opts.stages if s["value"] == record.get("StageName")), {})
        closed, won = bool(stage.get("closed")), bool(stage.get("won"))
        record["IsClosed"], record["IsWon"] = closed, won
        if "Probability" not in values and "probability" in stage:
            record["Probability"] = float(stage["probability"])
        if "ForecastCategoryName" not in values:
            record["ForecastCategoryName"] = stage.get("forecast") or (
                "Closed" if won else "Omitted" if closed else "Pipeline"
            )

    def rollback(self, journal: Journal) -> None:
        for store, rid, previous in reversed(journal):
            if previous is None:
                store.remove(rid)
            else:
                store.put(previous)
        journal.clear()

    def upsert(
        self,
        store: Store,
        ext: FieldDef,
        value: Any,
        parsed: Parsed,
        *,
        version: str,
        update_only: bool = False,
        allow_save: bool = False,
        journal: Journal | None = None,
    ) -> tuple[Json | None, bool]:
        """(record, created); (None, False) when update_only found nothing."""
        if ext.type == "id":
            rid = normalize_id(value) if isinstance(value, str) else None
            matches = [rid] if rid in store.records else []
        else:
            matches = store.find(ext, value)
        if len(matches) > 1:
            raise MultipleMatches(matches)
        existing = store.records[matches[0]] if matches else None
        if existing is None:
            if update_only or ext.type == "id":
                return None, False
            parsed = Parsed({**parsed.values, ext.name: value}, parsed.parents)
        record = self.save(
            store, parsed, existing, version=version, allow_save=allow_save, journal=journal
        )
        return record, existing is None

    def count_result(self, created: bool) -> None:
        self.counters["records_created" if created else "records_updated"] += 1

    def count_error(self, error: RecordError | ApiError) -> None:
        self.record_errors[error.code] += 1

    def collection_upsert(
        self, store: Store, ext: FieldDef, body: Any, *, version: str, allow_save: bool
    ) -> list[Json]:
        """sObject Collections upsert: per-record results in input order."""
        obj = store.obj
        if not isinstance(body, dict) or not isinstance(body.get("records"), list):
            raise json_error("The request body needs a 'records' list of sObjects")
        all_or_none = body.get("allOrNone", False)
        if not isinstance(all_or_none, bool):
            raise json_error(
                f"Cannot deserialize instance of boolean from value {all_or_none} for allOrNone"
            )
        records: list[Any] = body["records"]
        if len(records) > self.opts.collection_max_records:
            raise ApiError(
                400,
                "EXCEEDED_ID_LIMIT",
                self.opts.collection_limit_message.format(max=self.opts.collection_max_records),
            )
        parsed_all: list[Parsed] = []
        for item in records:
            kind = item.get("attributes", {}).get("type") if isinstance(item, dict) else None
            if not isinstance(kind, str) or not kind:
                raise ApiError(400, "INVALID_TYPE", "Must send a concrete entity type.")
            if kind.lower() != obj.name.lower():
                raise ApiError(
                    400,
                    "INVALID_TYPE",
                    f"The type {kind} of a record does not match the type {obj.name} of the "
                    "request URI.",
                )
            parsed_all.append(self.parse_record(obj, item))
        failures: dict[int, RecordError] = {}
        groups: dict[Any, list[int]] = {}
        for index, parsed in enumerate(parsed_all):
            if "Id" in parsed.values:
                failures[index] = RecordError(
                    "INVALID_FIELD",
                    "Id is not allowed in an upsert on an external ID field; send "
                    f"{ext.name} instead",
                    ["Id"],
                )
                continue
            value = parsed.values.get(ext.name)
            if value is None:
                failures[index] = RecordError("MISSING_ARGUMENT", f"{ext.name} not specified")
                continue
            groups.setdefault(store.key(ext, value), []).append(index)
        for indexes in groups.values():
            if len(indexes) > 1:
                for index in indexes:
                    value = parsed_all[index].values[ext.name]
                    failures[index] = RecordError(
                        "DUPLICATE_VALUE", f"Duplicate external id specified: {value}"
                    )
        journal: Journal = []
        outcomes: list[tuple[Json, bool] | RecordError] = []
        for index, parsed in enumerate(parsed_all):
            failure = failures.get(index)
            if failure is None:
                value = parsed.values.pop(ext.name)
                try:
                    record, created = self.upsert(
                        store,
                        ext,
                        value,
                        parsed,
                        version=version,
                        allow_save=allow_save,
                        journal=journal,
                    )
                    assert record is not None
                    outcomes.append((record, created))
                    continue
                except MultipleMatches:
                    failure = RecordError(
                        "DUPLICATE_EXTERNAL_ID",
                        f"Duplicate external id specified: {value}",
                        [ext.name],
                    )
                except RecordError as exc:
                    failure = exc
            outcomes.append(failure)
        failed = any(isinstance(o, RecordError) for o in outcomes)
        if all_or_none and failed:
            self.rollback(journal)
        results: list[Json] = []
        for outcome in outcomes:
            if isinstance(outcome, RecordError):
                self.count_error(outcome)
                results.append({"success": False, "errors": [outcome.item()]})
            elif all_or_none and failed:
                results.append({"success": False, "errors": [ROLLED_BACK.item()]})
            else:
                record, created = outcome
                self.count_result(created)
                results.append(
                    {"id": record["Id"], "success": True, "errors": [], "created": created}
                )
        return results

    # -- reading ------------------------------------------------------------------------------

    def render_record(
        self, obj: ObjectDef, record: Json, version: str, fields: list[FieldDef] | None = None
    ) -> Json:
        out: Json = {
            "attributes": {
                "type": obj.name,
                "url": f"/services/data/v{version}/sobjects/{obj.name}/{record['Id']}",
            }
        }
        for fdef in fields if fields is not None else obj.fields.values():
            out[fdef.name] = render_value(fdef, record.get(fdef.name))
        return out

    def query(self, text: str, version: str, batch: int) -> Json:
        self.counters["queries"] += 1
        plan = compile_query(text, self.schema, self.stores, self.today())
        matched = execute(plan, self.stores)
        if plan.ast.count:
            return {"totalSize": len(matched), "done": True, "records": []}
        rows = [render(plan, r, self.stores, version) for r in matched]
        return self._page(rows, 0, batch, version, None)

    def query_more(self, locator_part: str, version: str) -> Json:
        locator, _, start_text = locator_part.rpartition("-")
        self._purge_cursors()
        cursor = self.cursors.get(locator)
        if cursor is None or not start_text.isdigit() or int(start_text) > len(cursor.rows):
            raise ApiError(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        return self._page(cursor.rows, int(start_text), cursor.batch, version, cursor)

    def _purge_cursors(self) -> None:
        cutoff = self.now() - self.opts.cursor_ttl_s
        for locator in [k for k, c in self.cursors.items() if c.created <= cutoff]:
            del self.cursors[locator]

    def _page(
        self, rows: list[Json], start: int, batch: int, version: str, cursor: Cursor | None
    ) -> Json:
        end = start + batch
        body: Json = {"totalSize": len(rows), "done": end >= len(rows)}
        if end < len(rows):
            if cursor is None:
                self.cursor_seq += 1
                cursor = Cursor(make_id("01g", self.cursor_seq), rows, batch, version, self.now())
                self.cursors[cursor.locator] = cursor
                while len(self.cursors) > self.opts.max_open_cursors:
                    self.cursors.popitem(last=False)
            body["nextRecordsUrl"] = f"/services/data/v{version}/query/{cursor.locator}-{end}"
        body["records"] = rows[start:end]
        return body
