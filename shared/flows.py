"""Flow files: what moves from a source connection to a target connection, and how.

A flow file (YAML) is validated by pydantic; every error names the file, the flow and the field.
One flow has one or more entity mappings (``customers``: ArCustomer -> Accounts, ...) that are
polled in file order, so parents come before their children.

Everything that would fail at run time is refused here, at ``flows apply``: a template names
columns only (no attribute, index, conversion or format spec), names are API identifiers,
durations and numbers are finite and bounded, and the YAML itself is small, flat enough, free of
duplicate keys and of aliases (so no expansion bomb).
"""

from __future__ import annotations

import inspect
import math
import re
import string
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
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
DAY = 86400.0

# A column (source) or field (target) name: what SYSPRO, Acumatica, Infor, Sage 300, Zoho and
# Salesforce call their columns and fields (``SoldToAddr1``, ``ERP_Customer_No``,
# ``ERP_Id__c``, Infor's ``_ItemId``). Nothing else can be named: no path, no expression.
COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
# An entity (table, entity set, module, sObject): ``ArCustomer``, ``Sales_Orders``,
# ``ERP_Invoice__c``.
ENTITY = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,99}")
MAX_DAYS = 36_500  # |days| of add_days: a hundred years
MAX_LENGTH = 1_000_000  # max_length of a field
MAX_PLACES = 12  # decimal places of a decimal field
MAX_FILE_BYTES = 1_000_000  # a flow file
MAX_YAML_DEPTH = 40  # nesting of mappings and sequences in a flow file (the shipped ones: 10)
MAX_ERRORS = 20  # problems listed per file


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def parse_duration(value: Any, *, maximum: float | None = None) -> float:
    """Seconds from ``90``, ``"30s"``, ``"10m"``, ``"2h"``, ``"45d"``: finite, not negative, and
    at most ``maximum`` seconds when given."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds is None or math.isnan(seconds):
        raise ValueError(f"not a duration: {_short(value)} (use e.g. 30s, 10m, 2h, 45d)")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative: {_short(value)}")
    if math.isinf(seconds) or (maximum is not None and seconds > maximum):
        limit = f"{maximum / DAY:g}d" if maximum is not None else "a finite time"
        raise ValueError(f"duration {_short(value)} is too long (at most {limit})")
    return seconds


def _bounded(low: float, high: float, *, zero: bool = False) -> Any:
    """A duration between ``low`` and ``high`` seconds (or 0, meaning "never", when ``zero``)."""

    def check(value: Any) -> float:
        seconds = parse_duration(value, maximum=high)
        if seconds < low and not (zero and seconds == 0):
            allowed = f"0 or at least {low:g}s" if zero else f"at least {low:g}s"
            raise ValueError(f"duration {_short(value)} is too short ({allowed})")
        return seconds

    return BeforeValidator(check)


Duration = Annotated[float, BeforeValidator(parse_duration)]
PollInterval = Annotated[float, _bounded(1, 7 * DAY)]
Overlap = Annotated[float, _bounded(0, 366 * DAY)]
FullEvery = Annotated[float, _bounded(1, 366 * DAY, zero=True)]


def _name(value: str, pattern: re.Pattern[str], what: str) -> str:
    if not pattern.fullmatch(value):
        raise ValueError(
            f"{_short(value)} is not {what} (letters, digits and _"
            f"{', not starting with a digit' if pattern is COLUMN else ', starting with a letter'})"
        )
    return value


def column_name(value: str) -> str:
    return _name(value, COLUMN, "a column or field name")


def entity_name(value: str) -> str:
    return _name(value, ENTITY, "an entity name")


ColumnName = Annotated[str, AfterValidator(column_name)]
EntityName = Annotated[str, AfterValidator(entity_name)]


def check_template(template: str) -> str:
    """A template may only name columns: ``"{Customer}|{Invoice}"``. An attribute, index,
    conversion or format spec (``{Name.__class__}``, ``{Name[0]}``, ``{Name!r}``,
    ``{Name:x>999999999}``) or a positional ``{}`` is refused; ``{{`` and ``}}`` are braces."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(
            f"template {_short(template)}: {exc} (write {{{{ or }}}} for a brace)"
        ) from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        placeholder = (
            "{"
            + name
            + (f"!{conversion}" if conversion else "")
            + (f":{spec}" if spec else "")
            + "}"
        )
        if not COLUMN.fullmatch(name) or spec or conversion:
            raise ValueError(
                f"template placeholder {_short(placeholder)} is not allowed: a template can only"
                " name columns, as in {Name} (no attribute, index, !conversion or :format)"
            )
    return template


