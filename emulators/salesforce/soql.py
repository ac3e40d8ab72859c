"""A small SOQL: parser, binder and evaluator for the queries an integration sends.

Supported: ``SELECT f, Rel.f, ... | COUNT() FROM Object [WHERE cond] [ORDER BY f [ASC|DESC]
[NULLS FIRST|LAST], ...] [LIMIT n] [OFFSET n]``; conditions with ``= != <> < > <= >=``,
``[NOT] IN (...)``, ``LIKE``, ``AND``, ``OR``, ``NOT``, parentheses (AND and OR may not be mixed
without parentheses, as in SOQL); literals: strings with backslash escapes, numbers, ``true``,
``false``, ``null``, unquoted dates (``2024-01-01``) and datetimes (``2024-01-01T00:00:00Z``,
``+hh:mm``), ``TODAY``, ``YESTERDAY``, ``TOMORROW``, ``LAST_N_DAYS:n``, ``NEXT_N_DAYS:n``.

Errors are Salesforce's: ``MALFORMED_QUERY`` (syntax, literal of the wrong type),
``INVALID_FIELD`` (unknown field or relationship), ``INVALID_TYPE`` (unknown object),
``NUMBER_OUTSIDE_VALID_RANGE`` (OFFSET over 2,000), ``INVALID_QUERY_FILTER_OPERATOR``.
Text comparisons are case-insensitive, as in SOQL.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from emulators.salesforce.describe import NUMBER_TYPES, TEXT_TYPES, FieldDef, ObjectDef
from emulators.salesforce.errors import ApiError, normalize_id
from emulators.salesforce.records import Store, parse_date, parse_datetime, render_value

Json = dict[str, Any]

MAX_QUERY_LENGTH = 100_000
KEYWORDS = {
    "SELECT", "FROM", "WHERE", "AND", "OR", "NOT", "IN", "LIKE", "ORDER", "BY", "ASC", "DESC",
    "NULLS", "FIRST", "LAST", "LIMIT", "OFFSET", "NULL", "TRUE", "FALSE", "GROUP", "HAVING",
    "INCLUDES", "EXCLUDES", "USING", "WITH", "FOR", "ALL",
}  # fmt: skip
DATE_FUNCTIONS = {"TODAY", "YESTERDAY", "TOMORROW", "LAST_N_DAYS", "NEXT_N_DAYS"}

TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<string>'(?:[^'\\]|\\.)*')
  | (?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,3})?(?:Z|[+-]\d{2}:?\d{2}))
  | (?P<date>\d{4}-\d{2}-\d{2}(?![\dT]))
  | (?P<number>-?\d+(?:\.\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<op><=|>=|!=|<>|=|<|>)
  | (?P<punct>[(),:])
    """,
    re.VERBOSE,
)
ESCAPES = {
    "n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f", '"': '"', "'": "'", "\\": "\\",
}  # fmt: skip
LIKE_ESCAPES = {"_", "%"}


@dataclass
class Token:
    kind: str
    text: str
    value: Any
    pos: int


@dataclass
class Literal:
    kind: str  # string | number | date | datetime | bool | null | datefn
    value: Any
    pos: int


@dataclass
class Ast:
    text: str
    count: bool
    fields: list[tuple[str, int]]
    obj: str
    obj_pos: int
    where: Any = None
    order: list[tuple[str, int, bool, bool | None]] = field(default_factory=list)
    limit: int | None = None
    offset: int | None = None


def _located(text: str, pos: int, message: str) -> str:
    """Salesforce's error text: the statement, a caret under the column, the row and column."""
    line = text.replace("\n", " ")
    if len(line) > 120:
        start = max(0, pos - 60)
        line, pos = line[start : start + 120], pos - start
    return f"\n{line}\n{' ' * pos}^\nERROR at Row:1:Column:{pos + 1}\n{message}"


def malformed(text: str, pos: int, message: str) -> ApiError:
    return ApiError(400, "MALFORMED_QUERY", _located(text, pos, message))


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        match = TOKEN_RE.match(text, pos)
        if match is None:
            raise malformed(text, pos, f"unexpected token: '{text[pos]}'")
        kind = match.lastgroup or ""
        raw = match.group()
        if kind == "string":
            value = _unescape(text, pos, raw[1:-1])
            tokens.append(Token("string", raw, value, pos))
        elif kind != "ws":
            tokens.append(Token(kind, raw, raw, pos))
        pos = match.end()
    return tokens


