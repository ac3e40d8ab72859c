"""Every failure goes through the one classification: unknown exceptions, outages of our own
database and broker, configuration errors; records validated one by one, the bad ones grouped
into one dead letter; dead letters of any shape read back."""

from __future__ import annotations

import asyncio
import json
import socket
from datetime import UTC, datetime
from typing import Any

import aiohttp
import aiormq
import asyncpg
import pytest

from services.ops.dlq import DeadLetter, Filters
from shared import bus as busmod
from shared.bus import RecordFailure, UnroutableError, record_errors, summarize
from shared.connections import ConnectionConfigError
from shared.failures import (
    FailureClass,
    MappingError,
    TransientError,
    classify,
    describe,
    exception_name,
    is_infrastructure,
)
from shared.flow_store import FlowNotFoundError
from shared.messages import (
    SCHEMA_VERSION,
    ChangeBatch,
    ChangeEvent,
    MessageFormatError,
    decode,
    decode_records,
)
from shared.retry import RetryPolicy, call_with_retries
from shared.vault import VaultError

# -- the classification -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc", [ZeroDivisionError("division by zero"), KeyError("Name"), RuntimeError("odd")]
)
def test_an_unknown_exception_is_transient_and_named_by_its_class(exc: Exception) -> None:
    assert classify(exc) is FailureClass.TRANSIENT
    assert describe(exc).startswith(f"{type(exc).__name__}: ")
    assert not is_infrastructure(exc)


async def test_a_cancellation_is_never_retried() -> None:
    assert classify(asyncio.CancelledError()) is FailureClass.PERMANENT
    assert classify(KeyboardInterrupt()) is FailureClass.PERMANENT
    calls: list[int] = []

    async def call() -> None:
        calls.append(1)
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await call_with_retries(call, policy=RetryPolicy(attempts=3, base_delay_s=0.01))
    assert calls == [1]


def test_describe_keeps_our_own_errors_as_they_are_and_on_one_line() -> None:
    assert describe(TransientError("HTTP 503 from target")) == "HTTP 503 from target"
    assert describe(MappingError("field X: required value is empty")).startswith("field X")
    assert describe(ValueError("two\nlines")) == "ValueError: two lines"
    assert describe(ZeroDivisionError()) == "ZeroDivisionError"
    assert exception_name(ZeroDivisionError()) == "ZeroDivisionError"
    assert exception_name(asyncpg.CannotConnectNowError()) == (
        "asyncpg.exceptions.CannotConnectNowError"
    )


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
        asyncpg.exceptions.TooManyConnectionsError("too many clients"),
        aiormq.exceptions.AMQPConnectionError("connection reset"),
        aiormq.exceptions.ChannelInvalidStateError("channel closed"),
    ],
)
def test_outages_of_our_database_and_broker_are_infrastructure(exc: Exception) -> None:
    assert is_infrastructure(exc)
    assert classify(exc) is FailureClass.TRANSIENT


async def test_a_refused_connection_is_infrastructure_only_from_our_own_clients() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(OSError) as from_asyncpg:
        await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/x", timeout=5)
    assert is_infrastructure(from_asyncpg.value)
    # the same error anywhere else (a vendor's API) is not ours
    assert not is_infrastructure(ConnectionRefusedError(111, "Connection refused"))
    assert not is_infrastructure(aiohttp.ClientConnectionError("refused"))
    assert not is_infrastructure(TransientError("cannot connect to zoho"))
    # the broker answers and refuses us: configuration, waiting does not heal it
    assert not is_infrastructure(aiormq.exceptions.AuthenticationError("ACCESS_REFUSED"))
    # wrapped: the cause decides
    wrapped = RuntimeError("flush failed")
    wrapped.__cause__ = asyncpg.exceptions.CannotConnectNowError()
    assert is_infrastructure(wrapped)


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionConfigError("no connection named 'zoho'"),
        VaultError("secret of 'zoho' failed authentication"),
        FlowNotFoundError("no flow named 'x'"),
        MessageFormatError("invalid change_batch message"),
        UnroutableError("no queue is bound"),
    ],
)
def test_configuration_errors_are_permanent(exc: Exception) -> None:
    assert classify(exc) is FailureClass.PERMANENT
    assert not is_infrastructure(exc)


