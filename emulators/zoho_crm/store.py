"""Records of one module, indexed by id and by every unique or duplicate-check value."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from emulators.zoho_crm.schema import ModuleDef

Json = dict[str, Any]


def sort_n(record: Json) -> int:
    return int(record["_n"])


class ModuleStore:
    """Records of one module, indexed by id and by every tracked (unique/duplicate) value."""

    def __init__(self, mdef: ModuleDef, case_insensitive: bool) -> None:
        self.mdef = mdef
        self.case_insensitive = case_insensitive
        self.records: dict[str, Json] = {}
        self.index: dict[str, dict[Any, str | set[str]]] = {}
        self.multi: dict[str, dict[Any, set[str]]] = {}
        self.deleted: list[Json] = []
        self.version = 0
        self.cache: OrderedDict[tuple[Any, ...], list[str]] = OrderedDict()
        self.rebuild_indexes()

    def key(self, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            return value.casefold() if self.case_insensitive else value
        if isinstance(value, list):
            return json.dumps(value, sort_keys=True, default=str)
        return value

    def rebuild_indexes(self) -> None:
        self.index = {name: {} for name in self.mdef.tracked_fields()}
        self.multi = {name: {} for name in self.index}
        for record in self.records.values():
            self._index_record(record)

    def _index_record(self, record: Json) -> None:
        for name in self.index:
            value = record.get(name)
            if value is not None and value != "":
                self._index_add(name, self.key(value), record["id"])

    def _unindex_record(self, record: Json) -> None:
        for name in self.index:
            value = record.get(name)
            if value is not None and value != "":
                self._index_remove(name, self.key(value), record["id"])

    def _index_add(self, name: str, key: Any, rid: str) -> None:
        index = self.index[name]
        current = index.get(key)
        if current is None:
            index[key] = rid
        elif isinstance(current, str):
            if current != rid:
                group = {current, rid}
                index[key] = group
                self.multi[name][key] = group
        else:
            current.add(rid)

    def _index_remove(self, name: str, key: Any, rid: str) -> None:
        index = self.index[name]
        current = index.get(key)
        if current is None:
            return
        if isinstance(current, str):
            if current == rid:
                del index[key]
            return
        current.discard(rid)
        if len(current) <= 1:
            self.multi[name].pop(key, None)
            if current:
                index[key] = next(iter(current))
            else:
                del index[key]

    def find(self, name: str, value: Any) -> list[str]:
        """Ids holding ``value`` in tracked field ``name``, oldest first."""
        index = self.index.get(name)
        if index is None or value is None or value == "":
            return []
        current = index.get(self.key(value))
        if current is None:
            return []
        if isinstance(current, str):
            return [current]
        return sorted(current, key=lambda rid: sort_n(self.records[rid]))

    def add(self, record: Json) -> None:
        self.records[record["id"]] = record
        self._index_record(record)
        self.changed()

    def replace_values(self, record: Json, changes: dict[str, Any]) -> None:
        tracked = [name for name in changes if name in self.index]
        for name in tracked:
            old = record.get(name)
            if old is not None and old != "":
                self._index_remove(name, self.key(old), record["id"])
        for name, value in changes.items():
            if value is None:
                record.pop(name, None)
            else:
                record[name] = value
        for name in tracked:
            new = record.get(name)
            if new is not None and new != "":
                self._index_add(name, self.key(new), record["id"])

    def remove(self, rid: str) -> Json | None:
        record = self.records.pop(rid, None)
        if record is not None:
            self._unindex_record(record)
            self.changed()
        return record

    def changed(self) -> None:
        self.version += 1
        self.cache.clear()

    def duplicates(self) -> int:
        """Records sharing a tracked value with an earlier record."""
        dup_ids: set[str] = set()
        for groups in self.multi.values():
            for ids in groups.values():
                ordered = sorted(ids, key=lambda rid: sort_n(self.records[rid]))
                dup_ids.update(ordered[1:])
        return len(dup_ids)

    def duplicates_by_field(self) -> dict[str, int]:
        """Per tracked field: records sharing its value with an earlier record. A shared system
        duplicate field (two customers named alike) is normal; a shared unique match field is
        a duplicate the integration created."""
        out: dict[str, int] = {}
        for name, groups in self.multi.items():
            out[str(name)] = sum(len(ids) - 1 for ids in groups.values() if len(ids) > 1)
        return out

    def query(
        self,
        sort_by: str,
        sort_order: str,
        since: float | None,
        ids: tuple[str, ...] | None,
    ) -> list[str]:
        cache_key = (sort_by, sort_order, since, ids)
        cached = self.cache.get(cache_key)
        if cached is not None:
            self.cache.move_to_end(cache_key)
            return cached
        if ids is not None:
            records = [self.records[rid] for rid in dict.fromkeys(ids) if rid in self.records]
        else:
            records = list(self.records.values())
        if since is not None:
            records = [r for r in records if r["_m"] > since]
        if sort_by == "Modified_Time":
            records.sort(key=lambda r: (r["_m"], r["_n"]))
        elif sort_by == "Created_Time":
            records.sort(key=lambda r: (r["_c"], r["_n"]))
        else:
            records.sort(key=sort_n)
        if sort_order == "desc":
            records.reverse()
        result = [r["id"] for r in records]
        self.cache[cache_key] = result
        while len(self.cache) > 8:
            self.cache.popitem(last=False)
        return result


@dataclass
class Change:
    module: str
    operation: str
    rid: str
    fields: list[str]
