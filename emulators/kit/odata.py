"""OData query options for emulators: ``$filter`` parsed and compiled to a row predicate, and
``$select``, ``$orderby``, ``$top``, ``$skip`` and paging helpers.

The grammar covers what the ERP dialects use (:class:`Dialect`):

- comparisons ``eq ne gt ge lt le``; ``and``, ``or``, ``not``; parentheses; a literal on either
  side of a property; ``in (...)`` where the dialect speaks OData 4.01;
- literals: strings with ``''`` escapes, numbers (``1``, ``-2.5``, ``99.99m``, ``1e3``, ``10L``),
  ``true``/``false``/``null``, plain ISO ``2024-05-01`` and ``2024-05-01T00:00:00Z`` (OData v4),
  and typed ``datetime'2015-12-31T12:00'`` (Sage 300, OData v3),
  ``datetimeoffset'2019-08-18T23:59:59.999+04:00'`` (Acumatica), ``guid'...'``, ``binary'...'``
  and ``X'...'``;
- functions ``contains``, ``startswith``, ``endswith`` (v4), ``substringof`` and ``length`` (v3),
  as far as the dialect lists them.

Operators are case-sensitive, as in ASP.NET OData. Errors are :class:`ODataQueryError` with a
message in the words of ASP.NET OData; each emulator wraps it in its vendor's error body.

Datetime literals evaluate to naive UTC :class:`datetime.datetime` values; a property getter must
return the same (or ``None``). Binary literals are ``bytes`` unless the property's ``coerce``
turns them into its stored form (SYSPRO keeps its rowversion as an ``int``).
"""

from __future__ import annotations

import base64
import binascii
import operator
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import quote

Row = Any
Predicate = Callable[[Row], bool]

STRING = "Edm.String"
DECIMAL = "Edm.Decimal"
DOUBLE = "Edm.Double"
SINGLE = "Edm.Single"
INT32 = "Edm.Int32"
INT64 = "Edm.Int64"
BOOLEAN = "Edm.Boolean"
DATE = "Edm.Date"
DATETIME = "Edm.DateTime"
DATETIMEOFFSET = "Edm.DateTimeOffset"
BINARY = "Edm.Binary"
GUID = "Edm.Guid"
NULL = "null"

NUMERIC = frozenset({DECIMAL, DOUBLE, SINGLE, INT32, INT64, "Edm.Int16", "Edm.Byte"})
DATETIMES = frozenset({DATETIME, DATETIMEOFFSET})


class ODataQueryError(Exception):
    """A query option the service refuses (HTTP 400); ``message`` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Dialect:
    """What one vendor's OData service accepts in ``$filter``."""

    name: str
    typed_literals: frozenset[str] = frozenset()
    """Prefixes of typed literals: datetime, datetimeoffset, guid, binary, X."""
    iso_literals: bool = True
    """Plain ISO dates and datetimes with an offset (OData v4)."""
    in_operator: bool = False
    """``Property in ('a', 'b')`` (OData 4.01)."""
    functions: frozenset[str] = frozenset({"contains", "startswith", "endswith"})


ODATA_4 = Dialect("odata-4.0")
ODATA_401 = Dialect("odata-4.01", typed_literals=frozenset({"binary", "X"}), in_operator=True)
SYSPRO = Dialect("syspro", typed_literals=frozenset({"binary", "X"}))
"""SYSPRO OData (ASP.NET OData v4): ISO literals; rowversions as ``binary'...'``."""
ACUMATICA = Dialect(
    "acumatica",
    typed_literals=frozenset({"datetimeoffset", "datetime", "guid"}),
    functions=frozenset({"substringof", "startswith", "endswith", "contains"}),
)
"""Acumatica contract-based REST: ``LastModifiedDateTime gt datetimeoffset'...'``."""
SAGE300 = Dialect(
    "sage300",
    typed_literals=frozenset({"datetime"}),
    functions=frozenset({"substringof", "startswith", "endswith", "length"}),
)
"""Sage 300 Web API: ``DateLastMaintained gt datetime'2015-12-31T12:00'``; ISO with Z too."""

