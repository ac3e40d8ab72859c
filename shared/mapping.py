"""The mapping engine: a source record and a flow's entity mapping in, a target payload out.

Per field, in order: the value (from a column, a template, a constant, a computed function, or a
parent reference), then a lookup table, then type coercion, then required/default/max_length.
Anything that cannot be mapped raises ``MappingError`` naming the flow, entity and field.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from shared.failures import MappingError
from shared.flows import EntityMapping, FieldSpec, Flow
from shared.keys import SEPARATOR, encode_key
from shared.messages import (
    SCHEMA_VERSION,
    ChangeEvent,
    LineItem,
    ParentRef,
    UpsertCommand,
    canonical_json,
    construct,
    new_id,
)

_FORMATTER = string.Formatter()


class _Context:
    def __init__(
        self,
        flow: Flow,
        entity: EntityMapping,
        record: dict[str, Any],
        today: date,
        key: str,
    ):
        self.flow = flow
        self.entity = entity
        self.record = record
        self.today = today
        self.key = key  # the record's identity key (``shared.keys``)

    def fail(self, field: str, message: str) -> MappingError:
        return MappingError(
            f"flow {self.flow.name!r}, entity {self.entity.name!r}, field {field!r}: {message}"
        )


@lru_cache(maxsize=1024)
def _parse_template(template: str) -> tuple[tuple[str, str | None, str], ...]:
    return tuple(
        (literal, name, spec or "") for literal, name, spec, _ in _FORMATTER.parse(template)
    )


@lru_cache(maxsize=1024)
def compile_template(template: str) -> Callable[[dict[str, Any]], str]:
    """``template`` as a function of a record: values stripped, blanks of a one-line template
    collapsed (an empty address line leaves no double space). KeyError names a column the
    record does not have."""
    parts = _parse_template(template)
    one_line = "\n" not in template

    def render(record: dict[str, Any]) -> str:
        out = []
        for literal, name, spec in parts:
            out.append(literal)
            if name is None:
                continue
            value = record[name]
            text = "" if value is None else str(value).strip()
            out.append(format(text, spec) if spec else text)
        text = "".join(out)
        return " ".join(text.split()) if one_line else text.strip()

    return render


def compile_key_template(template: str, arity: int) -> Callable[[dict[str, Any]], str]:
    """A parent's identity key as a function of a child's record, built as
    ``shared.keys.encode_key`` builds the parent's own key: a parent with one key field gets
    the whole template as its value; a composite key's template gives each key field's value
    between literal ``|`` (``"{Customer}|{Branch}"``), and each value is escaped as a key
    component. Values are stripped, never collapsed (a key keeps its inner spaces). KeyError
    names a column the record does not have; ValueError says the template does not give
    ``arity`` values."""
    segments: list[list[tuple[str, str | None, str]]] = [[]]
    for literal, name, spec in _parse_template(template):
        pieces = literal.split(SEPARATOR) if arity > 1 else [literal]
        segments[-1].append((pieces[0], None, ""))
        for piece in pieces[1:]:
            segments.append([(piece, None, "")])
        if name is not None:
            segments[-1].append(("", name, spec))
    if len(segments) != arity:
        raise ValueError(
            f"the parent key template {template!r} gives {len(segments)} value(s) separated by"
            f" {SEPARATOR!r}; the parent's key has {arity}"
        )

    def render(record: dict[str, Any]) -> str:
        values = []
        for parts in segments:
            out = []
            for literal, name, spec in parts:
                out.append(literal)
                if name is not None:
                    value = record[name]
                    text = "" if value is None else str(value).strip()
                    out.append(format(text, spec) if spec else text)
            values.append("".join(out))
        return encode_key(values)

    return render


# -- coercion ---------------------------------------------------------------------------------


def to_date(value: Any) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    text = str(value).strip()
    try:
        return date.fromisoformat(text[:10])
    except ValueError:
        raise ValueError(f"{value!r} is not a date") from None


def to_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        result = value
    else:
        text = str(value).strip().replace("Z", "+00:00")
        try:
            result = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a date-time") from None
    return result if result.tzinfo else result.replace(tzinfo=UTC)


_QUANTA = {places: Decimal(1).scaleb(-places) for places in range(13)}


def to_decimal(value: Any, places: int) -> float:
    kind = type(value)
    if kind is int:  # a whole number needs no rounding (not bool: True is no amount)
        return float(value)
    try:
        # a float's text is its shortest repr: nothing to strip, no thousands separator
        number = Decimal(repr(value) if kind is float else str(value).strip().replace(",", ""))
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a number") from None
    if not number.is_finite():
        raise ValueError(f"{value!r} is not a finite number")
    quantum = _QUANTA.get(places) or Decimal(1).scaleb(-places)
    return float(number.quantize(quantum))


def to_boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"y", "yes", "true", "1", "t"}:
        return True
    if text in {"n", "no", "false", "0", "f", ""}:
        return False
    raise ValueError(f"{value!r} is not a yes/no value")


def _as_is(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def _as_string(value: Any) -> str:
    return str(value).strip()


def _as_integer(value: Any) -> int:
    number = Decimal(str(to_decimal(value, 6)))
    if number != number.to_integral_value():
        raise ValueError(f"{value!r} is not a whole number")
    return int(number)


def _as_date(value: Any) -> str:
    return to_date(value).isoformat()


def _as_datetime(value: Any) -> str:
    return to_datetime(value).isoformat(timespec="seconds")


def _as_currency(value: Any) -> str:
    text = str(value).strip().upper()
    if len(text) != 3 or not text.isalpha():
        raise ValueError(f"{value!r} is not a 3-letter currency code")
    return text


def coercer(spec: FieldSpec) -> Callable[[Any], Any]:
    """The conversion of a field's value to its declared type (chosen once per field)."""
    kind = spec.type
    if kind == "decimal":
        places = spec.places
        return lambda value: to_decimal(value, places)
    converters: dict[str | None, Callable[[Any], Any]] = {
        None: _as_is,
        "string": _as_string,
        "integer": _as_integer,
        "date": _as_date,
        "datetime": _as_datetime,
        "boolean": to_boolean,
        "currency": _as_currency,
    }
    if kind not in converters:  # pragma: no cover - validated by the flow model
        raise ValueError(f"unknown type {kind!r}")
    return converters[kind]


