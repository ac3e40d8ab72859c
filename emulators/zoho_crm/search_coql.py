"""Search (``GET /crm/v8/{module}/search``) and COQL (``POST /crm/v8/coql``).

Search is Zoho's index search, not a filter: ``equals`` on a text field matches records whose
value holds the given words (the last one as a prefix), case-insensitively, so ``P100`` also
finds ``P100-1`` ... ``P100-300``; results come most recently modified first, 200 a page,
2,000 at most. Never use it for an exact key lookup: COQL ``=`` and ``in (...)`` (at most 100
values) compare whole values.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from emulators.zoho_crm.errors import RequestError
from emulators.zoho_crm.options import MAX_PER_PAGE, MAX_SEARCH_CRITERIA, TOKEN_PAGE_LIMIT
from emulators.zoho_crm.org import Org
from emulators.zoho_crm.schema import NUMBER_TYPES, STRING_TYPES, TEXT_TYPES, FieldDef
from emulators.zoho_crm.store import ModuleStore, sort_n
from emulators.zoho_crm.wire import int_param, parse_datetime, read_json, to_number

Json = dict[str, Any]


# search criteria


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _split_unescaped(text: str, sep: str = ",") -> list[str]:
    parts: list[str] = []
    buf: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            buf.append(text[i : i + 2])
            i += 2
            continue
        if char == sep:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(char)
        i += 1
    parts.append("".join(buf))
    return [_unescape(part) for part in parts]


class CriteriaError(Exception):
    def __init__(self, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.details = {"reason": reason, **details}


def parse_criteria(text: str) -> tuple[Any, int]:
    """``((A:equals:x)and(B:starts_with:y))`` -> (tree, number of conditions)."""
    count = 0
    n = len(text)

    def skip(i: int) -> int:
        while i < n and text[i].isspace():
            i += 1
        return i

    def group(i: int) -> tuple[Any, int]:
        nonlocal count
        i = skip(i)
        if i >= n or text[i] != "(":
            raise CriteriaError("invalid criteria: '(' expected", position=i)
        i = skip(i + 1)
        if i < n and text[i] == "(":
            node, i = expr(i)
            i = skip(i)
            if i >= n or text[i] != ")":
                raise CriteriaError("invalid criteria: ')' expected", position=i)
            return node, i + 1
        buf: list[str] = []
        while i < n:
            char = text[i]
            if char == "\\" and i + 1 < n:
                buf.append(text[i : i + 2])
                i += 2
                continue
            if char == ")":
                break
            buf.append(char)
            i += 1
        if i >= n:
            raise CriteriaError("invalid criteria: ')' expected", position=i)
        body = "".join(buf)
        parts = body.split(":", 2)
        if len(parts) != 3:
            raise CriteriaError("invalid criteria", criteria=body)
        count += 1
        return ("cond", parts[0].strip(), parts[1].strip().lower(), parts[2]), i + 1

    def expr(i: int) -> tuple[Any, int]:
        node, i = group(i)
        operands = [node]
        operators: list[str] = []
        while True:
            j = skip(i)
            match = re.match(r"(and|or)\s*\(", text[j:], re.IGNORECASE)
            if not match:
                break
            operators.append(match.group(1).lower())
            node, i = group(j + len(match.group(1)))
            operands.append(node)
        # "and" binds tighter than "or"
        ors: list[Any] = [operands[0]]
        for operator, operand in zip(operators, operands[1:], strict=True):
            if operator == "and":
                ors[-1] = ("and", ors[-1], operand)
            else:
                ors.append(operand)
        tree = ors[0]
        for operand in ors[1:]:
            tree = ("or", tree, operand)
        return tree, i

    tree, end = expr(0)
    if skip(end) != n:
        raise CriteriaError("invalid criteria: unexpected text", position=end)
    return tree, count


# ---------------------------------------------------------------------------------------------
# COQL

_COQL_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^'\\]|\\.|'')*')"
    r"|(?P<num>-?\d+(?:\.\d+)?)(?![\w.])"
    r"|(?P<op><=|>=|!=|<>|=|<|>)"
    r"|(?P<punct>[(),*])"
    r"|(?P<word>[A-Za-z_$][\w$]*(?:\.[A-Za-z_$][\w$]*)*))"
)


class CoqlError(Exception):
    def __init__(self, code: str, message: str, details: Json) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


@dataclass
class CoqlQuery:
    fields: list[str]
    module: str
    where: Any
    order: list[tuple[str, bool]]
    offset: int
    limit: int


class CoqlParser:
    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, Any]] = []
        pos = 0
        text = text.strip().rstrip(";")
        while pos < len(text):
            match = _COQL_TOKEN.match(text, pos)
            if not match or match.end() == pos:
                if text[pos:].strip() == "":
                    break
                raise CoqlError(
                    "SYNTAX_ERROR",
                    f"error occured near {text[pos : pos + 20]!r}",
                    {"near": text[pos : pos + 20]},
                )
            kind = match.lastgroup or ""
            raw = match.group(kind)
            if kind == "str":
                value: Any = raw[1:-1].replace("''", "'")
                value = re.sub(r"\\(.)", r"\1", value)
            elif kind == "num":
                value = float(raw) if "." in raw else int(raw)
            else:
                value = raw
            self.tokens.append((kind, value))
            pos = match.end()
        self.i = 0

    def _peek(self) -> tuple[str, Any] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _kw(self, *words: str) -> str | None:
        token = self._peek()
        if token and token[0] == "word" and str(token[1]).lower() in words:
            self.i += 1
            return str(token[1]).lower()
        return None

    def _expect_kw(self, word: str, clause: str) -> None:
        if not self._kw(word):
            raise CoqlError("SYNTAX_ERROR", f"error occured in {clause} clause", {"clause": clause})

    def _punct(self, char: str) -> bool:
        token = self._peek()
        if token and token[0] == "punct" and token[1] == char:
            self.i += 1
            return True
        return False

    def _ident(self, clause: str) -> str:
        token = self._peek()
        if not token or token[0] != "word":
            raise CoqlError("SYNTAX_ERROR", f"error occured in {clause} clause", {"clause": clause})
        self.i += 1
        return str(token[1])

    def _int(self, clause: str) -> int:
        token = self._peek()
        if not token or token[0] != "num" or not isinstance(token[1], int) or token[1] < 0:
            raise CoqlError("SYNTAX_ERROR", f"error occured in {clause} clause", {"clause": clause})
        self.i += 1
        return int(token[1])

    def _literal(self) -> Any:
        token = self._peek()
        if token is None:
            raise CoqlError("SYNTAX_ERROR", "error occured in where clause", {"clause": "where"})
        self.i += 1
        kind, value = token
        if kind in ("str", "num"):
            return value
        if kind == "word" and str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
        if kind == "word" and str(value).lower() == "null":
            return None
        raise CoqlError("SYNTAX_ERROR", "error occured in where clause", {"clause": "where"})

    def parse(self) -> CoqlQuery:
        self._expect_kw("select", "select")
        if self._punct("*"):
            raise CoqlError("SYNTAX_ERROR", "error occured in select clause", {"clause": "select"})
        names = [self._ident("select")]
        while self._punct(","):
            names.append(self._ident("select"))
        self._expect_kw("from", "from")
        module = self._ident("from")
        where = None
        if self._kw("where"):
            where = self._cond()
        order: list[tuple[str, bool]] = []
        if self._kw("order"):
            self._expect_kw("by", "order by")
            while True:
                name = self._ident("order by")
                direction = self._kw("asc", "desc")
                order.append((name, direction == "desc"))
                if not self._punct(","):
                    break
        offset, limit = 0, 200
        if self._kw("limit"):
            first = self._int("limit")
            if self._punct(","):
                offset, limit = first, self._int("limit")
            else:
                limit = first
        if self._kw("offset"):
            offset = self._int("offset")
        trailing = self._peek()
        if trailing is not None:
            raise CoqlError(
                "SYNTAX_ERROR", f"error occured near {trailing[1]!r}", {"near": str(trailing[1])}
            )
        return CoqlQuery(names, module, where, order, offset, limit)

    def _cond(self) -> Any:
        left = self._factor()
        connective = self._kw("and", "or")
        if connective is None:
            return left
        right = self._factor()
        if self._kw("and", "or"):
            raise CoqlError(
                "SYNTAX_ERROR",
                "more than two criteria must be grouped with brackets",
                {"clause": "where"},
            )
        return (connective, left, right)

    def _factor(self) -> Any:
        if self._punct("("):
            node = self._cond()
            if not self._punct(")"):
                raise CoqlError(
                    "SYNTAX_ERROR", "error occured in where clause", {"clause": "where"}
                )
            return node
        name = self._ident("where")
        if self._kw("is"):
            negate = bool(self._kw("not"))
            self._expect_kw("null", "where")
            return ("isnull", name, negate)
        negate = bool(self._kw("not"))
        if self._kw("like"):
            return ("like", name, self._literal(), negate)
        if self._kw("in"):
            if not self._punct("("):
                raise CoqlError(
                    "SYNTAX_ERROR", "error occured in where clause", {"clause": "where"}
                )
            values = [self._literal()]
            while self._punct(","):
                values.append(self._literal())
            if not self._punct(")"):
                raise CoqlError(
                    "SYNTAX_ERROR", "error occured in where clause", {"clause": "where"}
                )
            return ("in", name, values, negate)
        if self._kw("between"):
            low = self._literal()
            self._expect_kw("and", "where")
            return ("between", name, low, self._literal(), negate)
        if negate:
            raise CoqlError("SYNTAX_ERROR", "error occured in where clause", {"clause": "where"})
        token = self._peek()
        if not token or token[0] != "op":
            raise CoqlError("SYNTAX_ERROR", "error occured in where clause", {"clause": "where"})
        self.i += 1
        return ("cmp", name, "!=" if token[1] == "<>" else token[1], self._literal())


_WORD_RE = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The words of a text as Zoho's search index sees them: runs of letters and digits,
    case-folded (``P100-7`` is ``p100`` and ``7``)."""
    return _WORD_RE.findall(text.casefold())