Template = Annotated[str, AfterValidator(check_template)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChangeDetection(Strict):
    """``field``: read rows whose field >= cursor - overlap; none: snapshot by content hash."""

    mode: Literal["column", "snapshot"] = "snapshot"
    field: ColumnName | None = None
    overlap: Overlap = 0.0
    # Column mode only: also read everything this often and compare content hashes, to catch
    # changes that do not move the column (a payment on an old invoice). 0: never.
    full_every: FullEvery = 0.0
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
    entity: EntityName
    key: list[ColumnName] = Field(min_length=1, max_length=10)
    change_detection: ChangeDetection = ChangeDetection()
    select: list[ColumnName] | None = Field(None, max_length=500)


class TargetSpec(Strict):
    entity: EntityName
    match_on: list[ColumnName] = Field(min_length=1, max_length=10)


class MatchSpec(Strict):
    field: ColumnName
    value: Template  # template over the child's source record


class FieldSpec(Strict):
    """One target field. Exactly one of from / template / value / compute / parent."""

    from_: ColumnName | None = Field(None, alias="from")
    template: Template | None = None
    value: Any = None
    compute: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    parent: str | None = None
    key: Template | None = None  # the parent's source key, a template over the child's record
    match: MatchSpec | None = None
    lookup: str | None = None
    type: (
        Literal["string", "decimal", "integer", "date", "datetime", "boolean", "currency"] | None
    ) = None
    places: int = Field(2, ge=0, le=MAX_PLACES)
    default: Any = None
    required: bool = False
    max_length: int | None = Field(None, ge=1, le=MAX_LENGTH)
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
                try:
                    self.args[name] = FieldSpec.model_validate(arg)
                except ValidationError as exc:
                    first = exc.errors()[0]
                    where = _loc(("args", name, *first["loc"]))
                    raise ValueError(f"{where}: {_message(first, prefix=False)}") from None
        return self


class EntityMapping(Strict):
    name: str
    source: SourceSpec
    target: TargetSpec
    fields: dict[ColumnName, FieldSpec] = Field(min_length=1)

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
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,99}", value):
            raise ValueError("use lower case letters, digits and _")
        return value

    @model_validator(mode="after")
    def _match_fields_are_mapped(self) -> EntityMapping:
        for name in self.target.match_on:
            spec = self.fields.get(name)
            if spec is None or spec.parent is not None:
                raise ValueError(
                    f"target.match_on: {name!r} is not one of the fields this entity maps"
                )
        return self

    def stream(self, page_size: int | None = None) -> StreamSpec:
        cd = self.source.change_detection
        return StreamSpec(
            entity=self.source.entity,
            key_fields=tuple(self.source.key),
            change_field=cd.field if cd.mode == "column" else None,
            select=tuple(self.source.select) if self.source.select else None,
            page_size=page_size,
        )


class Ownership(Strict):
    """Field ownership in a pair of flows (one each way between two connections):
    ``target_owns`` names the fields of this flow's target that the other side of the pair
    owns. Such a field is sent when the target record is created (the target may require it)
    and never to an existing record."""

    target_owns: list[str] = Field(default_factory=list)