# -- computed values --------------------------------------------------------------------------


def _amount(value: Any) -> int | float | Decimal:
    """A number to compare, not to store: an int or a finite float as it is (the usual JSON
    case, and the same answer as through Decimal), anything else parsed as ``to_decimal``
    reads it (spaces around, thousands separators)."""
    kind = type(value)
    if kind is int or (kind is float and math.isfinite(value)):
        return value  # type: ignore[no-any-return]
    return Decimal(str(value or 0).strip().replace(",", ""))


def _add_days(ctx: _Context, date: Any, days: Any) -> str | None:
    if date in (None, ""):
        return None
    whole = days if type(days) is int else int(Decimal(str(days or 0)))
    return (to_date(date) + timedelta(days=whole)).isoformat()


def _payment_status(ctx: _Context, balance: Any, due_date: Any) -> str:
    """paid (nothing outstanding), overdue (outstanding past due), else open."""
    if _amount(balance) <= 0:
        return "paid"
    if due_date not in (None, "") and to_date(due_date) < ctx.today:
        return "overdue"
    return "open"


def _days_overdue(ctx: _Context, balance: Any, due_date: Any) -> int:
    if _amount(balance) <= 0 or due_date in (None, ""):
        return 0
    return max(0, (ctx.today - to_date(due_date)).days)


def _coalesce(ctx: _Context, **values: Any) -> Any:
    for _, value in sorted(values.items()):
        if value not in (None, ""):
            return value
    return None


def _line_item(
    ctx: _Context,
    product_id: Any,
    list_price: Any,
    quantity: Any = 1,
    description: Any = None,
    product_entity: Any = "Products",
) -> list[LineItem]:
    """One line, target-neutral (``LineItem``): the sink renders it into its line field (Zoho
    ``Invoiced_Items`` / ``Ordered_Items`` rows). ``product_id`` is the product's target id,
    ready (a lookup table's constant)."""
    if product_id in (None, ""):
        raise ValueError("product_id is empty")
    product = construct(
        ParentRef,
        {
            "field": "product",
            "flow": ctx.flow.name,
            "source_entity": "",
            "source_key": str(product_id),
            "target_entity": str(product_entity),
            "match_field": None,
            "match_value": None,
            "target_id": str(product_id),
            "shape": None,
        },
    )
    return [
        LineItem(
            product=product,
            quantity=float(Decimal(str(quantity or 1))),
            unit_price=to_decimal(list_price or 0, 2),
            description=None if description in (None, "") else str(description),
        )
    ]