_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<typed>(?:datetimeoffset|datetime|guid|binary|X)'(?:[^']|'')*')
  | (?P<str>'(?:[^']|'')*')
  | (?P<dto>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,7})?)?(?:Z|[+-]\d{2}:\d{2}))
  | (?P<dtnaive>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,7})?)?)
  | (?P<date>\d{4}-\d{2}-\d{2})
  | (?P<num>[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?[mMdDfFlL]?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:[/.][A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<punct>[(),])
    """,
    re.VERBOSE,
)

COMPARE_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
}
OP_KIND = {
    "eq": "Equal",
    "ne": "NotEqual",
    "gt": "GreaterThan",
    "ge": "GreaterThanOrEqual",
    "lt": "LessThan",
    "le": "LessThanOrEqual",
}
_MIRROR = {"eq": "eq", "ne": "ne", "gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}
_BOOL_FUNCS = {"contains", "startswith", "endswith", "substringof"}
_KEYWORDS = {"and", "or", "not", "in", "true", "false", "null", *COMPARE_OPS}


def _invalid(message: str) -> ODataQueryError:
    return ODataQueryError(message)


# ---------------------------------------------------------------------------------------------
# tokens and literals


@dataclass
class Token:
    kind: str
    text: str
    pos: int


@dataclass(frozen=True)
class Literal:
    edm: str
    value: Any


def tokenize(text: str, dialect: Dialect = ODATA_4) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise _invalid(f"Syntax error at position {pos} in '{text}'.")
        kind = m.lastgroup or ""
        if kind == "typed":
            prefix = m.group()[: m.group().index("'")]
            if prefix not in dialect.typed_literals:
                raise _invalid(f"Syntax error at position {pos} in '{text}'.")
        elif kind in ("dto", "dtnaive", "date") and not dialect.iso_literals:
            raise _invalid(f"Syntax error at position {pos} in '{text}'.")
        if kind == "dtnaive":
            raise _invalid(
                f"Unrecognized 'Edm.DateTimeOffset' literal '{m.group()}' at '{pos}' in "
                f"'{text}': a time zone offset (Z or +hh:mm) is required."
            )
        if kind != "ws":
            tokens.append(Token(kind, m.group(), pos))
        pos = m.end()
    return tokens


def _parse_iso(text: str) -> datetime:
    """ISO 8601 (up to 7 fractional digits, ``Z`` or an offset, seconds optional) -> naive UTC."""
    text = text.strip().replace("z", "Z")
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    if "." in text:  # Python accepts at most 6 fractional digits
        head, _, rest = text.partition(".")
        digits = re.match(r"\d+", rest)
        if digits is None:
            raise ValueError(text)
        text = f"{head}.{digits.group()[:6]:0<6}{rest[digits.end() :]}"
    value = datetime.fromisoformat(text)
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def parse_literal(tok: Token, source: str) -> Literal:
    if tok.kind == "str":
        return Literal(STRING, tok.text[1:-1].replace("''", "'"))
    if tok.kind == "num":
        suffix = tok.text[-1] if tok.text[-1] in "mMdDfFlL" else ""
        text = tok.text[:-1] if suffix else tok.text
        try:
            if suffix in ("l", "L"):
                return Literal(INT64, int(text))
            if suffix in ("d", "D", "f", "F"):
                return Literal(DOUBLE if suffix in "dD" else SINGLE, float(text))
            if suffix or not re.fullmatch(r"[-+]?\d+", text):
                return Literal(DECIMAL, float(text))
            number = int(text)
        except ValueError as exc:
            raise _invalid(f"Syntax error at position {tok.pos} in '{source}'.") from exc
        return Literal(INT32 if -(2**31) <= number < 2**31 else INT64, number)
    if tok.kind == "dto":
        try:
            return Literal(DATETIMEOFFSET, _parse_iso(tok.text))
        except ValueError as exc:
            raise _invalid(
                f"Unrecognized 'Edm.DateTimeOffset' literal '{tok.text}' at '{tok.pos}' "
                f"in '{source}'."
            ) from exc
    if tok.kind == "date":
        try:
            return Literal(DATE, date.fromisoformat(tok.text))
        except ValueError as exc:
            raise _invalid(
                f"Unrecognized 'Edm.Date' literal '{tok.text}' at '{tok.pos}' in '{source}'."
            ) from exc
    if tok.kind == "typed":
        prefix, _, rest = tok.text.partition("'")
        body = rest[:-1].replace("''", "'")
        return _typed_literal(prefix, body, tok, source)
    if tok.kind == "ident" and tok.text in ("true", "false"):
        return Literal(BOOLEAN, tok.text == "true")
    if tok.kind == "ident" and tok.text == "null":
        return Literal(NULL, None)
    raise _invalid(f"Syntax error at position {tok.pos} in '{source}'.")


def _typed_literal(prefix: str, body: str, tok: Token, source: str) -> Literal:
    edm = {
        "datetime": DATETIME,
        "datetimeoffset": DATETIMEOFFSET,
        "guid": GUID,
        "binary": BINARY,
        "X": BINARY,
    }[prefix]
    try:
        if prefix == "datetime":
            return Literal(DATETIME, _parse_iso(body))
        if prefix == "datetimeoffset":
            if not re.search(r"(Z|[+-]\d{2}:?\d{2})$", body.strip()):
                raise ValueError("offset missing")
            return Literal(DATETIMEOFFSET, _parse_iso(body))
        if prefix == "guid":
            if not re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", body):
                raise ValueError(body)
            return Literal(GUID, body.lower())
        if prefix == "X":
            return Literal(BINARY, bytes.fromhex(body))
        return Literal(
            BINARY,
            base64.b64decode(
                body.replace("-", "+").replace("_", "/") + "=" * (-len(body) % 4), validate=True
            ),
        )
    except (ValueError, binascii.Error) as exc:
        raise _invalid(
            f"Unrecognized '{edm}' literal '{tok.text}' at '{tok.pos}' in '{source}'."
        ) from exc


def literal_text(value: Any, dialect: Dialect = ODATA_4) -> str:
    """A Python value as a ``$filter`` literal of the dialect (for tests and seeds)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, datetime):
        utc = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        iso = utc.isoformat().replace("+00:00", "Z")
        if "datetimeoffset" in dialect.typed_literals:
            return f"datetimeoffset'{iso}'"
        if "datetime" in dialect.typed_literals and not dialect.iso_literals:
            return f"datetime'{iso}'"
        return iso
    if isinstance(value, date):
        return value.isoformat()
    return "'" + str(value).replace("'", "''") + "'"


# ---------------------------------------------------------------------------------------------
# the tree


@dataclass(frozen=True)
class Prop:
    name: str
    pos: int


@dataclass(frozen=True)
class Lit:
    literal: Literal
    pos: int


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Any, ...]
    pos: int