def _unescape(text: str, pos: int, body: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        char = body[i]
        if char == "\\":
            nxt = body[i + 1]
            if nxt in ESCAPES:
                out.append(ESCAPES[nxt])
            elif nxt in LIKE_ESCAPES:
                out.append("\\" + nxt)  # kept escaped: only meaningful inside LIKE
            elif nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", body[i + 2 : i + 6]):
                out.append(chr(int(body[i + 2 : i + 6], 16)))
                i += 4
            else:
                raise malformed(
                    text,
                    pos + i + 1,
                    f"Invalid string literal '{body}'. Illegal "
                    "character sequence '\\" + nxt + "' in string literal.",
                )
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


class Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0

    def peek(self) -> Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def next(self) -> Token:
        token = self.peek()
        if token is None:
            raise malformed(self.text, len(self.text), "unexpected token: '<EOF>'")
        self.i += 1
        return token

    def unexpected(self, token: Token | None = None) -> ApiError:
        token = token or self.peek()
        if token is None:
            return malformed(self.text, len(self.text), "unexpected token: '<EOF>'")
        return malformed(self.text, token.pos, f"unexpected token: '{token.text}'")

    def kw(self, *words: str) -> str | None:
        token = self.peek()
        if token is not None and token.kind == "ident" and token.text.upper() in words:
            self.i += 1
            return token.text.upper()
        return None

    def expect_kw(self, word: str) -> None:
        if self.kw(word) is None:
            raise self.unexpected()

    def punct(self, char: str) -> bool:
        token = self.peek()
        if token is not None and token.kind == "punct" and token.text == char:
            self.i += 1
            return True
        return False

    def expect_punct(self, char: str) -> None:
        if not self.punct(char):
            raise self.unexpected()

    def path(self) -> tuple[str, int]:
        token = self.next()
        if token.kind != "ident" or token.text.upper() in KEYWORDS:
            raise self.unexpected(token)
        return token.text, token.pos

    def integer(self) -> int:
        token = self.next()
        if token.kind != "number" or not token.text.isdigit():
            raise self.unexpected(token)
        return int(token.text)

    def parse(self) -> Ast:
        self.expect_kw("SELECT")
        count = False
        fields: list[tuple[str, int]] = []
        token = self.peek()
        if (
            token is not None
            and token.text.upper() == "COUNT"
            and self.i + 1 < len(self.tokens)
            and self.tokens[self.i + 1].text == "("
        ):
            self.i += 2
            self.expect_punct(")")
            count = True
        else:
            fields.append(self.path())
            while self.punct(","):
                fields.append(self.path())
        self.expect_kw("FROM")
        obj, obj_pos = self.path()
        ast = Ast(self.text, count, fields, obj, obj_pos)
        if self.kw("WHERE"):
            ast.where = self.condition()
        if self.kw("ORDER"):
            self.expect_kw("BY")
            while True:
                name, pos = self.path()
                descending = self.kw("ASC", "DESC") == "DESC"
                nulls_first: bool | None = None
                if self.kw("NULLS"):
                    which = self.kw("FIRST", "LAST")
                    if which is None:
                        raise self.unexpected()
                    nulls_first = which == "FIRST"
                ast.order.append((name, pos, descending, nulls_first))
                if not self.punct(","):
                    break
        if self.kw("LIMIT"):
            ast.limit = self.integer()
        if self.kw("OFFSET"):
            ast.offset = self.integer()
        if self.peek() is not None:
            raise self.unexpected()
        return ast

    def condition(self) -> Any:
        first = self.factor()
        joiner = None
        items = [first]
        while True:
            token = self.peek()
            word = self.kw("AND", "OR")
            if word is None:
                break
            if joiner is not None and word != joiner:
                raise self.unexpected(token)
            joiner = word
            items.append(self.factor())
        if joiner is None:
            return first
        return (joiner.lower(), items)

    def factor(self) -> Any:
        if self.kw("NOT"):
            return ("not", self.factor())
        if self.punct("("):
            inner = self.condition()
            self.expect_punct(")")
            return inner
        name, pos = self.path()
        if self.kw("LIKE"):
            literal = self.literal()
            return ("like", name, pos, literal)
        negate = False
        if self.kw("NOT"):
            negate = True
            if self.kw("IN") is None:
                raise self.unexpected()
            return ("in", name, pos, True, self.literal_list())
        if self.kw("IN"):
            return ("in", name, pos, negate, self.literal_list())
        token = self.next()
        if token.kind != "op":
            raise self.unexpected(token)
        op = "!=" if token.text == "<>" else token.text
        return ("cmp", name, pos, op, self.literal())

    def literal_list(self) -> list[Literal]:
        self.expect_punct("(")
        token = self.peek()
        if token is not None and token.text.upper() == "SELECT":
            raise malformed(self.text, token.pos, "semi-join sub-selects are not supported here")
        items = [self.literal()]
        while self.punct(","):
            items.append(self.literal())
        self.expect_punct(")")
        return items

    def literal(self) -> Literal:
        token = self.next()
        if token.kind == "string":
            return Literal("string", token.value, token.pos)
        if token.kind == "number":
            return Literal("number", float(token.text), token.pos)
        if token.kind == "date":
            if parse_date(token.text) is None:
                raise self.unexpected(token)
            return Literal("date", token.text, token.pos)
        if token.kind == "datetime":
            ts = parse_datetime(token.text)
            if ts is None:
                raise self.unexpected(token)
            return Literal("datetime", ts, token.pos)
        if token.kind == "ident":
            upper = token.text.upper()
            if upper == "NULL":
                return Literal("null", None, token.pos)
            if upper in ("TRUE", "FALSE"):
                return Literal("bool", upper == "TRUE", token.pos)
            if upper in ("TODAY", "YESTERDAY", "TOMORROW"):
                return Literal("datefn", (upper, 0), token.pos)
            if upper in ("LAST_N_DAYS", "NEXT_N_DAYS"):
                self.expect_punct(":")
                return Literal("datefn", (upper, self.integer()), token.pos)
        raise self.unexpected(token)


def parse(text: str) -> Ast:
    if len(text) > MAX_QUERY_LENGTH:
        raise ApiError(
            400, "MALFORMED_QUERY", "SOQL statements cannot be longer than 100,000 characters."
        )
    return Parser(text).parse()


# ---------------------------------------------------------------------------------------------
# binding


Getter = Callable[[Json], Any]


@dataclass
class Bound:
    """A field path bound to the schema: relationships walked, then a field."""

    path: list[FieldDef]  # reference fields walked, in order
    target: FieldDef
    objects: list[ObjectDef]  # object of each relationship step's target

    def getter(self, stores: dict[str, Store]) -> Getter:
        path = self.path
        objects = self.objects
        name = self.target.name

        def get(record: Json) -> Any:
            current: Json | None = record
            for ref, obj in zip(path, objects, strict=True):
                assert current is not None
                rid = current.get(ref.name)
                current = stores[obj.name.lower()].records.get(rid) if rid else None
                if current is None:
                    return None
            assert current is not None
            return current.get(name)

        return get


@dataclass
class Plan:
    ast: Ast
    obj: ObjectDef
    select: list[Bound]
    where: Any
    order: list[tuple[Bound, bool, bool | None]]


def _no_column(ast: Ast, pos: int, name: str, obj: ObjectDef) -> ApiError:
    return ApiError(
        400,
        "INVALID_FIELD",
        _located(
            ast.text,
            pos,
            f"No such column '{name}' on entity '{obj.name}'. If you are attempting to use a "
            "custom field, be sure to append the '__c' after the custom field name. Please "
            "reference your WSDL or the describe call for the appropriate names.",
        ),
    )


def bind_path(ast: Ast, name: str, pos: int, obj: ObjectDef, schema: dict[str, ObjectDef]) -> Bound:
    parts = name.split(".")
    if len(parts) > 1 and parts[0].lower() == obj.name.lower():
        parts = parts[1:]  # SELECT Account.Name FROM Account is allowed
    path: list[FieldDef] = []
    objects: list[ObjectDef] = []
    current = obj
    for rel_name in parts[:-1]:
        ref = current.relationship(rel_name)
        target = schema.get(ref.reference_to[0].lower()) if ref and ref.reference_to else None
        if ref is None or target is None:
            raise ApiError(
                400,
                "INVALID_FIELD",
                _located(
                    ast.text,
                    pos,
                    f"Didn't understand relationship '{rel_name}' in field path. If you are "
                    "attempting to use a custom relationship, be sure to append the '__r' after "
                    "the custom relationship name. Please reference your WSDL or the describe "
                    "call for the appropriate names.",
                ),
            )
        path.append(ref)
        objects.append(target)
        current = target
    fdef = current.field(parts[-1])
    if fdef is None:
        raise _no_column(ast, pos, parts[-1], current)
    return Bound(path, fdef, objects)


def _wrong_type(ast: Ast, literal: Literal, fdef: FieldDef) -> ApiError:
    if fdef.type in TEXT_TYPES or fdef.type in ("id", "reference"):
        what = "string and should be enclosed in quotes"
    else:
        type_name = {
            "int": "integer",
            "datetime": "dateTime",
            "currency": "currency",
            "percent": "double",
        }.get(fdef.type, fdef.type)
        what = f"{type_name} and should not be enclosed in quotes"
    return malformed(
        ast.text,
        literal.pos,
        f"value of filter criterion for field '{fdef.name}' must be of type {what}",
    )


def _bind_literal(ast: Ast, literal: Literal, fdef: FieldDef, today: date) -> Any:
    """The comparable value of a literal for this field: a scalar, or (start, end) for date
    functions, or None for null."""
    kind = literal.kind
    if kind == "null":
        return None
    ftype = fdef.type
    if ftype in ("id", "reference"):
        if kind != "string":
            raise _wrong_type(ast, literal, fdef)
        rid = normalize_id(literal.value)
        if rid is None:
            raise ApiError(
                400, "INVALID_QUERY_FILTER_OPERATOR", f"invalid ID field: {literal.value}"
            )
        return rid
    if ftype in TEXT_TYPES:
        if kind != "string":
            raise _wrong_type(ast, literal, fdef)
        return literal.value.replace("\\_", "_").replace("\\%", "%").lower()
    if ftype in NUMBER_TYPES:
        if kind != "number":
            raise _wrong_type(ast, literal, fdef)
        return literal.value
    if ftype == "boolean":
        if kind != "bool":
            raise _wrong_type(ast, literal, fdef)
        return literal.value
    if kind == "datefn":
        word, n = literal.value
        start = {"TODAY": today, "YESTERDAY": today - timedelta(days=1)}.get(word)
        if word == "TOMORROW":
            start = today + timedelta(days=1)
        if start is not None:
            end = start + timedelta(days=1)
        elif word == "LAST_N_DAYS":
            start, end = today - timedelta(days=n), today + timedelta(days=1)
        else:  # NEXT_N_DAYS
            start, end = today + timedelta(days=1), today + timedelta(days=n + 1)
        if ftype == "date":
            return (start.isoformat(), end.isoformat())
        return (_day_ts(start), _day_ts(end))
    if ftype == "date":
        if kind != "date":
            raise _wrong_type(ast, literal, fdef)
        return literal.value
    if ftype == "datetime":
        if kind != "datetime":
            raise _wrong_type(ast, literal, fdef)
        return literal.value
    raise _wrong_type(ast, literal, fdef)


def _day_ts(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def _like_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern) and pattern[i + 1] in LIKE_ESCAPES:
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if char == "%" else "." if char == "_" else re.escape(char))
        i += 1
    return re.compile("".join(out), re.IGNORECASE | re.DOTALL)