def _source_key(ctx: _Context) -> str:
    """The record's identity key, as its record link stores it (``shared.keys``): key fields
    joined by ``|`` with a ``\\`` or ``|`` inside a value escaped, upper-cased for a source
    whose keys are case-insensitive. The unambiguous match value of a composite key."""
    return ctx.key


COMPUTED: dict[str, Callable[..., Any]] = {
    "source_key": _source_key,
    "line_item": _line_item,
    "add_days": _add_days,
    "payment_status": _payment_status,
    "days_overdue": _days_overdue,
    "coalesce": _coalesce,
}
TIME_DEPENDENT = {"payment_status", "days_overdue"}


def is_time_dependent(entity: EntityMapping) -> bool:
    """Mappings whose output changes with the date alone (aging) are re-evaluated daily."""

    def uses(spec: FieldSpec) -> bool:
        if spec.compute in TIME_DEPENDENT:
            return True
        return any(isinstance(a, FieldSpec) and uses(a) for a in spec.args.values())

    return any(uses(spec) for spec in entity.fields.values())


# -- the compiled plan -------------------------------------------------------------------------
#
# A flow's entity mapping is compiled once into one function per field, with every branch of
# the spec (source, lookup, default, type, length) decided at compile time. A computed value
# that several fields use (an invoice's due date feeds four of them) is computed once per
# record: computed values are memoised per record by their definition.

Getter = Callable[[_Context, dict[str, Any]], Any]
_MISSING = object()


def _compile_value(flow: Flow, name: str, spec: FieldSpec) -> Getter:
    if spec.from_ is not None:
        column = spec.from_

        def from_column(ctx: _Context, memo: dict[str, Any]) -> Any:
            try:
                value = ctx.record[column]
            except KeyError:
                raise ctx.fail(
                    name, f"source column {column!r} is missing from the record"
                ) from None
            return value.strip() if isinstance(value, str) else value

        return from_column
    if spec.template is not None:
        render = compile_template(spec.template)

        def from_template(ctx: _Context, memo: dict[str, Any]) -> Any:
            try:
                return render(ctx.record)
            except KeyError as exc:
                raise ctx.fail(name, f"template names unknown column {exc.args[0]!r}") from None
            except Exception as exc:  # a format spec the value does not take, ...
                raise ctx.fail(name, f"template {spec.template!r}: {_reason(exc)}") from None

        return from_template
    if spec.compute is not None:
        function = COMPUTED[spec.compute]
        compute = spec.compute
        args = [
            (arg_name, _compile_field(flow, f"{name}.{arg_name}", arg))
            if isinstance(arg, FieldSpec)
            else (arg_name, _constant(arg))
            for arg_name, arg in spec.args.items()
        ]
        key = canonical_json({"compute": compute, "args": _definition(spec.args)}).decode()

        def computed(ctx: _Context, memo: dict[str, Any]) -> Any:
            value = memo.get(key, _MISSING)
            if value is _MISSING:
                values = {arg_name: get(ctx, memo) for arg_name, get in args}
                try:
                    value = function(ctx, **values)
                except MappingError:
                    raise
                except Exception as exc:  # a date out of range (OverflowError), ...
                    raise ctx.fail(name, f"{compute}: {_reason(exc)}{_args(values)}") from None
                if isinstance(value, str):
                    value = value.strip()
                memo[key] = value
            return value

        return computed
    return _constant(spec.value.strip() if isinstance(spec.value, str) else spec.value)


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _args(values: dict[str, Any]) -> str:
    if not values:
        return ""
    return " (" + ", ".join(f"{k}={_short(v)}" for k, v in values.items()) + ")"


def _constant(value: Any) -> Getter:
    return lambda ctx, memo: value


