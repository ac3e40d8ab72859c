"""Flow files: what moves from a source connection to a target connection, and how.

A flow file (YAML) is validated by pydantic; every error names the file, the flow and the field.
One flow has one or more entity mappings (``customers``: ArCustomer -> Accounts, ...) that are
polled in file order, so parents come before their children.
"""

from __future__ import annotations

import re
import string
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.connectors.base import StreamSpec
from shared.messages import canonical_hash

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> float:
    """Seconds from ``90``, ``"30s"``, ``"10m"``, ``"2h"``, ``"45d"``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 10m, 2h, 45d)")


Duration = Annotated[float, BeforeValidator(parse_duration)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChangeDetection(Strict):
    """``field``: read rows whose field >= cursor - overlap; none: snapshot by content hash."""

    mode: Literal["column", "snapshot"] = "snapshot"
    field: str | None = None
    overlap: Duration = 0.0
    # Column mode only: also read everything this often and compare content hashes, to catch
    # changes that do not move the column (a payment on an old invoice). 0: never.
    full_every: Duration = 0.0
    field_type: Literal["datetime", "date", "string", "number"] = "datetime"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value == "snapshot":
            return {"mode": "snapshot"}
        if isinstance(value, dict) and "field" in value and "mode" not in value:
            return {**value, "mode": "column"}
        return value

    @model_validator(mode="after")
    def _field_for_column(self) -> ChangeDetection:
        if self.mode == "column" and not self.field:
            raise ValueError("column change detection needs 'field'")
        return self


class SourceSpec(Strict):
    entity: str
    key: list[str] = Field(min_length=1)
    change_detection: ChangeDetection = ChangeDetection()
    select: list[str] | None = None


class TargetSpec(Strict):
    entity: str
    match_on: list[str] = Field(min_length=1)


class MatchSpec(Strict):
    field: str
    value: str  # template over the child's source record


class FieldSpec(Strict):
    """One target field. Exactly one of from / template / value / compute / parent."""

    from_: str | None = Field(None, alias="from")
    template: str | None = None
    value: Any = None
    compute: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    parent: str | None = None
    key: str | None = None
    match: MatchSpec | None = None
    lookup: str | None = None
    type: (
        Literal["string", "decimal", "integer", "date", "datetime", "boolean", "currency"] | None
    ) = None
    places: int = 2
    default: Any = None
    required: bool = False
    max_length: int | None = None
    # Sent when the target record is created, never on updates (line items: Zoho appends
    # line items without ids, so resending them would duplicate the lines).
    insert_only: bool = False

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"from": value}
        return value

    @model_validator(mode="after")
    def _one_source(self) -> FieldSpec:
        given = [
            name
            for name, v in (
                ("from", self.from_),
                ("template", self.template),
                ("value", self.value),
                ("compute", self.compute),
                ("parent", self.parent),
            )
            if v is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of from, template, value, compute, parent"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.parent is not None and not self.key:
            raise ValueError("a parent reference needs 'key' (a template of the parent's key)")
        # Arguments of a computed value are field specs themselves (a column name, or a spec):
        # parsed once here, not per record.
        for name, arg in list(self.args.items()):
            if isinstance(arg, dict | str):
                self.args[name] = FieldSpec.model_validate(arg)
        return self


class EntityMapping(Strict):
    name: str
    source: SourceSpec
    target: TargetSpec
    fields: dict[str, FieldSpec]

    @cached_property
    def compiled(self) -> dict[Any, Any]:
        """Compiled mappings of this entity (``shared.mapping``), by the flow they were built
        for. A plain instance attribute once built: it is read once per record."""
        return {}

    @cached_property
    def source_columns(self) -> tuple[str, ...]:
        """The source columns this mapping reads: the key, the change field, ``select``, and
        every column a field, template, computed argument or parent reference names."""
        names: dict[str, None] = dict.fromkeys(self.source.key)
        if self.source.change_detection.field:
            names[self.source.change_detection.field] = None
        names.update(dict.fromkeys(self.source.select or ()))

        def of_template(template: str | None) -> None:
            for _, column, _, _ in string.Formatter().parse(template or ""):
                if column:
                    names[column] = None

        def of_spec(spec: FieldSpec) -> None:
            if spec.from_:
                names[spec.from_] = None
            of_template(spec.template)
            of_template(spec.key if spec.parent else None)
            of_template(spec.match.value if spec.match else None)
            for arg in spec.args.values():
                if isinstance(arg, FieldSpec):
                    of_spec(arg)

        for spec in self.fields.values():
            of_spec(spec)
        # Sorted: the projection, and so the content hash, must not depend on the order of
        # the fields, which a flow stored as jsonb does not keep.
        return tuple(sorted(names))

    def project(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record as the pipeline carries it: only the columns this mapping reads, in
        sorted order, so that a change to a column nobody maps is no change, and the content
        hash depends neither on the order the source sent the columns in nor on the order of
        the flow's fields. A column the source did not send stays absent; mapping it then
        fails with its name."""
        return {name: record[name] for name in self.source_columns if name in record}

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", value):
            raise ValueError("use lower case letters, digits and _")
        return value

    def stream(self, page_size: int | None = None) -> StreamSpec:
        cd = self.source.change_detection
        return StreamSpec(
            entity=self.source.entity,
            key_fields=tuple(self.source.key),
            change_field=cd.field if cd.mode == "column" else None,
            select=tuple(self.source.select) if self.source.select else None,
            page_size=page_size,
        )