@dataclass(frozen=True)
class Compare:
    op: str
    left: Any
    right: Any


@dataclass(frozen=True)
class In:
    operand: Any
    values: tuple[Lit, ...]


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" | "or"
    parts: tuple[Any, ...]


@dataclass(frozen=True)
class Not:
    inner: Any


@dataclass
class FilterExpr:
    """A parsed ``$filter``: the tree and the text it came from."""

    text: str
    tree: Any
    dialect: Dialect


class _Parser:
    def __init__(self, text: str, dialect: Dialect) -> None:
        self.text = text
        self.dialect = dialect
        self.tokens = tokenize(text, dialect)
        self.pos = 0

    def parse(self) -> Any:
        if not self.tokens:
            raise _invalid("The $filter expression must not be empty.")
        tree = self._or()
        if self.pos < len(self.tokens):
            tok = self.tokens[self.pos]
            raise _invalid(f"Syntax error at position {tok.pos} in '{self.text}'.")
        return tree

    def _peek(self) -> Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _next(self) -> Token:
        tok = self._peek()
        if tok is None:
            raise _invalid(f"Expression expected at position {len(self.text)} in '{self.text}'.")
        self.pos += 1
        return tok

    def _expect(self, text: str) -> None:
        tok = self._peek()
        if tok is None:
            raise _invalid(f"'{text}' expected at position {len(self.text)} in '{self.text}'.")
        self.pos += 1
        if tok.text != text:
            raise _invalid(f"'{text}' expected at position {tok.pos} in '{self.text}'.")

    def _word(self, word: str) -> bool:
        tok = self._peek()
        if tok is not None and tok.kind == "ident" and tok.text == word:
            self.pos += 1
            return True
        return False

    def _or(self) -> Any:
        parts = [self._and()]
        while self._word("or"):
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else BoolOp("or", tuple(parts))

    def _and(self) -> Any:
        parts = [self._not()]
        while self._word("and"):
            parts.append(self._not())
        return parts[0] if len(parts) == 1 else BoolOp("and", tuple(parts))

    def _not(self) -> Any:
        if self._word("not"):
            return Not(self._not())
        return self._comparison()

    def _comparison(self) -> Any:
        left = self._operand()
        tok = self._peek()
        if tok is None or tok.text in (")", ","):
            return left
        if tok.kind == "ident" and tok.text in ("and", "or"):
            return left
        self.pos += 1
        if tok.kind == "ident" and tok.text == "in" and self.dialect.in_operator:
            return In(left, self._in_list())
        if tok.kind != "ident" or tok.text not in COMPARE_OPS:
            if tok.kind == "ident" and tok.text.lower() in COMPARE_OPS:
                raise _invalid(
                    f"Syntax error: operators are case-sensitive, found '{tok.text}' "
                    f"at position {tok.pos} in '{self.text}'."
                )
            raise _invalid(f"Syntax error at position {tok.pos} in '{self.text}'.")
        return Compare(tok.text, left, self._operand())

    def _in_list(self) -> tuple[Lit, ...]:
        self._expect("(")
        values = [self._literal()]
        while (tok := self._peek()) is not None and tok.text == ",":
            self.pos += 1
            values.append(self._literal())
        self._expect(")")
        return tuple(values)

    def _literal(self) -> Lit:
        tok = self._next()
        return Lit(parse_literal(tok, self.text), tok.pos)

    def _operand(self) -> Any:
        tok = self._next()
        if tok.text == "(":
            inner = self._or()
            self._expect(")")
            return inner
        after = self._peek()
        if tok.kind == "ident" and after is not None and after.text == "(":
            return self._call(tok)
        if tok.kind == "ident" and tok.text not in ("true", "false", "null"):
            if tok.text in _KEYWORDS:
                raise _invalid(f"Syntax error at position {tok.pos} in '{self.text}'.")
            return Prop(tok.text, tok.pos)
        if tok.kind == "punct":
            raise _invalid(f"Syntax error at position {tok.pos} in '{self.text}'.")
        return Lit(parse_literal(tok, self.text), tok.pos)

    def _call(self, name_tok: Token) -> Call:
        name = name_tok.text
        if name not in self.dialect.functions:
            raise _invalid(f"An unknown function with name '{name}' was found.")
        self._expect("(")
        args = [self._operand()]
        while (tok := self._peek()) is not None and tok.text == ",":
            self.pos += 1
            args.append(self._operand())
        self._expect(")")
        return Call(name, tuple(args), name_tok.pos)


