"""Operator input checked up front: flow files applied all or nothing, bounded ``--since``,
secrets files and master keys that are not what they should be, a key rotation that would lose
every secret. Each is one line and an exit status, never a traceback; nothing is half done."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from click.testing import CliRunner, Result
from pydantic import SecretStr

from services.cli import main
from shared.settings import DEV_MASTER_KEY, load_settings
from shared.vault import Vault, VaultError

ROOT = Path(__file__).resolve().parents[2]
FLOW = (ROOT / "flows/syspro-zoho.yaml").read_text()


class Cli:
    """``ml-connector`` in process (click's runner), against the test database."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    async def __call__(
        self, *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None
    ) -> Result:
        def invoke() -> Result:
            load_settings.cache_clear()
            try:
                return CliRunner().invoke(
                    main, list(args), env={**self.env, **(env or {})}, input=stdin
                )
            finally:
                load_settings.cache_clear()

        # the commands run their own event loop
        return await asyncio.to_thread(invoke)


def _one_line_failure(result: Result, codes: Sequence[int] = (1, 2)) -> str:
    assert result.exit_code in codes, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no traceback
    err = result.stderr
    assert "Traceback" not in result.output
    assert err.startswith("ml-connector: "), err
    return err


@pytest_asyncio.fixture
async def cli(database_url: str, clean_db: asyncpg.Pool) -> AsyncIterator[Cli]:
    yield Cli(
        {
            "MLC_DATABASE_URL": database_url,
            "MLC_ENV": "development",
            "MLC_MASTER_KEY": DEV_MASTER_KEY,
            "MLC_MASTER_KEY_ID": "k1",
            "MLC_OLD_MASTER_KEYS": "",
        }
    )


async def _add_connections(pool: asyncpg.Pool, *names: str) -> None:
    vault = Vault("k1", {"k1": base64.b64decode(DEV_MASTER_KEY)})
    for name in names:
        await pool.execute(
            "INSERT INTO connections (name, system, secrets, key_id) VALUES ($1, 'x', $2, 'k1')",
            name,
            vault.seal_secrets({"password": SecretStr("p")}, name),
        )


async def _stored(pool: asyncpg.Pool) -> list[str]:
    rows = await pool.fetch("SELECT name FROM flows UNION ALL SELECT name FROM flow_versions")
    return sorted(row["name"] for row in rows)


async def test_flows_apply_is_all_or_nothing(
    cli: Cli, clean_db: asyncpg.Pool, tmp_path: Path
) -> None:
    await _add_connections(clean_db, "syspro", "zoho")
    good = tmp_path / "good.yaml"
    good.write_text(FLOW)
    # passes the file checks of old, failed when stored (int(inf)), after good.yaml was stored
    infinite = tmp_path / "infinite.yaml"
    infinite.write_text(
        FLOW.replace("name: syspro-zoho", "name: other").replace(
            "poll_interval: 10m", "poll_interval: .inf"
        )
    )
    result = await cli("flows", "apply", str(good), str(infinite))
    err = _one_line_failure(result, (2,))
    assert f"{infinite}: flow 'other': poll_interval: " in err and "too long" in err
    assert "nothing applied" in err
    assert await _stored(clean_db) == []

    # a valid file naming a connection that does not exist, after a good one
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text(
        FLOW.replace("name: syspro-zoho", "name: other").replace("target: zoho", "target: nowhere")
    )
    result = await cli("flows", "apply", str(good), str(elsewhere))
    err = _one_line_failure(result, (2,))
    assert f"{elsewhere}: flow 'other': connection(s) nowhere not found" in err
    assert await _stored(clean_db) == []

    # the same flow twice
    again = tmp_path / "again.yaml"
    again.write_text(FLOW)
    result = await cli("flows", "apply", str(good), str(again))
    err = _one_line_failure(result, (2,))
    assert f"{again}: flow 'syspro-zoho' is also defined in {good}" in err
    assert await _stored(clean_db) == []

    # all good: all stored, together
    fine = tmp_path / "fine.yaml"
    fine.write_text(FLOW.replace("name: syspro-zoho", "name: other"))
    result = await cli("flows", "apply", str(good), str(fine))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["syspro-zoho v1 created", "other v1 created"]
    assert await _stored(clean_db) == ["other", "other", "syspro-zoho", "syspro-zoho"]


@pytest.mark.parametrize(
    ("since", "expected"),
    [
        ("99999999999d", "too long (at most 36500d)"),
        ("9" * 400, "too long"),
        ("soon", "not 'soon'"),
    ],
)
@pytest.mark.parametrize(
    "command",
    [("audit", "--failed", "--since"), ("dlq", "list", "--since"), ("dlq", "list", "--until")],
)
async def test_audit_and_dlq_since_are_bounded(
    cli: Cli, command: tuple[str, ...], since: str, expected: str
) -> None:
    result = await cli(*command, since)
    err = _one_line_failure(result, (2,))
    assert "--since/--until takes a duration (1h) or an ISO time" in err and expected in err
    assert len(err.strip().splitlines()) == 1