class Flow(Strict):
    name: str
    description: str = ""
    source: str = Field(description="source connection name")
    target: str = Field(description="target connection name")
    poll_interval: PollInterval = 600.0
    enabled: bool = True
    lookups: dict[str, dict[str, Any]] = Field(default_factory=dict)
    entities: list[EntityMapping] = Field(min_length=1)
    ownership: Ownership | None = None

    @field_validator("name")
    @classmethod
    def _flow_name(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,99}", value):
            raise ValueError("use lower case letters, digits, - and _")
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
                self._check_computed(where, spec)
            seen.add(entity.name)
        return self

    def _check_computed(self, where: str, spec: FieldSpec) -> None:
        """A compute's name and arguments, the lookups of its arguments, and the days of
        ``add_days``: what every record would otherwise fail on."""
        for name, arg in spec.args.items():
            if isinstance(arg, FieldSpec):
                if arg.lookup and arg.lookup not in self.lookups:
                    raise ValueError(f"{where}.args.{name}: unknown lookup table {arg.lookup!r}")
                if arg.parent is not None:
                    raise ValueError(f"{where}.args.{name}: an argument cannot be a parent")
                self._check_computed(f"{where}.args.{name}", arg)
        if spec.compute is None:
            if spec.args:
                raise ValueError(f"{where}: 'args' are for a compute")
            return
        from shared.mapping import COMPUTED

        function = COMPUTED.get(spec.compute)
        if function is None:
            known = ", ".join(sorted(COMPUTED))
            raise ValueError(f"{where}: unknown compute {spec.compute!r} ({known})")
        try:
            inspect.signature(function).bind(None, **spec.args)
        except TypeError as exc:
            raise ValueError(f"{where}: compute {spec.compute}: {exc}") from None
        if spec.compute == "add_days" and "days" in spec.args:
            self._check_days(f"{where}.args.days", spec.args["days"])

    def _check_days(self, where: str, days: Any) -> None:
        constants: list[tuple[str, Any]] = [("", days)]
        if isinstance(days, FieldSpec):
            constants = [("value ", days.value), ("default ", days.default)]
            if days.lookup:
                table = days.lookup
                constants += [
                    (f"lookup {table}[{_short(key)}] ", value)
                    for key, value in self.lookups[table].items()
                ]
        for what, value in constants:
            if value is None or (isinstance(days, FieldSpec) and value == ""):
                continue
            try:
                number = float(value) if not isinstance(value, bool) else math.nan
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number) or number != int(number) or abs(number) > MAX_DAYS:
                raise ValueError(
                    f"{where}: {what}{_short(value)} is not a whole number of days"
                    f" between -{MAX_DAYS} and {MAX_DAYS}"
                )

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
        # a field name is shown as it is, however odd (its own error says what is wrong)
        text = str(part) if COLUMN.fullmatch(str(part)) or isinstance(part, int) else _short(part)
        out += f"[{part}]" if isinstance(part, int) else (f".{text}" if out else text)
    return out or "(top level)"


def _message(error: Any, *, prefix: bool = True) -> str:
    """Pydantic's message on one line (without its "Value error, " when nested in another)."""
    message = str(error["msg"])
    if not prefix:
        message = message.removeprefix("Value error, ")
    return " ".join(message.split())


def parse_flow(data: Any, *, origin: str = "<flow>") -> Flow:
    if not isinstance(data, dict):
        raise FlowFileError(f"{origin}: a flow file must be a mapping at the top level")
    name = data.get("name", "?")
    flow_name = name if isinstance(name, str) and len(name) <= 100 else "?"
    try:
        return Flow.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        problems = [
            f"{origin}: flow {flow_name!r}: {_loc(err['loc'])}: {_message(err)}"
            for err in errors[:MAX_ERRORS]
        ]
        if len(errors) > MAX_ERRORS:
            problems.append(f"{origin}: flow {flow_name!r}: and {len(errors) - MAX_ERRORS} more")
        raise FlowFileError("\n".join(problems)) from None


class _FlowLoader(yaml.SafeLoader):
    """YAML as a flow file may use it: no aliases (a billion-laughs file expands a few lines of
    anchors into gigabytes), no duplicate keys (silently merged otherwise), bounded nesting
    (the composer recurses)."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                "aliases (*name) are not allowed in a flow file: write the value out",
                event.start_mark,
            )
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"nested more than {MAX_YAML_DEPTH} levels deep",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # unhashable: the base class says so
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {_short(key)} (first on line {first.start_mark.line + 1})",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: where, and what."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    where = f" line {mark.line + 1} column {mark.column + 1}:" if mark is not None else ""
    text = f"{context}, {problem}" if context else str(problem)
    return f"{where} not valid YAML: {' '.join(text.split())}"


def load_flow_file(path: str | Path) -> Flow:
    path = Path(path)
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise FlowFileError(f"{path}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise FlowFileError(f"{path}: larger than {MAX_FILE_BYTES:,} bytes: not a flow file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FlowFileError(f"{path}: not UTF-8 text (byte {exc.start}): not a flow file") from None
    try:
        data = yaml.load(text, Loader=_FlowLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        raise FlowFileError(f"{path}:{_yaml_problem(exc)}") from None
    except RecursionError:
        raise FlowFileError(f"{path}: not valid YAML: nested too deeply") from None
    return parse_flow(data, origin=str(path))