def _comparable(fdef: FieldDef, value: Any) -> Any:
    if isinstance(value, str) and fdef.type in TEXT_TYPES:
        return value.lower()
    return value


def _compare(op: str, left: Any, right: Any) -> bool:
    if isinstance(right, tuple):  # a date function's [start, end)
        if left is None:
            return op == "!="
        start, end = right
        inside = start <= left < end
        return {
            "=": inside,
            "!=": not inside,
            "<": left < start,
            "<=": left < end,
            ">": left >= end,
            ">=": left >= start,
        }[op]
    if right is None or left is None:
        if op == "=":
            return left is None and right is None
        if op == "!=":
            return (left is None) != (right is None)
        return False
    if op == "=":
        return bool(left == right)
    if op == "!=":
        return bool(left != right)
    if op == "<":
        return bool(left < right)
    if op == "<=":
        return bool(left <= right)
    if op == ">":
        return bool(left > right)
    return bool(left >= right)


def compile_query(
    text: str, schema: dict[str, ObjectDef], stores: dict[str, Store], today: date
) -> Plan:
    ast = parse(text)
    obj = schema.get(ast.obj.lower())
    if obj is None:
        raise ApiError(
            400,
            "INVALID_TYPE",
            _located(
                text,
                ast.obj_pos,
                f"sObject type '{ast.obj}' is not supported. If you are attempting to use a "
                "custom object, be sure to append the '__c' after the entity name. Please "
                "reference your WSDL or the describe call for the appropriate names.",
            ),
        )
    select = [bind_path(ast, name, pos, obj, schema) for name, pos in ast.fields]
    order = [
        (bind_path(ast, name, pos, obj, schema), desc, nulls)
        for name, pos, desc, nulls in ast.order
    ]
    where = _bind_condition(ast, ast.where, obj, schema, stores, today)
    if ast.offset is not None and ast.offset > 2000:
        raise ApiError(400, "NUMBER_OUTSIDE_VALID_RANGE", "Maximum SOQL offset allowed is 2000")
    return Plan(ast, obj, select, where, order)