def index_match(have: str, want: str, mode: str = "word_prefix") -> bool:
    """Search ``equals`` on a text value (both case-folded already).

    'word_prefix': the value holds the wanted words in a row, the last one as a word prefix
    (``p100`` matches ``p100``, ``p100-7``, ``acme p1000``; not ``xp100``); 'contains': a
    substring; 'exact': the whole value.
    """
    if mode == "exact":
        return have == want
    if mode == "contains":
        return want in have
    wanted = words(want)
    if not wanted:
        return bool(want.strip()) and want in have
    held = words(have)
    n = len(wanted)
    head, last = wanted[:-1], wanted[-1]
    return any(
        held[i : i + n - 1] == head and held[i + n - 1].startswith(last)
        for i in range(len(held) - n + 1)
    )


SEARCH_ORDERS: dict[str, Callable[[Json], tuple[float, int]]] = {
    "modified_desc": lambda r: (-r["_m"], -r["_n"]),
    "created_desc": lambda r: (-r["_c"], -r["_n"]),
    "created_asc": lambda r: (r["_c"], r["_n"]),
}


class SearchApi:
    """Handlers of ``/{module}/search`` and ``/coql``."""

    def __init__(self, org: Org) -> None:
        self.org = org

    # -- search -------------------------------------------------------------------------------

    def _criterion(self, store: ModuleStore, field_name: str, operator: str, raw: str) -> Any:
        operators = {
            "equals",
            "not_equal",
            "starts_with",
            "in",
            "greater_than",
            "greater_equal",
            "less_than",
            "less_equal",
            "between",
        }
        if operator not in operators:
            raise CriteriaError("invalid operator found", operator=operator, api_name=field_name)
        if field_name == "id":
            fdef = FieldDef("id", "bigint")
        else:
            found = store.mdef.fields.get(field_name)
            if found is None or found.data_type in ("subform", "multiselectpicklist"):
                raise CriteriaError("the api name given seems to be invalid", api_name=field_name)
            fdef = found
        values = (
            _split_unescaped(raw) if operator in ("in", "between") else [_unescape(raw.strip())]
        )
        if operator == "between" and len(values) != 2:
            raise CriteriaError("between needs two values", api_name=field_name)
        return fdef, operator, values

    def _compare_key(self, fdef: FieldDef, value: Any) -> Any:
        dtype = fdef.data_type
        if dtype in NUMBER_TYPES and fdef.api_name != "id":
            return to_number(value)
        if dtype == "datetime":
            if isinstance(value, (int, float)):
                return float(value)
            return parse_datetime(str(value))
        if dtype == "boolean":
            return value if isinstance(value, bool) else str(value).lower() == "true"
        return str(value).casefold()

    def _match(self, store: ModuleStore, record: Json, node: Any) -> bool:
        kind = node[0]
        if kind == "and":
            return self._match(store, record, node[1]) and self._match(store, record, node[2])
        if kind == "or":
            return self._match(store, record, node[1]) or self._match(store, record, node[2])
        fdef, operator, values = node[1]
        value = self.org.raw_value(record, fdef.api_name)
        if value is None:
            return operator == "not_equal"
        dtype = fdef.data_type
        if dtype in ("lookup", "ownerlookup"):
            if dtype == "lookup":
                name = self.org.display_name(fdef.lookup_module or "", value) or ""
            else:
                name = str(self.org.user_of(value).get("name") or "")
            candidates = [value.casefold(), name.casefold()]
            wanted = [v.casefold() for v in values]
            if operator == "equals":
                return wanted[0] == candidates[0] or index_match(
                    candidates[1], wanted[0], self.org.opts.search_equals
                )
            if operator == "not_equal":
                return wanted[0] not in candidates
            if operator == "starts_with":
                return candidates[1].startswith(wanted[0])
            if operator == "in":
                return any(w in candidates for w in wanted)
            return False
        have = self._compare_key(fdef, value)
        wanted_keys = [self._compare_key(fdef, v) for v in values]
        if any(w is None for w in wanted_keys) or have is None:
            return False
        want = wanted_keys[0]
        text_like = dtype in TEXT_TYPES and fdef.api_name != "id"
        if operator == "equals":
            if text_like:
                return index_match(have, want, self.org.opts.search_equals)
            return bool(have == want)
        if operator == "not_equal":
            return bool(have != want)
        if operator == "starts_with":
            return isinstance(have, str) and have.startswith(str(want))
        if operator == "in":
            return have in wanted_keys
        try:
            if operator == "greater_than":
                return bool(have > want)
            if operator == "greater_equal":
                return bool(have >= want)
            if operator == "less_than":
                return bool(have < want)
            if operator == "less_equal":
                return bool(have <= want)
            if operator == "between":
                return bool(wanted_keys[0] <= have <= wanted_keys[1])
        except TypeError:
            return False
        return False

    def search(self, request: web.Request, store: ModuleStore) -> web.Response:
        query = request.query
        names = self.org.fields_param(store, query.get("fields"), required=False)
        per_page = min(int_param(request, "per_page", MAX_PER_PAGE), MAX_PER_PAGE)
        page = int_param(request, "page", 1)
        defs = store.mdef.fields
        predicate: Callable[[Json], bool]
        if query.get("criteria"):
            try:
                tree, count = parse_criteria(query["criteria"])
                if count > MAX_SEARCH_CRITERIA:
                    raise CriteriaError(
                        f"more than {MAX_SEARCH_CRITERIA} criteria", limit=MAX_SEARCH_CRITERIA
                    )
                tree = self._bind_criteria(store, tree)
            except CriteriaError as exc:
                raise RequestError(
                    400, "INVALID_QUERY", "Invalid query formed", exc.details
                ) from exc

            def predicate(record: Json) -> bool:
                return self._match(store, record, tree)

        elif query.get("email"):
            email = query["email"].strip().casefold()
            email_fields = [f.api_name for f in defs.values() if f.data_type == "email"]

            def predicate(record: Json) -> bool:
                return any(str(record.get(f, "")).casefold() == email for f in email_fields)

        elif query.get("phone"):
            digits = re.sub(r"\D", "", query["phone"])
            phone_fields = [f.api_name for f in defs.values() if f.data_type == "phone"]

            def predicate(record: Json) -> bool:
                return bool(digits) and any(
                    digits in re.sub(r"\D", "", str(record.get(f, ""))) for f in phone_fields
                )

        elif query.get("word"):
            word = query["word"].strip().casefold()
            text_fields = [f.api_name for f in defs.values() if f.data_type in STRING_TYPES]

            def predicate(record: Json) -> bool:
                return any(
                    index_match(str(record.get(f, "")).casefold(), word) for f in text_fields
                )

        else:
            raise RequestError(
                400,
                "REQUIRED_PARAM_MISSING",
                "One of the expected parameter is missing",
                {"param_name": "criteria"},
            )
        cap = self.org.opts.search_max_results
        start = (page - 1) * per_page
        if start >= cap:
            raise RequestError(
                400,
                "LIMIT_REACHED",
                f"search results are limited to {cap} records",
                {"limit": cap},
            )
        order = SEARCH_ORDERS.get(self.org.opts.search_order, SEARCH_ORDERS["modified_desc"])
        matches = sorted((r for r in store.records.values() if predicate(r)), key=order)[:cap]
        window = matches[start : start + per_page]
        if not window:
            return web.Response(status=204)
        data = [self.org.render(store, record, names, subforms=False) for record in window]
        return web.json_response(
            {
                "data": data,
                "info": {
                    "per_page": per_page,
                    "count": len(data),
                    "page": page,
                    "more_records": start + len(window) < len(matches),
                },
            }
        )

    def _bind_criteria(self, store: ModuleStore, node: Any) -> Any:
        if node[0] in ("and", "or"):
            return (
                node[0],
                self._bind_criteria(store, node[1]),
                self._bind_criteria(store, node[2]),
            )
        _, field_name, operator, raw = node
        return ("cond", self._criterion(store, field_name, operator, raw))

    # -- COQL ---------------------------------------------------------------------------------

    def _coql_field(
        self, store: ModuleStore, path: str
    ) -> tuple[ModuleStore, FieldDef, str | None]:
        """``Field`` or ``Lookup.Field`` -> (store of the final field, its def, lookup hop)."""
        head, _, tail = path.partition(".")
        if head == "id" and not tail:
            return store, FieldDef("id", "bigint"), None
        fdef = store.mdef.fields.get(head)
        if fdef is None or fdef.data_type == "subform":
            raise CoqlError(
                "INVALID_QUERY", "column given seems to be invalid", {"column_name": path}
            )
        if not tail:
            return store, fdef, None
        if fdef.data_type != "lookup" or not fdef.lookup_module:
            raise CoqlError(
                "INVALID_QUERY", "column given seems to be invalid", {"column_name": path}
            )
        target = self.org.stores[fdef.lookup_module]
        if tail == "id":
            return target, FieldDef("id", "bigint"), head
        sub = target.mdef.fields.get(tail)
        if sub is None or sub.data_type == "subform":
            raise CoqlError(
                "INVALID_QUERY", "column given seems to be invalid", {"column_name": path}
            )
        return target, sub, head

    def _coql_raw(self, record: Json, bound: tuple[ModuleStore, FieldDef, str | None]) -> Any:
        target, fdef, hop = bound
        if hop is not None:
            linked = record.get(hop)
            if linked is None:
                return None
            record = target.records.get(linked) or {}
            if not record:
                return None
        return self.org.raw_value(record, fdef.api_name)

    def _coql_key(self, fdef: FieldDef, value: Any) -> Any:
        if value is None:
            return None
        dtype = fdef.data_type
        if fdef.api_name == "id" or dtype in ("lookup", "ownerlookup"):
            return str(value)
        if dtype in NUMBER_TYPES:
            return to_number(value)
        if dtype == "datetime":
            if isinstance(value, (int, float)):
                return float(value)
            return parse_datetime(str(value))
        if dtype == "boolean":
            return bool(value)
        return str(value).casefold() if self.org.opts.coql_case_insensitive else str(value)

    def _coql_bind(self, store: ModuleStore, node: Any) -> Any:
        kind = node[0]
        if kind in ("and", "or"):
            return (kind, self._coql_bind(store, node[1]), self._coql_bind(store, node[2]))
        bound = self._coql_field(store, node[1])
        if kind == "in":
            keys = {self._coql_key(bound[1], v) for v in node[2]}
            keys.discard(None)
            return (kind, bound, frozenset(keys), node[3])
        return (kind, bound, *node[2:])

    def _coql_limits(self, node: Any) -> int:
        """Checks the WHERE clause against COQL's limits; returns its number of criteria."""
        kind = node[0]
        if kind in ("and", "or"):
            return self._coql_limits(node[1]) + self._coql_limits(node[2])
        most = self.org.opts.coql_max_in_values
        if kind == "in" and len(node[2]) > most:
            raise CoqlError(
                "LIMIT_EXCEEDED",
                f"in and not in take at most {most} values",
                {"clause": "where", "column_name": node[1], "limit": most},
            )
        return 1

    def _coql_match(self, record: Json, node: Any) -> bool:
        kind = node[0]
        if kind == "and":
            return self._coql_match(record, node[1]) and self._coql_match(record, node[2])
        if kind == "or":
            return self._coql_match(record, node[1]) or self._coql_match(record, node[2])
        bound = node[1]
        fdef = bound[1]
        raw = self._coql_raw(record, bound)
        if kind == "isnull":
            is_null = raw is None or raw == ""
            return is_null != node[2]
        have = self._coql_key(fdef, raw)
        if kind == "like":
            if have is None:
                return False
            text = str(node[2])
            if self.org.opts.coql_case_insensitive:
                text = text.casefold()
            pattern = "".join(
                ".*" if ch == "%" else "." if ch == "_" else re.escape(ch) for ch in text
            )
            return bool(re.fullmatch(pattern, str(have), re.DOTALL)) != node[3]
        if kind == "in":
            if have is None:
                return False
            return (have in node[2]) != node[3]
        if kind == "between":
            low, high = self._coql_key(fdef, node[2]), self._coql_key(fdef, node[3])
            if have is None or low is None or high is None:
                return False
            try:
                return bool(low <= have <= high) != node[4]
            except TypeError:
                return False
        operator, literal = node[2], node[3]
        want = self._coql_key(fdef, literal)
        if have is None or want is None:
            return operator == "!=" and (have is None) != (want is None)
        try:
            return {
                "=": have == want,
                "!=": have != want,
                "<": have < want,
                "<=": have <= want,
                ">": have > want,
                ">=": have >= want,
            }[operator]
        except TypeError:
            return False

    async def coql(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        query = body.get("select_query") if isinstance(body, dict) else None
        if not isinstance(query, str) or not query.strip():
            raise RequestError(
                400,
                "MANDATORY_NOT_FOUND",
                "required field not found",
                {"api_name": "select_query", "json_path": "$.select_query"},
            )
        try:
            parsed = CoqlParser(query).parse()
            store = self.org.stores.get(parsed.module)
            if store is None:
                raise CoqlError(
                    "INVALID_QUERY", "module given seems to be invalid", {"module": parsed.module}
                )
            if parsed.limit > self.org.opts.coql_max_limit or parsed.limit < 1:
                raise CoqlError(
                    "LIMIT_EXCEEDED",
                    f"limit can be at most {self.org.opts.coql_max_limit}",
                    {"limit": self.org.opts.coql_max_limit},
                )
            if parsed.offset + parsed.limit > TOKEN_PAGE_LIMIT:
                raise CoqlError(
                    "LIMIT_EXCEEDED",
                    f"offset and limit exceed {TOKEN_PAGE_LIMIT}",
                    {"limit": TOKEN_PAGE_LIMIT},
                )
            if parsed.where is not None:
                criteria = self._coql_limits(parsed.where)
                most = self.org.opts.coql_max_criteria
                if criteria > most:
                    raise CoqlError(
                        "LIMIT_EXCEEDED",
                        f"the where clause can have at most {most} criteria",
                        {"clause": "where", "limit": most},
                    )
            selected = [(name, self._coql_field(store, name)) for name in parsed.fields]
            where = self._coql_bind(store, parsed.where) if parsed.where is not None else None
            order = [(self._coql_field(store, name), desc) for name, desc in parsed.order]
        except CoqlError as exc:
            raise RequestError(400, exc.code, str(exc), exc.details) from exc
        records = [r for r in store.records.values() if where is None or self._coql_match(r, where)]
        records.sort(key=sort_n)
        for bound, desc in reversed(order):
            fdef = bound[1]
            present = [
                r for r in records if self._coql_key(fdef, self._coql_raw(r, bound)) is not None
            ]
            missing = [r for r in records if self._coql_key(fdef, self._coql_raw(r, bound)) is None]

            def sort_key(r: Json, b: Any = bound, f: FieldDef = fdef) -> Any:
                return self._coql_key(f, self._coql_raw(r, b))

            present.sort(key=sort_key, reverse=desc)
            records = present + missing if not desc else missing + present
        window = records[parsed.offset : parsed.offset + parsed.limit]
        if not window:
            return web.Response(status=204)
        data = []
        for record in window:
            row: Json = {"id": record["id"]}
            for name, bound in selected:
                fdef = bound[1]
                raw = self._coql_raw(record, bound)
                if raw is None:
                    row[name] = None
                elif fdef.data_type in ("lookup", "ownerlookup"):
                    row[name] = {"id": raw}
                elif fdef.data_type == "datetime":
                    row[name] = self.org.fmt_time(raw)
                else:
                    row[name] = raw
            data.append(row)
        return web.json_response(
            {
                "data": data,
                "info": {
                    "count": len(data),
                    "more_records": parsed.offset + len(window) < len(records),
                },
            }
        )