def _definition(args: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        if isinstance(v, FieldSpec)
        else v
        for k, v in args.items()
    }


def _compile_field(flow: Flow, name: str, spec: FieldSpec) -> Getter:
    value_of = _compile_value(flow, name, spec)
    table = flow.lookups[spec.lookup] if spec.lookup is not None else None
    lookup_name = spec.lookup
    default, required = spec.default, spec.required
    max_length = spec.max_length
    convert = coercer(spec)

    def field(ctx: _Context, memo: dict[str, Any]) -> Any:
        value = value_of(ctx, memo)
        if table is not None and value is not None and value != "":
            key = str(value).strip()
            if key in table:
                value = table[key]
            elif "default" in table:
                value = table["default"]
            else:
                raise ctx.fail(name, f"{key!r} is not in lookup table {lookup_name!r}")
        if value is None or value == "":
            if default is not None:
                value = default
            elif required:
                raise ctx.fail(name, "required value is empty")
            else:
                return None
        try:
            value = convert(value)
        except (ValueError, InvalidOperation) as exc:  # it names the value
            raise ctx.fail(name, _reason(exc)) from None
        except Exception as exc:  # beyond what the type can hold (OverflowError), ...
            raise ctx.fail(name, f"{_reason(exc)} (value {_short(value)})") from None
        if max_length and isinstance(value, str) and len(value) > max_length:
            value = value[:max_length]
        return value

    return field


@dataclass
class _ParentPlan:
    field: str
    key: Callable[[dict[str, Any]], str]  # the parent's source key, from the child's record
    empty_key: str  # what ``key`` gives when every value is empty: no parent
    required: bool
    source_entity: str
    target_entity: str
    match_field: str | None
    match_value: Callable[[dict[str, Any]], str] | None


@dataclass
class _Plan:
    fields: list[tuple[str, Getter]]
    parents: list[_ParentPlan]
    match_on: list[str]
    # what every command of the entity carries (shared by them: nothing changes a command)
    target_entity: str
    insert_only: list[str]
    transformations: dict[int, str]  # per flow version: "flow/entity@vN"
    lines_field: str | None = None  # the field whose value is the record's line items
    owned_elsewhere: list[str] = dataclass_field(default_factory=list)  # the other side owns


def _compile(flow: Flow, entity: EntityMapping) -> _Plan:
    fields: list[tuple[str, Getter]] = []
    parents: list[_ParentPlan] = []
    for name, spec in entity.fields.items():
        if spec.parent is None:
            fields.append((name, _compile_field(flow, name, spec)))
            continue
        parent = flow.entity(spec.parent)
        try:
            key = compile_key_template(spec.key or "", len(parent.source.key))
        except ValueError as exc:
            key = _refusing(str(exc))
        parents.append(
            _ParentPlan(
                field=name,
                key=key,
                empty_key=SEPARATOR * (len(parent.source.key) - 1),
                required=spec.required,
                source_entity=parent.source.entity,
                target_entity=parent.target.entity,
                match_field=spec.match.field if spec.match else None,
                match_value=compile_template(spec.match.value) if spec.match else None,
            )
        )
    return _Plan(
        fields,
        parents,
        list(entity.target.match_on),
        target_entity=entity.target.entity,
        insert_only=[name for name, spec in entity.fields.items() if spec.insert_only],
        transformations={},
        lines_field=next(
            (name for name, spec in entity.fields.items() if spec.compute == "line_item"), None
        ),
        owned_elsewhere=[
            name for name in entity.fields if flow.ownership and name in flow.ownership.target_owns
        ],
    )


def _refusing(reason: str) -> Callable[[dict[str, Any]], str]:
    def refuse(record: dict[str, Any]) -> str:
        raise ValueError(reason)

    return refuse


def _plan_for(flow: Flow, entity: EntityMapping) -> _Plan:
    """The compiled plan, kept on the entity mapping per flow name and lookup tables (an
    entity shared by a copy of the flow with other lookups gets a plan of its own)."""
    key = (flow.name, id(flow.lookups))
    entry = entity.compiled.get(key)
    if entry is None or entry[0] is not flow.lookups:  # holding the tables keeps their id
        entry = entity.compiled[key] = (flow.lookups, _compile(flow, entity))
    return entry[1]