def _bind_condition(
    ast: Ast,
    node: Any,
    obj: ObjectDef,
    schema: dict[str, ObjectDef],
    stores: dict[str, Store],
    today: date,
) -> Callable[[Json], bool] | None:
    if node is None:
        return None
    kind = node[0]
    if kind in ("and", "or"):
        parts = [_bind_condition(ast, n, obj, schema, stores, today) for n in node[1]]
        checks = [p for p in parts if p is not None]
        if kind == "and":
            return lambda record: all(check(record) for check in checks)
        return lambda record: any(check(record) for check in checks)
    if kind == "not":
        inner = _bind_condition(ast, node[1], obj, schema, stores, today)
        assert inner is not None
        return lambda record: not inner(record)
    _, name, pos, *rest = node
    bound = bind_path(ast, name, pos, obj, schema)
    fdef = bound.target
    get = bound.getter(stores)
    if kind == "like":
        literal: Literal = rest[0]
        if fdef.type not in TEXT_TYPES or literal.kind != "string":
            raise malformed(ast.text, pos, f"invalid operator on field '{fdef.name}': LIKE")
        regex = _like_regex(literal.value)
        return lambda record: (v := get(record)) is not None and bool(regex.fullmatch(str(v)))
    if kind == "in":
        negate, literals = rest
        values = {_bind_literal(ast, lit, fdef, today) for lit in literals}
        if negate:
            return lambda record: _comparable(fdef, get(record)) not in values
        return lambda record: _comparable(fdef, get(record)) in values
    op, literal = rest
    right = _bind_literal(ast, literal, fdef, today)
    if fdef.type == "boolean" and op not in ("=", "!="):
        raise malformed(ast.text, pos, f"invalid operator on field '{fdef.name}': {op}")
    return lambda record: _compare(op, _comparable(fdef, get(record)), right)