def parse_filter(text: str, dialect: Dialect = ODATA_4) -> FilterExpr:
    """Parses ``$filter`` text; raises :class:`ODataQueryError` on a syntax error."""
    return FilterExpr(text, _Parser(text, dialect).parse(), dialect)


# ---------------------------------------------------------------------------------------------
# compiling to a predicate


@dataclass(frozen=True)
class Property:
    """How the compiler reads one property of a row."""

    name: str
    edm: str
    get: Callable[[Row], Any]
    coerce: Callable[[Any], Any] | None = None
    """Turns a literal's value into the stored form (e.g. rowversion bytes -> int)."""


Resolver = Callable[[str], Property | None]


def properties_of(
    types: Mapping[str, str], getter: Callable[[str], Callable[[Row], Any]]
) -> Resolver:
    """A resolver over ``{name: edm type}``; ``getter(name)`` reads the value from a row."""
    cache: dict[str, Property] = {}

    def resolve(name: str) -> Property | None:
        found = cache.get(name)
        if found is None and name in types:
            found = cache[name] = Property(name, types[name], getter(name))
        return found

    return resolve


def dict_properties(types: Mapping[str, str]) -> Resolver:
    """A resolver for rows that are dicts keyed by property name."""
    return properties_of(types, lambda name: lambda row: row.get(name))


def _compatible(prop_edm: str, lit_edm: str) -> bool:
    if prop_edm == lit_edm:
        return True
    if prop_edm in NUMERIC:
        return lit_edm in NUMERIC
    if prop_edm in DATETIMES:
        return lit_edm in DATETIMES
    if prop_edm == GUID:
        return lit_edm == STRING
    return False