def map_record(
    flow: Flow,
    entity: EntityMapping,
    record: dict[str, Any],
    *,
    today: date,
    key: str | None = None,
    case_sensitive_keys: bool = True,
) -> tuple[dict[str, Any], list[ParentRef]]:
    """``record`` mapped; ``key`` is its identity key (by default built from its key fields)."""
    if key is None:
        key = encode_key(
            [record.get(name) for name in entity.source.key], case_sensitive=case_sensitive_keys
        )
    return _map_with(_plan_for(flow, entity), flow, entity, record, today, key, case_sensitive_keys)


def _map_with(
    plan: _Plan,
    flow: Flow,
    entity: EntityMapping,
    record: dict[str, Any],
    today: date,
    key: str,
    case_sensitive_keys: bool,
) -> tuple[dict[str, Any], list[ParentRef]]:
    ctx = _Context(flow, entity, record, today, key)
    memo: dict[str, Any] = {}
    payload = {name: get(ctx, memo) for name, get in plan.fields}
    parents: list[ParentRef] = []
    for ref in plan.parents:
        try:
            parent_key = ref.key(record)
            match_value = ref.match_value(record) if ref.match_value else None
        except KeyError as exc:
            raise ctx.fail(ref.field, f"parent key names unknown column {exc.args[0]!r}") from None
        except Exception as exc:
            raise ctx.fail(ref.field, f"parent key: {_reason(exc)}") from None
        if not case_sensitive_keys:
            parent_key = parent_key.upper()
        if parent_key == ref.empty_key:
            if ref.required:
                raise ctx.fail(ref.field, "parent key is empty")
            continue
        parents.append(
            construct(
                ParentRef,
                {
                    "field": ref.field,
                    "flow": flow.name,
                    "source_entity": ref.source_entity,
                    "source_key": parent_key,
                    "target_entity": ref.target_entity,
                    "match_field": ref.match_field,
                    "match_value": match_value,
                    "target_id": None,
                    "shape": None,
                },
            )
        )
    for match_field in plan.match_on:
        value = payload.get(match_field)
        if value is None or value == "":
            raise ctx.fail(match_field, "the match field of the target is empty")
    return payload, parents


def map_event(
    flow: Flow,
    flow_version: int,
    event: ChangeEvent,
    *,
    target_connection: str,
    target_system: str,
    case_sensitive_keys: bool = True,
) -> UpsertCommand:
    """The command for ``event``. ``case_sensitive_keys``: the source connection's (False
    upper-cases the parent keys, as the poller upper-cased the event's key)."""
    entity = flow.entity_for_source(event.entity)
    plan = _plan_for(flow, entity)
    payload, parents = _map_with(
        plan,
        flow,
        entity,
        event.record,
        event.observed_at.date(),
        event.key,
        case_sensitive_keys,
    )
    lines: list[LineItem] = []
    if plan.lines_field is not None:
        lines = payload.pop(plan.lines_field, None) or []
    transformation = plan.transformations.get(flow_version)
    if transformation is None:
        transformation = f"{flow.name}/{entity.name}@v{flow_version}"
        plan.transformations[flow_version] = transformation
    # Built from validated parts, every field given: no second validation pass (hot path).
    return construct(
        UpsertCommand,
        {
            "schema_version": SCHEMA_VERSION,
            "command_id": new_id(),
            "event_id": event.event_id,
            "flow": flow.name,
            "flow_version": flow_version,
            "transformation": transformation,
            "source_system": event.source_system,
            "source_entity": event.entity,
            "source_key": event.key,
            "source_version": event.version,
            "observed_at": event.observed_at,
            "target_connection": target_connection,
            "target_system": target_system,
            "target_entity": plan.target_entity,
            "match_on": plan.match_on,
            "payload": payload,
            "parents": parents,
            "lines": lines,
            "lines_field": plan.lines_field,
            "insert_only": plan.insert_only,
            "owned_elsewhere": plan.owned_elsewhere,
            "source_connection": event.source_connection,
            "payload_hash": UpsertCommand.hash_of(payload, parents, lines),
        },
    )