async def test_audit_since_takes_a_duration_or_an_iso_time(
    cli: Cli, clean_db: asyncpg.Pool
) -> None:
    await clean_db.execute(
        """INSERT INTO audit_events (at, flow, direction, stage, status, source_ref, actor,
               error_class, error)
           VALUES (now() - interval '2 hours', 'f', 'forward', 'failed', 'failed',
                   'syspro:ArCustomer:1', 'writer@x', 'permanent', 'boom')"""
    )
    result = await cli("audit", "--failed", "--since", "1h", "--json")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "[]"
    result = await cli("audit", "--failed", "--since", "36500d")
    assert result.exit_code == 0 and "boom" in result.stdout, result.output
    result = await cli("audit", "--failed", "--since", "2000-01-01T00:00:00")
    assert result.exit_code == 0 and "boom" in result.stdout, result.output


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (bytes(range(256)) * 4, "is not UTF-8 text"),
        (b"\xff\xfe{\x00}\x00", "is not UTF-8 text"),
        (b"\x00\x01\x02", "is not valid JSON"),
        (b"[1, 2]", "must hold a JSON object"),
        (b'"just a string"', "must hold a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "is not valid JSON"),
        (b" " * 1_000_001, "larger than 1,000,000 bytes"),
    ],
)
async def test_a_secrets_file_that_is_no_json_object_is_one_line(
    cli: Cli, clean_db: asyncpg.Pool, tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "secrets.json"
    path.write_bytes(content)
    args = ("connections", "add", "z", "--system", "zoho_crm", "--set=client_id=c")
    result = await cli(*args, "--secrets-file", str(path))
    err = _one_line_failure(result, (2,))
    assert f"secrets file {path}" in err and expected in err
    assert len(err.strip().splitlines()) == 1
    result = await cli(*args, "--secrets-stdin", stdin=content)
    err = _one_line_failure(result, (2,))
    assert "stdin (secrets)" in err and expected in err
    assert await clean_db.fetchval("SELECT count(*) FROM connections") == 0


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("", "setting MLC_MASTER_KEY is invalid: MLC_MASTER_KEY must decode to 16, 24 or 32"),
        (
            "%%%not-base64%%%",
            "setting MLC_MASTER_KEY is invalid: MLC_MASTER_KEY is not valid base64",
        ),
        (base64.b64encode(b"0123456789").decode(), "not 10"),
    ],
)
@pytest.mark.parametrize(
    "command",
    [
        ("connections", "list"),
        ("vault", "rotate"),
        ("connections", "add", "z", "--system", "zoho_crm", "--set=client_id=c", "--secrets-stdin"),
    ],
)
async def test_an_empty_or_malformed_master_key_is_one_line(
    cli: Cli, key: str, expected: str, command: tuple[str, ...]
) -> None:
    result = await cli(
        *command, env={"MLC_MASTER_KEY": key}, stdin=b'{"client_secret": "s", "refresh_token": "r"}'
    )
    err = _one_line_failure(result, (2,))
    assert expected in err
    assert len(err.strip().splitlines()) == 1


async def test_rotating_to_a_new_key_under_the_same_id_is_refused(
    cli: Cli, clean_db: asyncpg.Pool
) -> None:
    old_key = base64.b64decode(DEV_MASTER_KEY)
    await _add_connections(clean_db, "erp", "crm")
    new_key = base64.b64encode(os.urandom(32)).decode()

    result = await cli("vault", "rotate", env={"MLC_MASTER_KEY": new_key})
    err = _one_line_failure(result, (1,))
    assert "nothing rotated" in err and "without a new MLC_MASTER_KEY_ID" in err
    assert len(err.strip().splitlines()) == 1
    # nothing written: the secrets still open with the key they were sealed with
    old = Vault("k1", {"k1": old_key})
    for row in await clean_db.fetch("SELECT name, secrets, key_id FROM connections"):
        assert row["key_id"] == "k1"
        assert old.open_secrets(row["secrets"], row["name"])["password"].get_secret_value() == "p"

    # the same rotation done right: a new id, the old key kept under the old one
    result = await cli(
        "vault",
        "rotate",
        env={
            "MLC_MASTER_KEY": new_key,
            "MLC_MASTER_KEY_ID": "k2",
            "MLC_OLD_MASTER_KEYS": f"k1:{DEV_MASTER_KEY}",
        },
    )
    assert result.exit_code == 0, result.output
    assert '"connections": 2' in result.stdout
    new = Vault("k2", {"k2": base64.b64decode(new_key)})
    for row in await clean_db.fetch("SELECT name, secrets FROM connections"):
        assert new.open_secrets(row["secrets"], row["name"])["password"].get_secret_value() == "p"


async def test_rotate_refuses_a_wrong_old_key_and_writes_nothing(clean_db: asyncpg.Pool) -> None:
    first, second, wrong = os.urandom(32), os.urandom(32), os.urandom(32)
    sealing = Vault("k1", {"k1": first})
    await clean_db.execute(
        "INSERT INTO connections (name, system, secrets, key_id) VALUES ('a', 'x', $1, 'k1')",
        sealing.seal_secrets({"password": SecretStr("p")}, "a"),
    )
    with pytest.raises(VaultError, match="nothing rotated: secret of 'a' failed authentication"):
        await Vault("k2", {"k2": second, "k1": wrong}).rotate(clean_db)
    assert await clean_db.fetchval("SELECT key_id FROM connections") == "k1"
