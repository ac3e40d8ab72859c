"""The operator's command line, run as a real process against the test database, broker and
emulators."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest_asyncio

from emulators.sandbox import Sandbox
from services.runtime import topology_from
from shared.bus import MAPPER_QUEUE, Bus
from shared.failures import FailureClass
from shared.messages import ChangeBatch, ChangeEvent
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


class Cli:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    async def __call__(self, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services",
            *args,
            env=self.env,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else b""), 120)
        return proc.returncode or 0, out.decode(), err.decode()


@pytest_asyncio.fixture
async def cli(
    services: dict[str, str], database_url: str, clean_db: asyncpg.Pool, bus_prefix: str
) -> AsyncIterator[Cli]:
    env = {
        **os.environ,
        "MLC_AMQP_URL": services["amqp_url"],
        "MLC_DATABASE_URL": database_url,
        "MLC_BUS_PREFIX": bus_prefix,
        "MLC_WRITER_TARGETS": "zoho_crm",
        "MLC_RABBITMQ_API_URL": "",
    }
    yield Cli(env)
    settings = Settings(
        amqp_url=services["amqp_url"], bus_prefix=bus_prefix, writer_targets=["zoho_crm"]
    )
    bus = await Bus(services["amqp_url"], topology_from(settings)).connect()
    await bus.delete_topology()
    await bus.close()


@pytest_asyncio.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    box = await Sandbox.start(customers=20, invoices=40)
    yield box
    await box.stop()


async def _add_connections(cli: Cli, box: Sandbox) -> None:
    for name, system, (settings, secrets) in (
        ("syspro", "syspro", box.syspro_connection()),
        ("zoho", "zoho_crm", box.zoho_connection()),
    ):
        sets = [f"--set={k}={v}" for k, v in settings.items()]
        code, _out, err = await cli(
            "connections",
            "add",
            name,
            "--system",
            system,
            *sets,
            "--secrets-stdin",
            stdin=json.dumps(secrets),
        )
        assert code == 0, err


async def test_connections_add_list_show_ping_remove(cli: Cli, sandbox: Sandbox) -> None:
    await _add_connections(cli, sandbox)
    code, out, _ = await cli("connections", "list")
    assert code == 0 and "syspro" in out and "zoho_crm" in out
    code, out, _ = await cli("connections", "show", "zoho")
    shown = json.loads(out)
    assert shown["secrets"] == {"client_secret": "********", "refresh_token": "********"}
    assert sandbox.zoho_connection()[1]["client_secret"] not in out
    for name in ("syspro", "zoho"):
        code, out, err = await cli("connections", "ping", name)
        assert code == 0, out + err
        assert "reachable and authorised" in out

    # a wrong password: ping explains and exits non-zero
    settings, secrets = sandbox.syspro_connection()
    sets = [f"--set={k}={v}" for k, v in settings.items()]
    code, _, err = await cli(
        "connections",
        "add",
        "syspro-bad",
        "--system",
        "syspro",
        *sets,
        "--secrets-stdin",
        stdin=json.dumps({**secrets, "operator_password": "wrong"}),
    )
    assert code == 0, err
    code, out, _ = await cli("connections", "ping", "syspro-bad")
    assert code == 1 and "FAIL" in out and "wrong" not in out.replace("something wrong", "")

    # secrets are never accepted as settings (they would end up in argv and the settings table)
    code, _, err = await cli(
        "connections",
        "add",
        "leaky",
        "--system",
        "zoho_crm",
        f"--set=accounts_url={sandbox.zoho.url}",
        "--set=client_id=x",
        "--set=client_secret=oops",
        "--secrets-stdin",
        stdin=json.dumps({"refresh_token": "r"}),
    )
    assert code == 2 and "client_secret" in err

    code, out, _ = await cli("connections", "remove", "syspro-bad")
    assert code == 0
    code, _, err = await cli("connections", "show", "syspro-bad")
    assert code == 1 and "no connection named 'syspro-bad'" in err


async def test_flows_apply_preview_enable_disable_resync(
    cli: Cli, sandbox: Sandbox, tmp_path: Path
) -> None:
    await _add_connections(cli, sandbox)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (ROOT / "flows/syspro-zoho.yaml")
        .read_text()
        .replace("lookup: deal_stage", "lookup: stages")
    )
    code, _, err = await cli("flows", "apply", str(bad))
    assert code == 2
    assert str(bad) in err and "flow 'syspro-zoho'" in err and "fields.Stage" in err

    code, out, err = await cli("flows", "apply", "flows/syspro-zoho.yaml")
    assert code == 0 and "syspro-zoho v1 created" in out, err
    code, out, _ = await cli("flows", "apply", "flows/syspro-zoho.yaml")
    assert "syspro-zoho v1 unchanged" in out

    code, out, err = await cli("flows", "preview", "syspro-zoho", "-n", "3", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["entity"] for r in rows] == ["customers"] * 3 + ["invoices"] * 3
    assert all(r["action"] == "insert" for r in rows)
    assert rows[0]["payload"]["ERP_Customer_No"] == rows[0]["source_key"]
    assert (await sandbox.zoho_stats())["write_calls"] == 0  # preview writes nothing

    code, out, _ = await cli("flows", "disable", "syspro-zoho")
    assert code == 0
    code, out, _ = await cli("flows", "list")
    assert "disabled" in out
    code, _, _ = await cli("flows", "enable", "syspro-zoho")
    assert code == 0
    code, out, _ = await cli("flows", "resync", "syspro-zoho")
    assert code == 0 and "cursor(s) reset" in out
    code, _, err = await cli("flows", "enable", "nope")
    assert code == 1 and "no flow named 'nope'" in err


async def _dead_letter(cli: Cli, flow: str) -> None:
    settings = Settings(
        amqp_url=cli.env["MLC_AMQP_URL"],
        bus_prefix=cli.env["MLC_BUS_PREFIX"],
        writer_targets=["zoho_crm"],
    )
    bus = await Bus(cli.env["MLC_AMQP_URL"], topology_from(settings)).connect()
    await bus.declare()
    event = ChangeEvent(
        flow=flow,
        flow_version=1,
        source_connection="syspro",
        source_system="syspro",
        entity="ArCustomer",
        key="0000001",
        version="h",
        record={"Customer": "0000001"},
    )
    await bus.publish(
        "changes", "syspro.ArCustomer", ChangeBatch(flow=flow, entity="ArCustomer", events=[event])
    )
    channel = await bus.connection.channel()  # type: ignore[union-attr]
    queue = await channel.get_queue(bus.topology.queue(MAPPER_QUEUE))
    for _ in range(50):
        message = await queue.get(no_ack=False, fail=False)
        if message is not None:
            break
        await asyncio.sleep(0.1)
    assert message is not None
    await bus.route_failure(message, MAPPER_QUEUE, FailureClass.PERMANENT, "bad data for test")
    await message.ack()
    await bus.close()


async def test_status_dlq_and_audit(cli: Cli, sandbox: Sandbox, clean_db: asyncpg.Pool) -> None:
    await _add_connections(cli, sandbox)
    await cli("flows", "apply", "flows/syspro-zoho.yaml")
    code, out, _ = await cli("dlq", "list")
    assert code == 0 and "no dead letters" in out
    code, out, _ = await cli("status", "--json")
    status: dict[str, Any] = json.loads(out)
    assert status["flows"][0]["name"] == "syspro-zoho"

    await _dead_letter(cli, "syspro-zoho")
    code, out, _ = await cli("status", "--json")
    status = json.loads(out)
    assert code == 1 and any("dead letters: 1" in a for a in status["attention"])
    code, out, _ = await cli("dlq", "list", "--json")
    letters = json.loads(out)
    assert len(letters) == 1 and letters[0]["error"] == "bad data for test"
    assert letters[0]["records"] == ["syspro:ArCustomer:0000001"]
    assert letters[0]["superseded"] == []
    message_id = letters[0]["message_id"]

    # A later reading of the record lands: the letter is marked as superseded.
    await clean_db.execute(
        """INSERT INTO record_links (flow, source_entity, source_key, target_connection,
               target_entity, target_id, observed_at)
           VALUES ('syspro-zoho', 'ArCustomer', '0000001', 'zoho', 'Accounts', '77',
                   now() + interval '1 minute')"""
    )
    code, out, _ = await cli("dlq", "list", "--json")
    assert json.loads(out)[0]["superseded"] == ["syspro:ArCustomer:0000001"]
    code, out, _ = await cli("dlq", "list")
    assert "1 of them landed since at a newer version" in out
    await clean_db.execute("DELETE FROM record_links")

    code, out, _ = await cli("dlq", "replay", "--dry-run")
    assert "would replay 1" in out
    code, out, _ = await cli("dlq", "list", "--json")
    assert len(json.loads(out)) == 1  # the dry run removed nothing

    await cli("flows", "disable", "syspro-zoho")
    code, out, err = await cli("dlq", "replay", "--message-id", message_id)
    assert code == 1 and "is disabled" in err
    await cli("flows", "enable", "syspro-zoho")
    code, out, err = await cli("dlq", "replay", "--message-id", message_id)
    assert code == 0 and "replayed 1" in out, err
    code, out, _ = await cli("dlq", "list", "--json")
    assert json.loads(out) == []

    code, out, _ = await cli("audit", "syspro:ArCustomer:0000001", "--json")
    stages = [r["stage"] for r in json.loads(out)]
    assert "replayed" in stages
    replayed = next(r for r in json.loads(out) if r["stage"] == "replayed")
    assert replayed["actor"].startswith("operator:")

    code, out, _ = await cli("audit", "syspro:ArCustomer:NOPE")
    assert code == 1 and "no audit rows" in out
    code, _, err = await cli("audit", "not-a-ref")
    assert code == 2 and "SYSTEM:ENTITY:KEY" in err


async def test_demo_short_mode_summary(services: dict[str, str], bus_prefix: str) -> None:
    admin = await asyncpg.connect(f"{services['pg_base']}/postgres")
    name = f"mlc_demo_test_{bus_prefix}"
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    env = {
        **os.environ,
        "MLC_AMQP_URL": services["amqp_url"],
        "MLC_DATABASE_URL": f"{services['pg_base']}/{name}",
        "MLC_BUS_PREFIX": bus_prefix,
        "MLC_RABBITMQ_API_URL": "",
        "MLC_WEBHOOK_PORT": "0",
        "MLC_LOG_LEVEL": "WARNING",
    }
    try:
        code, out, err = await Cli(env)("demo", "--short", "--duration", "4")
        assert "SUMMARY" in out, out + err
        assert "OK: every record landed exactly once" in out, out + err[-3000:]
        assert "ml-connector status" in out
        assert code == 0
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        settings = Settings(amqp_url=services["amqp_url"], bus_prefix=bus_prefix)
        bus = await Bus(services["amqp_url"], topology_from(settings)).connect()
        await bus.delete_topology()
        await bus.close()