class Flow(Strict):
    name: str
    description: str = ""
    source: str = Field(description="source connection name")
    target: str = Field(description="target connection name")
    poll_interval: Duration = 600.0
    enabled: bool = True
    lookups: dict[str, dict[str, Any]] = Field(default_factory=dict)
    entities: list[EntityMapping] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _flow_name(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", value):
            raise ValueError("use lower case letters, digits, - and _")
        return value

    @field_validator("poll_interval")
    @classmethod
    def _interval(cls, value: float) -> float:
        if value < 1:
            raise ValueError("poll_interval must be at least 1s")
        return value

    @model_validator(mode="after")
    def _references(self) -> Flow:
        names = [e.name for e in self.entities]
        if len(set(names)) != len(names):
            raise ValueError("entity names must be unique")
        seen: set[str] = set()
        for i, entity in enumerate(self.entities):
            for field_name, spec in entity.fields.items():
                where = f"entities[{i}] ({entity.name}).fields.{field_name}"
                if spec.lookup and spec.lookup not in self.lookups:
                    raise ValueError(f"{where}: unknown lookup table {spec.lookup!r}")
                if spec.parent is not None and spec.parent not in seen:
                    raise ValueError(
                        f"{where}: parent {spec.parent!r} must be an entity listed before"
                        f" {entity.name!r}"
                    )
                if spec.compute is not None:
                    from shared.mapping import COMPUTED

                    if spec.compute not in COMPUTED:
                        known = ", ".join(sorted(COMPUTED))
                        raise ValueError(f"{where}: unknown compute {spec.compute!r} ({known})")
            seen.add(entity.name)
        return self

    def entity(self, name: str) -> EntityMapping:
        for entity in self.entities:
            if entity.name == name:
                return entity
        raise KeyError(name)

    def entity_for_source(self, source_entity: str) -> EntityMapping:
        for entity in self.entities:
            if entity.source.entity == source_entity:
                return entity
        raise KeyError(source_entity)

    def definition(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def definition_hash(self) -> str:
        return canonical_hash(self.definition())


class FlowFileError(ValueError):
    """A flow file that cannot be used; the message names file, flow and field."""


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def parse_flow(data: Any, *, origin: str = "<flow>") -> Flow:
    if not isinstance(data, dict):
        raise FlowFileError(f"{origin}: a flow file must be a mapping at the top level")
    flow_name = data.get("name", "?")
    try:
        return Flow.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{origin}: flow {flow_name!r}: {_loc(err['loc'])}: {err['msg']}"
            for err in exc.errors()
        ]
        raise FlowFileError("\n".join(problems)) from None


def load_flow_file(path: str | Path) -> Flow:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise FlowFileError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise FlowFileError(f"{path}:{where}: not valid YAML: {exc}") from None
    return parse_flow(data, origin=str(path))