# -- one record at a time ---------------------------------------------------------------------


def _event(key: str, **extra: Any) -> dict[str, Any]:
    event = ChangeEvent(
        flow="f",
        flow_version=1,
        source_connection="syspro",
        source_system="syspro",
        entity="ArCustomer",
        key=key,
        version="v1",
        record={"Customer": key},
    )
    return {**json.loads(event.model_dump_json()), **extra}


def _body(events: list[dict[str, Any]], **extra: Any) -> bytes:
    batch = json.loads(ChangeBatch(flow="f", entity="ArCustomer", events=[]).model_dump_json())
    return json.dumps({**batch, "events": events, **extra}).encode()


def test_a_valid_batch_decodes_whole() -> None:
    body = _body([_event("C1"), _event("C2")])
    decoded = decode_records("change_batch", body)
    assert decoded.rejected == []
    assert isinstance(decoded.message, ChangeBatch)
    assert [e.key for e in decoded.message.events] == ["C1", "C2"]


def test_invalid_records_are_set_aside_with_the_reason_and_the_others_kept() -> None:
    no_record = _event("C2")
    del no_record["record"]
    body = _body(
        [_event("C1"), no_record, _event("C3", schema_version=99), _event("C4"), "not a record"]
    )
    with pytest.raises(MessageFormatError):
        decode("change_batch", body)  # all or nothing refuses everything
    decoded = decode_records("change_batch", body)
    assert isinstance(decoded.message, ChangeBatch)
    assert [e.key for e in decoded.message.events] == ["C1", "C4"]
    reasons = {r.ref: r.reason for r in decoded.rejected}
    assert list(reasons) == ["syspro:ArCustomer:C2", "syspro:ArCustomer:C3", "#4"]
    assert reasons["syspro:ArCustomer:C2"] == "record: Field required"
    assert (
        "schema_version 99 is not a schema version this build knows (1)"
        in (reasons["syspro:ArCustomer:C3"])
    )
    summary = decoded.summary()
    assert summary.startswith("3 of 5 records invalid: syspro:ArCustomer:C2: record")
    # the letter of the rejected ones carries them as they came, in the batch's envelope
    letter = json.loads(decoded.rejected_body())
    assert letter["flow"] == "f" and [e.get("key") for e in letter["events"][:2]] == ["C2", "C3"]
    assert letter["events"][2] == "not a record"


def test_a_schema_version_this_build_does_not_know_is_refused_with_its_number() -> None:
    assert SCHEMA_VERSION == 1
    with pytest.raises(MessageFormatError, match="schema_version 99 is not a schema version"):
        decode_records("change_batch", _body([_event("C1")], schema_version=99))
    decoded = decode_records("change_batch", _body([_event("C1", schema_version=99)]))
    assert decoded.message is None and len(decoded.rejected) == 1
    with pytest.raises(MessageFormatError, match="schema_version 99"):
        decode("change_batch", _body([_event("C1", schema_version=99)]))


@pytest.mark.parametrize(
    ("kind", "body", "reason"),
    [
        ("change_batch", b"\xff not json", "not JSON"),
        ("change_batch", b"[1, 2]", "list 'events'"),
        ("change_batch", b'{"flow": "f", "entity": "E", "events": {}}', "list 'events'"),
        ("change_batch", b'{"entity": "E", "events": []}', "flow: Field required"),
        ("who_knows", b"{}", "unknown message type 'who_knows'"),
    ],
)
def test_a_message_that_is_not_a_batch_is_refused_whole(
    kind: str, body: bytes, reason: str
) -> None:
    with pytest.raises(MessageFormatError, match=reason):
        decode_records(kind, body)