@dataclass
class _Compiler:
    expr: FilterExpr
    resolve: Resolver
    type_name: str
    case_insensitive: bool
    binary_ranges: bool
    _used: set[str] = field(default_factory=set)

    def error_property(self, name: str) -> ODataQueryError:
        return _invalid(f"Could not find a property named '{name}' on type '{self.type_name}'.")

    def prop(self, node: Prop) -> Property:
        found = self.resolve(node.name)
        if found is None:
            raise self.error_property(node.name)
        return found

    def compile(self, node: Any) -> Predicate:
        if isinstance(node, BoolOp):
            parts = [self.compile(p) for p in node.parts]
            if node.op == "or":
                return lambda r: any(p(r) for p in parts)
            if len(parts) == 2:
                a, b = parts
                return lambda r: a(r) and b(r)
            return lambda r: all(p(r) for p in parts)
        if isinstance(node, Not):
            inner = self.compile(node.inner)
            return lambda r: not inner(r)
        if isinstance(node, Compare):
            return self.compare(node)
        if isinstance(node, In):
            return self.membership(node)
        if isinstance(node, Call) and node.name in _BOOL_FUNCS:
            return self.function(node)
        if isinstance(node, Prop):
            prop = self.prop(node)
            if prop.edm != BOOLEAN:
                raise _invalid(f"The $filter expression must evaluate to a boolean: '{prop.name}'.")
            get = prop.get
            return lambda r: get(r) is True
        raise _invalid(f"The $filter expression must evaluate to a boolean in '{self.expr.text}'.")

    # -- comparisons --------------------------------------------------------------------------

    def compare(self, node: Compare) -> Predicate:
        op, left, right = node.op, node.left, node.right
        if isinstance(left, Lit) and not isinstance(right, Lit):
            left, right, op = right, left, _MIRROR[op]
        if isinstance(left, Call):
            return self.compare_call(left, op, right)
        if not isinstance(left, Prop):
            raise _invalid("A comparison needs a property on one side.")
        if isinstance(right, (Prop, Call)):
            raise _invalid("Comparing two properties is not supported.")
        if not isinstance(right, Lit):
            raise _invalid(f"Syntax error in '{self.expr.text}'.")
        prop = self.prop(left)
        return self.compile_compare(prop, op, right.literal)

    def incompatible(self, prop: Property, lit: Literal, op: str) -> ODataQueryError:
        found = "<null>" if lit.edm == NULL else lit.edm
        return _invalid(
            "A binary operator with incompatible types was detected. Found operand types "
            f"'{prop.edm}' and '{found}' for operator kind '{OP_KIND[op]}'."
        )

    def value_of(self, prop: Property, lit: Literal) -> Any:
        value = lit.value
        if prop.edm in NUMERIC and isinstance(value, float) and value.is_integer():
            value = int(value) if prop.edm in (INT32, INT64) else value
        if prop.coerce is not None:
            value = prop.coerce(value)
        return value

    def compile_compare(self, prop: Property, op: str, lit: Literal) -> Predicate:
        get = prop.get
        fn = COMPARE_OPS[op]
        if lit.edm == NULL:
            if op not in ("eq", "ne"):
                raise self.incompatible(prop, lit, op)
            if op == "eq":
                return lambda r: get(r) is None
            return lambda r: get(r) is not None
        if not _compatible(prop.edm, lit.edm):
            raise self.incompatible(prop, lit, op)
        if prop.edm == BINARY and op not in ("eq", "ne") and not self.binary_ranges:
            raise _invalid(
                f"The binary operator {OP_KIND[op]} is not defined for the types "
                "'System.Byte[]' and 'System.Byte[]'."
            )
        value = self.value_of(prop, lit)
        if prop.edm == STRING and self.case_insensitive:
            lowered = value.lower()
            if op == "eq":
                return lambda r: (x := get(r)) is not None and x.lower() == lowered
            if op == "ne":
                return lambda r: (x := get(r)) is None or x.lower() != lowered
            return lambda r: (x := get(r)) is not None and fn(x.lower(), lowered)
        if op in ("eq", "ne"):
            return lambda r: fn(get(r), value)
        return lambda r: (x := get(r)) is not None and fn(x, value)

    def membership(self, node: In) -> Predicate:
        if not isinstance(node.operand, Prop):
            raise _invalid("The left operand of 'in' must be a property.")
        prop = self.prop(node.operand)
        get = prop.get
        values: list[Any] = []
        for item in node.values:
            lit = item.literal
            if lit.edm == NULL:
                values.append(None)
                continue
            if not _compatible(prop.edm, lit.edm):
                raise self.incompatible(prop, lit, "eq")
            values.append(self.value_of(prop, lit))
        if prop.edm == STRING and self.case_insensitive:
            wanted = {v.lower() if isinstance(v, str) else v for v in values}

            def member(r: Row) -> bool:
                x = get(r)
                return (x.lower() if isinstance(x, str) else x) in wanted

            return member
        try:
            as_set = set(values)
        except TypeError:
            return lambda r: get(r) in values
        return lambda r: get(r) in as_set

    # -- functions ----------------------------------------------------------------------------

    def _string_args(self, node: Call) -> tuple[Property, str]:
        name = node.name
        args = node.args
        if len(args) != 2:
            raise _invalid(f"No function signature for the function with name '{name}' matches.")
        prop_arg, lit_arg = (args[1], args[0]) if name == "substringof" else args
        if not isinstance(prop_arg, Prop):
            which = "second" if name == "substringof" else "first"
            raise _invalid(f"The {which} argument of '{name}' must be a property.")
        prop = self.prop(prop_arg)
        if not isinstance(lit_arg, Lit) or prop.edm != STRING or lit_arg.literal.edm != STRING:
            raise _invalid(f"No function signature for the function with name '{name}' matches.")
        return prop, lit_arg.literal.value

    def function(self, node: Call) -> Predicate:
        prop, needle = self._string_args(node)
        get = prop.get
        method: Callable[[str, str], bool] = {
            "contains": str.__contains__,
            "substringof": str.__contains__,
            "startswith": str.startswith,
        }.get(node.name, str.endswith)
        if self.case_insensitive:
            lowered = needle.lower()
            return lambda r: (x := get(r)) is not None and method(x.lower(), lowered)
        return lambda r: (x := get(r)) is not None and method(x, needle)

    def compare_call(self, call: Call, op: str, right: Any) -> Predicate:
        if not isinstance(right, Lit):
            raise _invalid("Comparing two properties is not supported.")
        lit = right.literal
        if call.name in _BOOL_FUNCS:
            if lit.edm != BOOLEAN or op not in ("eq", "ne"):
                raise _invalid(
                    "A binary operator with incompatible types was detected. Found operand "
                    f"types 'Edm.Boolean' and '{lit.edm}' for operator kind '{OP_KIND[op]}'."
                )
            inner = self.function(call)
            want = bool(lit.value) == (op == "eq")
            return lambda r: inner(r) == want
        if call.name == "length":
            if len(call.args) != 1 or not isinstance(call.args[0], Prop):
                raise _invalid("No function signature for the function with name 'length' matches.")
            prop = self.prop(call.args[0])
            if prop.edm != STRING or lit.edm not in NUMERIC:
                raise _invalid("No function signature for the function with name 'length' matches.")
            get = prop.get
            fn = COMPARE_OPS[op]
            value = lit.value
            return lambda r: (x := get(r)) is not None and fn(len(x), value)
        raise _invalid(f"An unknown function with name '{call.name}' was found.")


