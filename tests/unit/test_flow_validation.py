"""Flow files are validated at ``flows apply``: what would fail at run time (or take the
process down) is refused up front, with one line per problem naming the file, the flow and the
field."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.flows import FlowFileError, load_flow_file, parse_duration

ROOT = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "name": "demo",
    "source": "erp",
    "target": "crm",
    "poll_interval": "10m",
    "lookups": {"terms_days": {"30": 30, "default": 30}},
    "entities": [
        {
            "name": "customers",
            "source": {"entity": "ArCustomer", "key": ["Customer"]},
            "target": {"entity": "Accounts", "match_on": ["ERP_No"]},
            "fields": {
                "ERP_No": {"from": "Customer"},
                "Account_Name": {"template": "{Name} ({Customer})", "max_length": 200},
            },
        },
        {
            "name": "invoices",
            "source": {
                "entity": "ArInvoice",
                "key": ["Customer", "Invoice"],
                "change_detection": {"field": "InvoiceDate", "overlap": "7d", "full_every": "1h"},
            },
            "target": {"entity": "Deals", "match_on": ["Key"]},
            "fields": {
                "Key": {"template": "{Customer}|{Invoice}"},
                "Due": {
                    "compute": "add_days",
                    "args": {
                        "date": "InvoiceDate",
                        "days": {"from": "Terms", "lookup": "terms_days"},
                    },
                },
                "Account": {
                    "parent": "customers",
                    "key": "{Customer}",
                    "match": {"field": "ERP_No", "value": "{Customer}"},
                },
            },
        },
    ],
}


def _write(tmp_path: Path, text: str, name: str = "flow.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _variant(**changes: Any) -> dict[str, Any]:
    """BASE with values replaced at dotted paths (``entities.1.fields.Key.template``)."""
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(last) if isinstance(node, list) else last] = value
    return data


def _refused(tmp_path: Path, data: dict[str, Any] | str, *expected: str) -> str:
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    path = _write(tmp_path, text)
    started = time.monotonic()
    with pytest.raises(FlowFileError) as info:
        load_flow_file(path)
    assert time.monotonic() - started < 2, "validation must be quick"
    message = str(info.value)
    lines = message.splitlines()
    assert lines and all(line.startswith(f"{path}:") for line in lines), message
    for part in expected:
        assert part in message, message
    return message


def test_the_base_flow_and_the_shipped_flows_are_valid(tmp_path: Path) -> None:
    flow = load_flow_file(_write(tmp_path, yaml.safe_dump(BASE)))
    assert flow.poll_interval == 600
    for path in sorted((ROOT / "flows").glob("*.yaml")):
        load_flow_file(path)


@pytest.mark.parametrize(
    "template",
    [
        "{Name.__class__}",
        "{Name.__class__.__mro__}",
        "{Name[0]}",
        "{Name:x>999999999}",
        "{Name:>10}",
        "{Name!r}",
        "{}",
        "{0}",
        "{Name:{Customer}}",
        "{Name",
        "Name}",
    ],
)
@pytest.mark.parametrize(
    ("where", "path"),
    [
        ("template", "entities.0.fields.Account_Name.template"),
        ("parent key", "entities.1.fields.Account.key"),
        ("match value", "entities.1.fields.Account.match.value"),
    ],
)
def test_a_template_can_only_name_columns(
    tmp_path: Path, template: str, where: str, path: str
) -> None:
    field = ".".join(path.split(".")[:4]).replace(".0.", "[0].").replace(".1.", "[1].")
    message = _refused(tmp_path, _variant(**{path: template}), "flow 'demo'", field)
    assert "template" in message


def test_escaped_braces_and_plain_columns_are_fine(tmp_path: Path) -> None:
    data = _variant(**{"entities.0.fields.Account_Name.template": "{{x}} {Name} {_ItemId2}"})
    load_flow_file(_write(tmp_path, yaml.safe_dump(data)))


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("entities.0.fields.Account_Name.max_length", -5, "max_length"),
        ("entities.0.fields.Account_Name.max_length", 0, "max_length"),
        ("entities.0.fields.Account_Name.places", 10**6, "places"),
        ("entities.0.fields.Account_Name.places", -3, "places"),
        ("entities.1.fields.Due.args.days", 10**9, "entities[1] (invoices).fields.Due.args.days: "),
        ("entities.1.fields.Due.args.days", -40_000, "args.days"),
        ("entities.1.fields.Due.args.days", 1.5, "args.days"),
        ("entities.1.fields.Due.args.days", {"value": 99_999_999}, "args.days"),
        ("lookups.terms_days.60", 999_999_999, "args.days"),
        ("lookups.terms_days.60", "soon", "args.days"),
    ],
)
def test_numbers_that_fail_at_run_time_are_refused(
    tmp_path: Path, path: str, value: Any, expected: str
) -> None:
    _refused(tmp_path, _variant(**{path: value}), "flow 'demo'", expected)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("entities.0.target.entity", "Accounts/../../settings"),
        ("entities.0.target.entity", "../Deals"),
        ("entities.0.target.entity", "Accounts?fields=*"),
        ("entities.0.target.entity", "Accounts "),
        ("entities.0.target.entity", ""),
        ("entities.0.source.entity", "ArCustomer?$top=1"),
        ("entities.0.source.entity", "a" * 500),
        ("entities.0.source.key", ["Customer,Name"]),
        ("entities.1.source.change_detection.field", "InvoiceDate desc"),
        ("entities.0.fields.ERP_No.from", "Customer.__class__"),
        ("entities.1.fields.Account.match.field", "ERP_No or 1=1"),
        ("entities.0.target.match_on", ["ERP No"]),
    ],
)
def test_names_are_api_identifiers(tmp_path: Path, path: str, value: Any) -> None:
    _refused(tmp_path, _variant(**{path: value}), "flow 'demo'", "entities[")


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("poll_interval", float("inf"), "poll_interval: "),
        ("poll_interval", float("nan"), "poll_interval: "),
        ("poll_interval", "9" * 400, "poll_interval: "),
        ("poll_interval", "99999999999d", "too long"),
        ("poll_interval", "8d", "too long"),
        ("poll_interval", 0.5, "too short"),
        ("poll_interval", -10, "negative"),
        ("entities.1.source.change_detection.overlap", float("inf"), "overlap"),
        ("entities.1.source.change_detection.overlap", "400d", "overlap"),
        ("entities.1.source.change_detection.full_every", float("inf"), "full_every"),
        ("entities.1.source.change_detection.full_every", "0.5s", "full_every"),
    ],
)
def test_durations_are_finite_and_bounded(
    tmp_path: Path, path: str, value: Any, expected: str
) -> None:
    _refused(tmp_path, _variant(**{path: value}), "flow 'demo'", expected)


def test_an_infinite_poll_interval_in_yaml_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    text = yaml.safe_dump(BASE).replace("poll_interval: 10m", "poll_interval: .inf")
    assert "poll_interval: .inf" in text
    _refused(tmp_path, text, "flow 'demo': poll_interval: ", "too long")


def test_computes_are_called_as_they_are_defined(tmp_path: Path) -> None:
    _refused(
        tmp_path,
        _variant(**{"entities.1.fields.Due.args.dais": 30}),
        "entities[1] (invoices).fields.Due: compute add_days: ",
        "unexpected keyword argument 'dais'",
    )
    _refused(
        tmp_path,
        _variant(**{"entities.1.fields.Due.args": {"date": "InvoiceDate"}}),
        "missing a required argument: 'days'",
    )
    _refused(
        tmp_path,
        _variant(**{"entities.1.fields.Due.args.days": {"from": "Terms", "lookup": "nope"}}),
        "entities[1] (invoices).fields.Due.args.days: unknown lookup table 'nope'",
    )
    _refused(
        tmp_path,
        _variant(**{"entities.1.fields.Due.args.date": {"template": "{InvoiceDate!s}"}}),
        "entities[1].fields.Due: ",
        "args.date.template: ",
    )


def test_a_match_field_must_be_mapped(tmp_path: Path) -> None:
    _refused(
        tmp_path,
        _variant(**{"entities.0.target.match_on": ["Nope"]}),
        "entities[0]: Value error, target.match_on: 'Nope' is not one of the fields",
    )


def test_duplicate_yaml_keys_are_refused_not_merged(tmp_path: Path) -> None:
    text = yaml.safe_dump(BASE, sort_keys=False)
    top = text + "poll_interval: 1h\n"
    _refused(tmp_path, top, "duplicate key 'poll_interval' (first on line")
    nested = text.replace(
        "    ERP_No:\n      from: Customer\n",
        "    ERP_No:\n      from: Customer\n    ERP_No:\n      from: Name\n",
    )
    assert nested != text
    _refused(tmp_path, nested, "duplicate key 'ERP_No'")


def test_a_billion_laughs_file_is_refused_quickly(tmp_path: Path) -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        prev = chr(ord("a") + i - 1)
        name = chr(ord("a") + i)
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    lines.append("name: demo")
    _refused(tmp_path, "\n".join(lines) + "\n", "aliases (*name) are not allowed", "line 2")


def test_deep_nesting_and_big_or_binary_files_are_refused(tmp_path: Path) -> None:
    _refused(tmp_path, "name: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested more than")
    _refused(tmp_path, "name: demo\n" + "# padding\n" * 120_000, "larger than 1,000,000 bytes")
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"name: \xff\xfe\x00\x01 demo\n")
    with pytest.raises(FlowFileError, match="not UTF-8 text"):
        load_flow_file(path)


def test_yaml_syntax_errors_are_one_line(tmp_path: Path) -> None:
    message = _refused(tmp_path, "name: [unclosed\nsource: a\n", "not valid YAML", "line ")
    assert len(message.splitlines()) == 1


def test_parse_duration_refuses_what_is_not_finite() -> None:
    assert parse_duration("45d", maximum=100 * 86400) == 45 * 86400
    for value in (float("inf"), float("nan"), "9" * 400, -1, True):
        with pytest.raises(ValueError):
            parse_duration(value)
    with pytest.raises(ValueError, match="too long"):
        parse_duration("99999999999d", maximum=36500 * 86400)