def test_failures_of_many_records_make_one_bounded_letter() -> None:
    failures = [
        RecordFailure(i, f"syspro:ArCustomer:C{i}", FailureClass.PERMANENT, f"bad field {i}")
        for i in range(50_000)
    ]
    text = summarize(failures)
    assert text.startswith("50000 records failed: syspro:ArCustomer:C0: bad field 0;")
    assert text.endswith("and 49995 more") and len(text) < 1000
    listed = record_errors(failures)
    assert len(listed) == busmod.MAX_RECORD_ERRORS + 1
    assert listed[-1].startswith("and 49950 more")
    same = [RecordFailure(i, f"r{i}", FailureClass.TRANSIENT, "HTTP 503") for i in range(3)]
    assert summarize(same) == "3 records: HTTP 503"
    assert summarize(same[:1]) == "HTTP 503"


# -- dead letters of any shape ----------------------------------------------------------------


class _Message:
    """What DeadLetter reads of an incoming message."""

    def __init__(self, body: bytes, headers: dict[str, Any], kind: str | None = None) -> None:
        self.body = body
        self.headers = headers
        self.type = kind
        self.message_id: str | None = None


def _letter(body: bytes, headers: dict[str, Any], kind: str | None = None) -> DeadLetter:
    message = _Message(body, headers, kind)
    try:
        decoded = decode(kind, body)
    except MessageFormatError:
        decoded = None
    return DeadLetter("p.mapper.dlq", message, decoded, headers)  # type: ignore[arg-type]


WHEN = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)


def test_a_letter_the_broker_dead_lettered_is_read_from_x_death() -> None:
    body = _body([_event("C1")])
    headers = {
        "x-delivery-count": 20,
        "x-death": [
            {
                "count": 1,
                "reason": "delivery_limit",
                "queue": "p.mapper",
                "time": WHEN,
                "exchange": "p.changes",
                "routing-keys": ["syspro.ArCustomer"],
            }
        ],
        "x-first-death-exchange": "p.changes",
        "x-first-death-queue": "p.mapper",
        "x-first-death-reason": "delivery_limit",
    }
    letter = _letter(body, headers, "change_batch")
    summary = letter.summary()
    assert summary["dead_lettered_by"] == "broker"
    assert summary["reason"] == "broker:delivery_limit"
    assert summary["error_class"] is None
    assert "delivery limit" in summary["error"] and "p.mapper" in summary["error"]
    assert summary["attempts"] == 20  # the deliveries the broker counted, when it kept them
    assert summary["original_exchange"] == "p.changes"
    assert summary["original_routing_key"] == "syspro.ArCustomer"
    assert summary["records"] == ["syspro:ArCustomer:C1"]
    assert letter.failed_at == WHEN
    assert Filters(error_class="broker").match(letter)
    assert not Filters(error_class="permanent").match(letter)


def test_a_letter_with_no_headers_and_a_body_that_is_not_json_is_still_listed() -> None:
    letter = _letter(b"\x00\xff garbage", {}, None)
    summary = letter.summary()
    assert summary["reason"] == "unknown" and summary["error_class"] is None
    assert "no reason recorded" in summary["error"]
    assert summary["records"] == [] and summary["original_routing_key"] is None
    assert summary["message_id"].startswith("body-")
    assert letter.body_text.endswith("garbage") and letter.raw is None
    assert json.dumps(summary)  # printable as it is


def test_a_letter_of_records_this_build_refused_names_them() -> None:
    body = _body([_event("C9", schema_version=99)])
    letter = _letter(body, {busmod.H_ERROR_CLASS: "permanent"}, "change_batch")
    assert letter.decoded is None
    assert letter.records == ["syspro:ArCustomer:C9"] and letter.flows == {"f"}