def compile_filter(
    expr: FilterExpr,
    resolve: Resolver,
    *,
    type_name: str = "",
    case_insensitive: bool = False,
    binary_ranges: bool = False,
) -> Predicate:
    """A predicate over rows for a parsed ``$filter``; properties come from ``resolve``.

    ``case_insensitive`` compares strings like SQL Server's ``*_CI_AS`` collations;
    ``binary_ranges`` allows gt/ge/lt/le on Edm.Binary (ASP.NET OData only defines eq/ne).
    """
    compiler = _Compiler(expr, resolve, type_name, case_insensitive, binary_ranges)
    return compiler.compile(expr.tree)


def filter_predicate(
    text: str,
    resolve: Resolver,
    *,
    dialect: Dialect = ODATA_4,
    type_name: str = "",
    case_insensitive: bool = False,
    binary_ranges: bool = False,
) -> Predicate:
    """Parse and compile in one step."""
    return compile_filter(
        parse_filter(text, dialect),
        resolve,
        type_name=type_name,
        case_insensitive=case_insensitive,
        binary_ranges=binary_ranges,
    )


# ---------------------------------------------------------------------------------------------
# $select, $orderby, $top, $skip, paging


def parse_select(text: str, known: Collection[str], type_name: str = "") -> tuple[str, ...] | None:
    """``$select=A,B`` -> ("A", "B"); ``*`` -> None (every property)."""
    names: list[str] = []
    for part in text.split(","):
        name = part.strip()
        if name == "*":
            return None
        if name not in known:
            raise _invalid(f"Could not find a property named '{name}' on type '{type_name}'.")
        if name not in names:
            names.append(name)
    if not names:
        raise _invalid("$select must name at least one property.")
    return tuple(names)