def _sort_key(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def execute(plan: Plan, stores: dict[str, Store]) -> list[Json]:
    """The matching records (raw), filtered, ordered, offset and limited."""
    store = stores[plan.obj.name.lower()]
    rows = list(store.records.values())
    if plan.where is not None:
        rows = [r for r in rows if plan.where(r)]
    for bound, descending, nulls_first in reversed(plan.order):
        get = bound.getter(stores)
        first = (not descending) if nulls_first is None else nulls_first
        present = [r for r in rows if get(r) is not None]
        absent = [r for r in rows if get(r) is None]
        present.sort(key=lambda r, g=get: _sort_key(g(r)), reverse=descending)
        rows = absent + present if first else present + absent
    start = plan.ast.offset or 0
    rows = rows[start:]
    if plan.ast.limit is not None:
        rows = rows[: plan.ast.limit]
    return rows


def attributes(obj: ObjectDef, rid: str, version: str) -> Json:
    return {"type": obj.name, "url": f"/services/data/v{version}/sobjects/{obj.name}/{rid}"}


def render(plan: Plan, record: Json, stores: dict[str, Store], version: str) -> Json:
    out: Json = {"attributes": attributes(plan.obj, record["Id"], version)}
    for bound in plan.select:
        target: Json | None = out
        current: Json | None = record
        for ref, obj in zip(bound.path, bound.objects, strict=True):
            rel = ref.relationship_name or ref.name
            rid = current.get(ref.name) if current is not None else None
            current = stores[obj.name.lower()].records.get(rid) if rid else None
            if target is None:
                break
            if current is None:
                target.setdefault(rel, None)
                target = None
                continue
            nested = target.get(rel)
            if nested is None:
                nested = {"attributes": attributes(obj, current["Id"], version)}
                target[rel] = nested
            target = nested
        if target is not None and current is not None:
            target[bound.target.name] = render_value(bound.target, current.get(bound.target.name))
    return out