def parse_orderby(
    text: str, known: Collection[str], type_name: str = ""
) -> tuple[tuple[str, bool], ...]:
    """``$orderby=A desc,B`` -> (("A", True), ("B", False)): (name, descending)."""
    items: list[tuple[str, bool]] = []
    for part in text.split(","):
        words = part.split()
        if not words or len(words) > 2:
            raise _invalid(f"Syntax error in $orderby '{text}'.")
        name = words[0]
        if name not in known:
            raise _invalid(f"Could not find a property named '{name}' on type '{type_name}'.")
        direction = words[1] if len(words) == 2 else "asc"
        if direction not in ("asc", "desc"):
            raise _invalid(f"Syntax error in $orderby '{text}': expected asc or desc.")
        items.append((name, direction == "desc"))
    return tuple(items)


def order_rows(
    rows: Iterable[Row],
    order: Sequence[tuple[str, bool]],
    key_for: Callable[[str], Callable[[Row], Any]],
) -> list[Row]:
    """Rows sorted by several keys (stable: ties keep the incoming order).

    ``key_for(name)`` must give a key that never is ``None`` (SQL Server sorts NULL lowest:
    map it to a minimum value).
    """
    result = list(rows)
    for name, desc in reversed(order):
        result.sort(key=key_for(name), reverse=desc)
    return result


def int_option(query: Mapping[str, str], name: str) -> int | None:
    """A non-negative integer option (``$top``, ``$skip``), None when absent."""
    if name not in query:
        return None
    text = query[name].strip()
    if not re.fullmatch(r"\d+", text):
        raise _invalid(f"Invalid value '{query[name]}' for {name} query option found.")
    return int(text)


NOT_SUPPORTED_OPTIONS = ("$expand", "$search", "$apply", "$compute", "$skiptoken")


def check_options(
    query: Mapping[str, str],
    allowed: Collection[str],
    not_supported: Collection[str] = NOT_SUPPORTED_OPTIONS,
) -> None:
    """Refuses ``$`` options the service does not take."""
    for name in query:
        if name.startswith("$") and name not in allowed:
            if name in not_supported:
                raise _invalid(f"Query option '{name}' is not supported by this service.")
            raise _invalid(f"The query parameter '{name}' is not supported.")


@dataclass(frozen=True)
class PagePlan:
    """Which rows one response carries, and what the next link asks for."""

    start: int
    size: int
    next_skip: int | None
    next_top: int | None

    @property
    def more(self) -> bool:
        return self.next_skip is not None


def plan_page(total: int, skip: int, top: int | None, max_rows: int) -> PagePlan:
    """Server-driven paging: at most ``max_rows`` per response, within ``$skip``/``$top``."""
    wanted = total - skip if top is None else min(top, max(0, total - skip))
    size = min(wanted, max_rows) if wanted > 0 else 0
    if wanted > size:
        return PagePlan(skip, size, skip + size, None if top is None else top - size)
    return PagePlan(skip, size, None, None)


def next_link(url: str, query: Iterable[tuple[str, str]], skip: int, top: int | None) -> str:
    """``url`` with the query's other options, then ``$top`` (if any) and ``$skip``."""
    parts: list[str] = []
    for name, value in query:
        if name in ("$skip", "$top"):
            continue
        parts.append(quote(name, safe="$") + "=" + quote(value, safe=",'()*:$/"))
    if top is not None:
        parts.append(f"$top={top}")
    parts.append(f"$skip={skip}")
    return f"{url}?{'&'.join(parts)}"
